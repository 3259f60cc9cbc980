//! The control socket of a mount's daemon. A client connects, sends one
//! line naming what it wants and gets one answer, then the connection
//! closes:
//!
//! - `stats`: a [`StatsReport`] as JSON (what `naiad stats` prints);
//! - `metrics`: the counters in Prometheus text format.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::counters::CounterSnapshot;
use crate::error::FuseError;
use crate::size::format_size;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub pid: u32,
    pub uptime_secs: f64,
    /// Total size of the image's chunk blobs.
    pub blob_bytes: u64,
    pub counters: CounterSnapshot,
    pub memory_cache: CacheUsage,
    pub disk_cache: Option<CacheUsage>,
}

impl StatsReport {
    /// Readable text for a terminal.
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "mountpoint      {}\nsource          {}\ndaemon pid      {}\nuptime          {:.1}s\nblobs           {}\n",
            self.mountpoint,
            self.source,
            self.pid,
            self.uptime_secs,
            format_size(self.blob_bytes)
        );
        let usage = |u: &CacheUsage| format!("{} in {} chunks (cap {})", format_size(u.bytes), u.entries, format_size(u.capacity));
        out.push_str(&format!("memory cache    {}\n", usage(&self.memory_cache)));
        match &self.disk_cache {
            Some(d) => out.push_str(&format!("disk cache      {} at {}\n", usage(d), d.dir.as_deref().unwrap_or("?"))),
            None => out.push_str("disk cache      off\n"),
        }
        out.push('\n');
        out.push_str(&self.counters.render_text());
        out
    }
}

/// Serves a mount's control socket on a background thread.
pub struct StatsServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn handle(mut conn: UnixStream, report: &dyn Fn() -> StatsReport) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&conn).take(256)).read_line(&mut line)?;
    let r = report();
    let answer = match line.trim() {
        "" | "stats" => serde_json::to_string(&r).map_err(std::io::Error::other)?,
        "metrics" => r.counters.render_prometheus(&r.mountpoint),
        other => format!("{{\"error\":\"unknown request {:?}\"}}", other.escape_debug().to_string()),
    };
    conn.write_all(answer.as_bytes())
}

impl StatsServer {
    /// Binds `path` (replacing a stale socket, refusing a live one) and
    /// answers requests with what `report` returns.
    pub fn start(path: &Path, report: impl Fn() -> StatsReport + Send + 'static) -> Result<Self, FuseError> {
        let err = |detail: String| FuseError::Stats { path: path.to_path_buf(), detail };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(err("another daemon is already listening there".into()));
            }
            std::fs::remove_file(path).map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("naiad-stats".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(c) => {
                            if let Err(e) = handle(c, &report) {
                                tracing::debug!("stats socket: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("stats socket: accept: {e}"),
                    }
                }
            })
            .map_err(|e| err(format!("cannot start thread: {e}")))?;
        Ok(StatsServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops answering and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for StatsServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
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
mod tests {
    use super::*;

    #[test]
    fn serves_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let report = StatsReport {
            mountpoint: "/mnt".into(),
            source: "oci:/x:naiad".into(),
            pid: 1,
            uptime_secs: 1.0,
            blob_bytes: 10,
            counters: CounterSnapshot { misses: 3, ..Default::default() },
            memory_cache: CacheUsage { bytes: 1, entries: 1, capacity: 2, dir: None },
            disk_cache: None,
        };
        let r2 = report.clone();
        let server = StatsServer::start(&path, move || r2.clone()).unwrap();
        assert!(StatsServer::start(&path, || unreachable!()).is_err());
        assert_eq!(query_stats(&path).unwrap(), report);
        assert!(query(&path, "metrics").unwrap().contains("naiad_misses_total{mountpoint=\"/mnt\"} 3"));
        assert!(report.render_text().contains("misses"));
        server.stop();
        assert!(!path.exists());
        assert!(query_stats(&path).is_err());
    }
}
