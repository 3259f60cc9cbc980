//! The kernel end of a supervised mount: its `/dev/fuse` connection.
//!
//! - [`mount`]: opens `/dev/fuse` and mounts it with mount(2), so that the
//!   supervisor, not a FUSE library inside a daemon, owns the descriptor
//!   and the connection outlives any one daemon.
//! - [`read_init`]: the kernel's INIT request, the first message of a
//!   connection.
//! - [`start_session`]: a fuser session on a connection whose INIT was
//!   answered long ago. fuser insists on a handshake, so it gets one: the
//!   recorded INIT on a socketpair, whose end is then swapped for the real
//!   descriptor (dup3) before the session reads its first request.
//! - [`notify_resend`]: FUSE_NOTIFY_RESEND (Linux 6.9), which puts every
//!   request a daemon had read but not answered back in the queue, for the
//!   next daemon to read.
//! - [`connection_aborted`]: whether the connection is gone (unmounted).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use fuser::{Config, Filesystem, Session, SessionACL};
use nix::mount::MsFlags;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use crate::daemon::MountConfig;
use crate::error::FuseError;
use crate::{FSNAME, FSTYPE};

/// `FUSE_INIT`, the opcode of the first request.
const FUSE_INIT: u32 = 26;
/// `FUSE_NOTIFY_RESEND` of `enum fuse_notify_code`.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// Size of `struct fuse_in_header`.
const IN_HEADER: usize = 40;
/// Size of `struct fuse_out_header`.
const OUT_HEADER: usize = 16;

/// Opens `/dev/fuse` and mounts it read-only on `mountpoint` as type
/// `fuse.naiad`, with the options of `m`. Needs root (CAP_SYS_ADMIN).
pub fn mount(mountpoint: &Path, m: &MountConfig) -> Result<OwnedFd, FuseError> {
    let dev = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/fuse").map_err(FuseError::NoFuseDevice)?;
    let fd = OwnedFd::from(dev);
    let mut data = format!("fd={},rootmode=40000,user_id={},group_id={},default_permissions", fd.as_raw_fd(), nix::unistd::geteuid(), nix::unistd::getegid());
    if m.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MsFlags::MS_RDONLY | MsFlags::MS_NOATIME;
    if !m.suid {
        flags |= MsFlags::MS_NOSUID;
    }
    if !m.dev {
        flags |= MsFlags::MS_NODEV;
    }
    nix::mount::mount(Some(FSNAME), mountpoint, Some(FSTYPE), flags, Some(data.as_str())).map_err(|e| {
        let source = if e == nix::Error::EPERM { io::Error::other("permission denied: mounting needs root (CAP_SYS_ADMIN)") } else { e.into() };
        FuseError::Mount { path: mountpoint.to_path_buf(), source }
    })?;
    Ok(fd)
}

/// Reads the kernel's INIT request from a freshly mounted connection.
pub fn read_init(fuse: &impl AsFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 << 10];
    let n = loop {
        match nix::unistd::read(fuse, &mut buf) {
            Ok(n) => break n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    buf.truncate(n);
    let opcode = buf.get(4..8).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    if n < IN_HEADER || opcode != Some(FUSE_INIT) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("the first FUSE request is not INIT (opcode {opcode:?}, {n} bytes)")));
    }
    Ok(buf)
}

/// Runs fuser's handshake for `fs` against `init` (an INIT request as
/// [`read_init`] returned it), then points the session at `fuse`. Returns
/// the session, ready to run, and fuser's INIT reply.
///
/// The reply is the caller's to deliver: the first daemon of a connection
/// writes it to the kernel; later ones drop it, the kernel having been
/// answered already.
pub fn start_session<FS: Filesystem>(fs: FS, fuse: &impl AsFd, init: &[u8], acl: SessionACL, config: Config) -> io::Result<(Session<FS>, Vec<u8>)> {
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    let session_fd = theirs.as_raw_fd();
    nix::unistd::write(&ours, init)?;
    let session = Session::from_fd(fs, theirs, acl, config)?;
    let mut reply = vec![0u8; 4096];
    let n = nix::unistd::read(&ours, &mut reply)?;
    reply.truncate(n);
    let error = reply.get(4..8).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    if n < OUT_HEADER || error != Some(0) {
        return Err(io::Error::other(format!("the filesystem refused INIT (error {error:?})")));
    }
    // SAFETY: dup3 onto the descriptor the session owns: from now on its
    // number names the FUSE connection instead of the socket (closed
    // atomically by dup3).
    if unsafe { libc::dup3(fuse.as_fd().as_raw_fd(), session_fd, libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((session, reply))
}

/// Writes `reply` (an INIT reply) to the kernel.
pub fn write_reply(fuse: &impl AsFd, reply: &[u8]) -> io::Result<()> {
    let n = nix::unistd::write(fuse, reply)?;
    if n != reply.len() {
        return Err(io::Error::other(format!("short write of the INIT reply ({n} of {} bytes)", reply.len())));
    }
    Ok(())
}

/// Asks the kernel to queue again every request of this connection that a
/// daemon read but did not answer (FUSE_NOTIFY_RESEND).
pub fn notify_resend(fuse: &impl AsFd) -> io::Result<()> {
    let mut msg = [0u8; OUT_HEADER];
    msg[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    nix::unistd::write(fuse, &msg)?;
    Ok(())
}

/// Whether the connection is gone: unmounted, or aborted.
pub fn connection_aborted(fuse: &impl AsFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fuse.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)),
        Err(_) => false,
    }
}
