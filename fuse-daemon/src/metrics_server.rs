//! [`MetricsServer`]: `--api-socket PATH`, a small HTTP/1.1 server on a unix
//! socket, so monitoring can scrape a mount with plain HTTP tools:
//!
//! ```text
//! curl --unix-socket PATH http://localhost/metrics
//! ```
//!
//! - `GET /metrics`: Prometheus text format (`text/plain; version=0.0.4`);
//! - `GET /stats` (or `/api/v1/stats`): the [`StatsReport`] as JSON.
//!
//! One request per connection (`Connection: close`); `HEAD` is answered
//! like `GET` without the body; other methods get 405, other paths 404.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::error::FuseError;
use crate::socket_server::SocketServer;
use crate::stats_server::StatsReport;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Largest request head read.
const MAX_HEAD: usize = 16 << 10;

/// Serves the HTTP API of one mount.
pub struct MetricsServer {
    server: SocketServer,
}

/// Reads the request head (up to the blank line); `None` if the client
/// closed first or sent too much.
fn read_head(conn: &mut UnixStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok((!head.is_empty()).then(|| String::from_utf8_lossy(&head).into_owned()));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

fn respond(conn: &mut UnixStream, status: &str, content_type: &str, body: &str, with_body: bool) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    conn.write_all(head.as_bytes())?;
    if with_body {
        conn.write_all(body.as_bytes())?;
    }
    conn.flush()
}

fn handle(mut conn: UnixStream, report: &dyn Fn() -> StatsReport) -> std::io::Result<()> {
    let Some(head) = read_head(&mut conn)? else {
        return respond(&mut conn, "400 Bad Request", "text/plain", "bad request\n", true);
    };
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // Absolute-form targets (http://localhost/metrics) and query strings.
    let path = target.strip_prefix("http://").map(|rest| rest.find('/').map(|i| &rest[i..]).unwrap_or("/")).unwrap_or(target);
    let path = path.split('?').next().unwrap_or("");
    let with_body = match method {
        "GET" => true,
        "HEAD" => false,
        "" => return respond(&mut conn, "400 Bad Request", "text/plain", "bad request\n", true),
        _ => return respond(&mut conn, "405 Method Not Allowed", "text/plain", "only GET and HEAD\n", true),
    };
    match path {
        "/metrics" => respond(&mut conn, "200 OK", PROMETHEUS_CONTENT_TYPE, &report().render_prometheus(), with_body),
        "/stats" | "/api/v1/stats" => {
            let json = serde_json::to_string_pretty(&report()).map_err(std::io::Error::other)? + "\n";
            respond(&mut conn, "200 OK", "application/json", &json, with_body)
        }
        _ => respond(&mut conn, "404 Not Found", "text/plain", "not found: try /metrics or /stats\n", with_body),
    }
}

impl MetricsServer {
    /// Binds `path` (replacing a stale socket, refusing a live one) and
    /// answers HTTP requests from what `report` returns.
    pub fn start(path: &Path, report: impl Fn() -> StatsReport + Send + 'static) -> Result<Self, FuseError> {
        Ok(MetricsServer { server: SocketServer::start(path, "naiad-api", move |c| handle(c, &report))? })
    }

    pub fn path(&self) -> &Path {
        self.server.path()
    }

    /// Stops answering and removes the socket.
    pub fn stop(self) {
        self.server.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats_server::sample_report;

    fn request(path: &Path, req: &str) -> String {
        let mut c = UnixStream::connect(path).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = MetricsServer::start(&path, sample_report).unwrap();
        let r = request(&path, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
        assert_eq!(len, body.len());
        assert!(body.contains("naiad_read_latency_seconds_bucket{mountpoint=\"/mnt\",le=\"+Inf\"} 1"), "{body}");
        let r = request(&path, "GET http://localhost/stats?x=1 HTTP/1.0\r\n\r\n");
        let body = r.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(serde_json::from_str::<StatsReport>(body).unwrap(), sample_report());
        assert!(request(&path, "GET /nothing HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(request(&path, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let r = request(&path, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\n"), "{r}");
        server.stop();
        assert!(!path.exists());
    }
}
