//! [`SocketServer`]: a unix socket served by one background thread, each
//! connection handed to a handler in turn. The daemon's control socket
//! ([`crate::stats_server`]) and its HTTP API socket
//! ([`crate::metrics_server`]) are built on it.
//!
//! Binding replaces a stale socket file (nobody listening) and refuses a
//! live one; stopping removes the file.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::FuseError;

/// Read and write timeout of every connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A listening unix socket and the thread serving it.
pub struct SocketServer {
    path: PathBuf,
    /// The listening socket, to wake the accept loop with shutdown(2) even
    /// when the path no longer leads to it (its directory was removed).
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SocketServer {
    /// Binds `path` and calls `handle` for each connection (with
    /// [`IO_TIMEOUT`] set) on a thread named `name` (also used in logs).
    pub fn start(path: &Path, name: &str, handle: impl Fn(UnixStream) -> std::io::Result<()> + Send + 'static) -> Result<Self, FuseError> {
        let err = |detail: String| FuseError::Stats { path: path.to_path_buf(), detail };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            // Only a stale socket is ours to replace; anything else at the
            // path (a file the user named by mistake) stays.
            if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                return Err(err("the path exists and is not a socket; refusing to replace it".into()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(err("another daemon is already listening there".into()));
            }
            std::fs::remove_file(path).map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
        let waker = listener.try_clone().map_err(|e| err(format!("cannot clone the listener: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(c) => {
                            let setup = c.set_read_timeout(Some(IO_TIMEOUT)).and_then(|_| c.set_write_timeout(Some(IO_TIMEOUT)));
                            if let Err(e) = setup.and_then(|_| handle(c)) {
                                tracing::debug!("{label}: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("{label}: accept: {e}"),
                    }
                }
            })
            .map_err(|e| err(format!("cannot start thread: {e}")))?;
        Ok(SocketServer { path: path.to_path_buf(), listener: waker, stop, thread: Some(thread) })
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
        // Wake the accept loop so it sees the flag: accept(2) on a socket
        // shut down fails at once.
        // SAFETY: shutdown(2) on a descriptor we own.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.listener), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn stops_even_when_its_path_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let server = SocketServer::start(&path, "test", |mut c| c.write_all(b"hi")).unwrap();
        let mut answer = String::new();
        UnixStream::connect(&path).unwrap().read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "hi");
        // Its directory removed (a test's temporary directory, say): the
        // accept loop cannot be woken through the path any more.
        drop(dir);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            server.stop();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("stop() hung");
    }

    #[test]
    fn replaces_a_stale_socket_but_no_other_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("precious");
        std::fs::write(&file, b"keep me").unwrap();
        let e = SocketServer::start(&file, "test", |_| Ok(())).err().expect("a regular file is refused").to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        // A stale socket (nobody listening) is replaced.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        SocketServer::start(&stale, "test", |_| Ok(())).expect("a stale socket is replaced").stop();
    }
}
