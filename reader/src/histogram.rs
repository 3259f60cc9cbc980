//! [`Histogram`]: a lock-free latency histogram with fixed upper bounds, as
//! Prometheus histograms have them, and [`HistogramSnapshot`], its copy that
//! serializes to JSON, renders as Prometheus `_bucket`/`_sum`/`_count`
//! series and estimates quantiles for readable output.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the read-latency buckets: 50 µs to 10 s.
pub const LATENCY_BOUNDS: [f64; 18] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Observations counted per bucket of [`LATENCY_BOUNDS`] (not cumulative;
/// the last bucket is everything above the largest bound), plus their sum
/// and count. Atomics only and `repr(C)`, so it can live in the shared
/// counters file ([`crate::counters::Counters::open_shared`]).
#[derive(Debug, Default)]
#[repr(C)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS.partition_point(|&b| ((b * 1e9) as u64) < ns);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BOUNDS.len());
        for (i, &le) in LATENCY_BOUNDS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            buckets.push(Bucket { le, count: cumulative });
        }
        let above = self.counts.last().map(|c| c.load(Ordering::Relaxed)).unwrap_or(0);
        HistogramSnapshot { buckets, count: cumulative + above, sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9 }
    }
}

/// One bucket: how many observations were `<= le` seconds (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub le: f64,
    pub count: u64,
}

/// A copy of a [`Histogram`]. `count` is the number of observations (the
/// `+Inf` bucket).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    pub buckets: Vec<Bucket>,
    pub count: u64,
    pub sum_seconds: f64,
}

/// A Prometheus float: integers without a fraction, others as Rust prints them.
fn prom_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

impl HistogramSnapshot {
    pub fn mean_seconds(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_seconds / self.count as f64)
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1): an
    /// over-estimate by at most one bucket. `None` without observations or
    /// when it lies above the largest bound.
    pub fn quantile_upper_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).ceil().max(1.0) as u64;
        self.buckets.iter().find(|b| b.count >= rank).map(|b| b.le)
    }

    /// Prometheus exposition of this histogram as `name` with `labels`
    /// (already formatted, `key="value"` pairs joined by commas, or empty).
    pub fn render_prometheus(&self, name: &str, help: &str, labels: &str) -> String {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut out = format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
        for b in &self.buckets {
            out.push_str(&format!("{name}_bucket{{{labels}{sep}le=\"{}\"}} {}\n", prom_float(b.le), b.count));
        }
        out.push_str(&format!("{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}\n", self.count));
        out.push_str(&format!("{name}_sum{{{labels}}} {}\n", prom_float(self.sum_seconds)));
        out.push_str(&format!("{name}_count{{{labels}}} {}\n", self.count));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_render() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], Bucket { le: 0.00005, count: 2 });
        assert_eq!(s.buckets.iter().find(|b| b.le == 0.005).unwrap().count, 3);
        assert_eq!(s.buckets.last().unwrap().count, 3);
        assert!((s.sum_seconds - 60.00308).abs() < 1e-9);
        assert_eq!(s.quantile_upper_bound(0.5), Some(0.00005));
        assert_eq!(s.quantile_upper_bound(0.75), Some(0.005));
        assert_eq!(s.quantile_upper_bound(1.0), None);
        let text = s.render_prometheus("x_seconds", "help", "m=\"a\"");
        assert!(text.contains("# TYPE x_seconds histogram\n"));
        assert!(text.contains("x_seconds_bucket{m=\"a\",le=\"0.00005\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{m=\"a\",le=\"1.0\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{m=\"a\",le=\"+Inf\"} 4\n"));
        assert!(text.contains("x_seconds_count{m=\"a\"} 4\n"));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<HistogramSnapshot>(&json).unwrap(), s);
    }
}
