//! The control socket of a mount's daemon, and [`StatsReport`], everything
//! `naiad stats` shows. A client connects, sends one line naming what it
//! wants and gets one answer, then the connection closes:
//!
//! - `stats`: a [`StatsReport`] as JSON (what `naiad stats` prints);
//! - `metrics`: the report in Prometheus text format.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::counters::{label_value, CounterSnapshot, PrefetchSnapshot};
use crate::error::FuseError;
use crate::histogram::HistogramSnapshot;
use crate::size::format_size;
use crate::socket_server::{SocketServer, IO_TIMEOUT};

/// How full one cache tier is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheUsage {
    pub bytes: u64,
    pub entries: u64,
    pub capacity: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// Everything `naiad stats` shows about a mount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub mountpoint: String,
    pub source: String,
    /// The daemon serving the mount now.
    pub pid: u32,
    /// The supervisor that owns the mount's FUSE connection and restarts
    /// its daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_pid: Option<u32>,
    /// Which daemon of the mount this is: 1 for the first, then counting up
    /// with every restart and upgrade.
    #[serde(default)]
    pub generation: u64,
    /// Seconds since this daemon started serving.
    pub uptime_secs: f64,
    /// Total size of the image's chunk blobs.
    pub blob_bytes: u64,
    pub counters: CounterSnapshot,
    /// Time the FUSE read handler took per request.
    #[serde(default)]
    pub read_latency: HistogramSnapshot,
    /// Time from a daemon's death until its successor served the mount.
    #[serde(default)]
    pub daemon_recovery: HistogramSnapshot,
    #[serde(default)]
    pub prefetch: PrefetchSnapshot,
    /// Where `--record-trace` writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_file: Option<String>,
    pub memory_cache: CacheUsage,
    pub disk_cache: Option<CacheUsage>,
}

fn gauge(out: &mut String, name: &str, help: &str, labels: &str, value: impl std::fmt::Display) {
    out.push_str(&format!("# HELP naiad_{name} {help}\n# TYPE naiad_{name} gauge\nnaiad_{name}{{{labels}}} {value}\n"));
}

impl StatsReport {
    /// Readable text for a terminal.
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "mountpoint      {}\nsource          {}\ndaemon pid      {} (generation {}{})\nuptime          {:.1}s\nblobs           {}\n",
            self.mountpoint,
            self.source,
            self.pid,
            self.generation,
            self.supervisor_pid.map(|p| format!(", supervisor pid {p}")).unwrap_or_default(),
            self.uptime_secs,
            format_size(self.blob_bytes)
        );
        let usage = |u: &CacheUsage| format!("{} in {} chunks (cap {})", format_size(u.bytes), u.entries, format_size(u.capacity));
        out.push_str(&format!("memory cache    {}\n", usage(&self.memory_cache)));
        match &self.disk_cache {
            Some(d) => out.push_str(&format!("disk cache      {} at {}\n", usage(d), d.dir.as_deref().unwrap_or("?"))),
            None => out.push_str("disk cache      off\n"),
        }
        out.push_str(&self.prefetch.render_text());
        if let Some(t) = &self.trace_file {
            out.push_str(&format!("trace           {} records to {t}\n", self.counters.trace_records));
        }
        let l = &self.read_latency;
        let ms = |s: Option<f64>| s.map(|s| format!("{:.3}ms", s * 1000.0)).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "read latency    {} reads, mean {}, p50 <= {}, p99 <= {}\n",
            l.count,
            ms(l.mean_seconds()),
            ms(l.quantile_upper_bound(0.5)),
            ms(l.quantile_upper_bound(0.99))
        ));
        let r = &self.daemon_recovery;
        if r.count > 0 {
            out.push_str(&format!(
                "daemon restarts {} ({} upgrades); recovery mean {}, max <= {}\n",
                self.counters.daemon_restarts,
                self.counters.daemon_upgrades,
                ms(r.mean_seconds()),
                ms(r.quantile_upper_bound(1.0))
            ));
        }
        out.push('\n');
        out.push_str(&self.counters.render_text());
        out
    }

    /// Prometheus text exposition (format 0.0.4): the counters as
    /// `naiad_<name>_total`, the read latency as the histogram
    /// `naiad_read_latency_seconds`, caches and prefetch progress as
    /// gauges, all labelled with the mountpoint.
    pub fn render_prometheus(&self) -> String {
        let labels = format!("mountpoint=\"{}\"", label_value(&self.mountpoint));
        let mut out = self.counters.render_prometheus(&self.mountpoint);
        out.push_str(&self.read_latency.render_prometheus("naiad_read_latency_seconds", "time the FUSE read handler took", &labels));
        out.push_str(&self.daemon_recovery.render_prometheus("naiad_daemon_recovery_seconds", "time from a daemon's death until its successor served the mount", &labels));
        gauge(&mut out, "daemon_pid", "pid of the daemon serving the mount", &labels, self.pid);
        if let Some(p) = self.supervisor_pid {
            gauge(&mut out, "supervisor_pid", "pid of the mount's supervisor", &labels, p);
        }
        gauge(&mut out, "uptime_seconds", "seconds since the daemon mounted the image", &labels, format!("{:.3}", self.uptime_secs));
        gauge(&mut out, "blob_bytes", "total size of the image's chunk blobs", &labels, self.blob_bytes);
        let mut caches = vec![("memory", &self.memory_cache)];
        if let Some(d) = &self.disk_cache {
            caches.push(("disk", d));
        }
        for (tier, u) in caches {
            gauge(&mut out, &format!("{tier}_cache_bytes"), &format!("bytes held by the {tier} cache"), &labels, u.bytes);
            gauge(&mut out, &format!("{tier}_cache_chunks"), &format!("chunks held by the {tier} cache"), &labels, u.entries);
            gauge(&mut out, &format!("{tier}_cache_capacity_bytes"), &format!("size cap of the {tier} cache"), &labels, u.capacity);
        }
        for (name, help, v) in self.prefetch.gauges() {
            gauge(&mut out, name, help, &labels, v);
        }
        out
    }
}

/// Serves a mount's control socket on a background thread.
pub struct StatsServer {
    server: SocketServer,
}

fn handle(mut conn: UnixStream, report: &dyn Fn() -> StatsReport) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new((&conn).take(256)).read_line(&mut line)?;
    let r = report();
    let answer = match line.trim() {
        "" | "stats" => serde_json::to_string(&r).map_err(std::io::Error::other)?,
        "metrics" => r.render_prometheus(),
        other => format!("{{\"error\":\"unknown request {:?}\"}}", other.escape_debug().to_string()),
    };
    conn.write_all(answer.as_bytes())
}

impl StatsServer {
    /// Binds `path` (replacing a stale socket, refusing a live one) and
    /// answers requests with what `report` returns.
    pub fn start(path: &Path, report: impl Fn() -> StatsReport + Send + 'static) -> Result<Self, FuseError> {
        Ok(StatsServer { server: SocketServer::start(path, "naiad-stats", move |c| handle(c, &report))? })
    }

    pub fn path(&self) -> &Path {
        self.server.path()
    }

    /// Stops answering and removes the socket.
    pub fn stop(self) {
        self.server.stop();
    }
}

/// Sends `request` ("stats" or "metrics") to the socket at `path` and
/// returns the answer.
pub fn query(path: &Path, request: &str) -> Result<String, FuseError> {
    let err = |detail: String| FuseError::Stats { path: path.to_path_buf(), detail };
    let mut conn = UnixStream::connect(path).map_err(|e| err(format!("cannot connect: {e}")))?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| err(e.to_string()))?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| err(e.to_string()))?;
    conn.write_all(format!("{request}\n").as_bytes()).map_err(|e| err(format!("cannot send: {e}")))?;
    let mut answer = String::new();
    conn.take(64 << 20).read_to_string(&mut answer).map_err(|e| err(format!("cannot read answer: {e}")))?;
    Ok(answer)
}

/// Asks the daemon at `path` for its [`StatsReport`].
pub fn query_stats(path: &Path) -> Result<StatsReport, FuseError> {
    let answer = query(path, "stats")?;
    serde_json::from_str(&answer).map_err(|e| FuseError::Stats { path: path.to_path_buf(), detail: format!("bad answer: {e}") })
}

#[cfg(test)]
pub(crate) fn sample_report() -> StatsReport {
    let h = crate::histogram::Histogram::default();
    h.observe(std::time::Duration::from_millis(2));
    StatsReport {
        mountpoint: "/mnt".into(),
        source: "oci:/x:naiad".into(),
        pid: 1,
        supervisor_pid: Some(2),
        generation: 3,
        uptime_secs: 1.0,
        blob_bytes: 10,
        counters: CounterSnapshot { misses: 3, reads: 1, ..Default::default() },
        read_latency: h.snapshot(),
        daemon_recovery: h.snapshot(),
        prefetch: PrefetchSnapshot { state: "done".into(), chunks_total: 4, chunks_done: 4, ..Default::default() },
        trace_file: None,
        memory_cache: CacheUsage { bytes: 1, entries: 1, capacity: 2, dir: None },
        disk_cache: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let report = sample_report();
        let r2 = report.clone();
        let server = StatsServer::start(&path, move || r2.clone()).unwrap();
        assert!(StatsServer::start(&path, || unreachable!()).is_err());
        assert_eq!(query_stats(&path).unwrap(), report);
        let metrics = query(&path, "metrics").unwrap();
        assert!(metrics.contains("naiad_misses_total{mountpoint=\"/mnt\"} 3"), "{metrics}");
        assert!(metrics.contains("naiad_read_latency_seconds_count{mountpoint=\"/mnt\"} 1"), "{metrics}");
        assert!(metrics.contains("naiad_prefetch_state{mountpoint=\"/mnt\"} 2"), "{metrics}");
        assert!(metrics.contains("naiad_daemon_restarts_total{mountpoint=\"/mnt\"} 0"), "{metrics}");
        assert!(metrics.contains("naiad_daemon_recovery_seconds_count{mountpoint=\"/mnt\"} 1"), "{metrics}");
        assert!(metrics.contains("naiad_supervisor_pid{mountpoint=\"/mnt\"} 2"), "{metrics}");
        let text = report.render_text();
        assert!(text.contains("misses") && text.contains("read latency") && text.contains("prefetch        done"), "{text}");
        server.stop();
        assert!(!path.exists());
        assert!(query_stats(&path).is_err());
    }
}
