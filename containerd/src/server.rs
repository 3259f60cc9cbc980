//! [`serve`]: the snapshots gRPC service on its unix socket, until SIGTERM
//! or SIGINT. A socket path another live process answers on is refused; a
//! stale socket file (nothing listening) is replaced.

use std::path::Path;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::error::SnapshotterError;
use crate::snapshotter::NaiadSnapshotter;

/// Binds `address`, refusing one in use.
pub fn bind(address: &Path) -> Result<UnixListener, SnapshotterError> {
    let fail = |reason: String| SnapshotterError::Socket { path: address.to_path_buf(), reason };
    if std::os::unix::net::UnixStream::connect(address).is_ok() {
        return Err(fail("already in use: another process listens on it (stop it, or choose another address)".into()));
    }
    match std::fs::symlink_metadata(address) {
        Ok(md) if std::os::unix::fs::FileTypeExt::is_socket(&md.file_type()) => {
            std::fs::remove_file(address).map_err(|e| fail(format!("removing the stale socket: {e}")))?;
        }
        Ok(_) => return Err(fail("exists and is not a socket".into())),
        Err(_) => {}
    }
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    }
    UnixListener::bind(address).map_err(|e| fail(e.to_string()))
}

/// Serves `snapshotter` on `listener` until SIGTERM or SIGINT.
pub async fn serve(snapshotter: NaiadSnapshotter, listener: UnixListener, address: &Path) -> Result<(), SnapshotterError> {
    let service = containerd_snapshots::server(std::sync::Arc::new(snapshotter));
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            }
            _ => std::future::pending::<()>().await,
        }
        tracing::info!("stopping: image mounts stay served for running containers");
    };
    tracing::info!("serving containerd's snapshots API on {}", address.display());
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| SnapshotterError::Socket { path: address.to_path_buf(), reason: e.to_string() });
    let _ = std::fs::remove_file(address);
    result
}
