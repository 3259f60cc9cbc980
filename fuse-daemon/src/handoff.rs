//! What a supervisor and the daemons it starts say to each other.
//!
//! Each daemon is started with one end of a `SOCK_SEQPACKET` socketpair as
//! file descriptor [`DAEMON_CHANNEL_FD`]. Over it the supervisor sends one
//! [`Handoff`], JSON with the mount's `/dev/fuse` descriptor attached
//! (SCM_RIGHTS), and the daemon answers with one [`DaemonMessage`]: ready
//! to serve, or why it cannot. The daemon's whole configuration travels in
//! the handoff ([`DaemonConfig`]), never as arguments or environment, so
//! credentials stay off command lines and nothing is parsed twice.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use naiad_registry::RegistryOptions;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::daemon::ServeConfig;

/// The descriptor number of the channel in a daemon.
pub const DAEMON_CHANNEL_FD: RawFd = 3;
/// Largest message either side accepts.
const MAX_MESSAGE: usize = 1 << 20;

/// Everything a daemon needs to serve one mount: the image, how to reach
/// its registry, and how to serve it.
#[derive(Clone, Serialize, Deserialize)]
pub struct DaemonConfig {
    /// The image reference (`oci:/abs/dir:tag`, `docker://...`).
    pub source: String,
    pub registry: RegistryOptions,
    pub serve: ServeConfig,
    /// Where the daemon's output goes once the mount is ready.
    pub log_file: PathBuf,
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The registry options hold credentials: never printed.
        f.debug_struct("DaemonConfig").field("source", &self.source).field("serve", &self.serve).field("log_file", &self.log_file).finish_non_exhaustive()
    }
}

/// Why a daemon is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartCause {
    /// The first daemon of a new mount: it answers the kernel's INIT.
    First,
    /// Its predecessor died at `died_at_ns` (CLOCK_MONOTONIC).
    Restart { died_at_ns: u64 },
    /// A live upgrade: its predecessor is still serving.
    Upgrade,
}

/// The supervisor's one message to a daemon (with the FUSE descriptor).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handoff {
    pub config: DaemonConfig,
    /// 1 for the first daemon of the mount, then counting up.
    pub generation: u64,
    pub supervisor_pid: u32,
    pub cause: StartCause,
    /// The INIT request the kernel sent the first daemon; `None` for the
    /// first daemon itself, which reads it from the connection.
    pub init_request: Option<Vec<u8>>,
}

/// A daemon's one answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DaemonMessage {
    /// The session is set up on the connection and about to serve.
    Ready { pid: u32, init_request: Vec<u8> },
    /// The daemon cannot serve (bad image, unreachable registry, ...).
    Failed { message: String },
}

/// Sends `msg` as JSON with `fds` attached.
pub fn send(channel: &impl AsFd, msg: &impl Serialize, fds: &[RawFd]) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(io::Error::other(format!("message of {} bytes is over the limit of {MAX_MESSAGE}", bytes.len())));
    }
    let iov = [IoSlice::new(&bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(channel.as_fd().as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one message and the descriptors attached to it; `None` when
/// the other side has closed the channel.
pub fn receive<T: DeserializeOwned>(channel: &impl AsFd) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (len, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(channel.as_fd().as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => {
                let mut fds = Vec::new();
                for c in m.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: descriptors the kernel just installed for us.
                        fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                break (m.bytes, fds, m.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC));
            }
            Err(nix::Error::EINTR) => continue,
            // The other side exited without reading what we sent.
            Err(nix::Error::ECONNRESET) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message truncated"));
    }
    let msg = serde_json::from_slice(&buf[..len]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))?;
    Ok(Some((msg, fds)))
}

/// Nanoseconds of CLOCK_MONOTONIC, which every process of the machine shares.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::io::{Read, Seek, Write};

    #[test]
    fn messages_carry_descriptors() {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"shared").unwrap();
        let msg = DaemonMessage::Ready { pid: 7, init_request: vec![1, 2, 3] };
        send(&a, &msg, &[file.as_raw_fd()]).unwrap();
        let (got, fds): (DaemonMessage, _) = receive(&b).unwrap().unwrap();
        assert!(matches!(got, DaemonMessage::Ready { pid: 7, ref init_request } if init_request == &[1, 2, 3]));
        assert_eq!(fds.len(), 1);
        let mut other = std::fs::File::from(fds.into_iter().next().unwrap());
        other.rewind().unwrap();
        let mut text = String::new();
        other.read_to_string(&mut text).unwrap();
        assert_eq!(text, "shared", "the descriptor names the same open file");
        send(&a, &DaemonMessage::Failed { message: "no".into() }, &[]).unwrap();
        let (got, fds): (DaemonMessage, _) = receive(&b).unwrap().unwrap();
        assert!(matches!(got, DaemonMessage::Failed { .. }) && fds.is_empty());
        drop(a);
        assert!(receive::<DaemonMessage>(&b).unwrap().is_none(), "a closed channel reads as None");
    }

    #[test]
    fn garbage_is_an_error() {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        nix::unistd::write(&a, b"{not json").unwrap();
        assert!(receive::<DaemonMessage>(&b).is_err());
    }
}
