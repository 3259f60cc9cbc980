//! Stop signals during `naiad run`: [`StopSignals`] catches SIGINT, SIGTERM,
//! SIGHUP and SIGQUIT for the whole run. Before the command runs, a signal
//! is only noted ([`stop_signal`]), so the setup can stop at its next step
//! and clean up; while it runs, signals are passed on to the OCI runtime
//! process ([`forward_to`]), which hands them to the container.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

/// The pid signals are forwarded to (0: none).
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);
/// Set when a signal asking the command to stop arrived (SIGHUP does not).
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// The last stop signal that arrived (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig != libc::SIGHUP {
        STOP_REQUESTED.store(true, Ordering::SeqCst);
    }
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

const CAUGHT: [Signal; 4] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT];

/// The caught signals, until dropped (then the previous handlers return).
pub struct StopSignals {
    previous: Vec<(Signal, SigAction)>,
}

impl StopSignals {
    pub fn catch() -> Self {
        let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
        let mut previous = Vec::new();
        for sig in CAUGHT {
            // SAFETY: the handler only touches atomics and calls kill(2).
            if let Ok(old) = unsafe { sigaction(sig, &action) } {
                previous.push((sig, old));
            }
        }
        StopSignals { previous }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        FORWARD_TO.store(0, Ordering::SeqCst);
        for (sig, old) in self.previous.drain(..) {
            // SAFETY: restores what was installed before.
            let _ = unsafe { sigaction(sig, &old) };
        }
    }
}

/// The stop signal that arrived while [`StopSignals`] were caught, if any.
pub fn stop_signal() -> Option<i32> {
    Some(STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Whether a signal asking the command to stop arrived.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Passes caught signals on to `pid` from now on (`None`: no longer).
pub fn forward_to(pid: Option<Pid>) {
    FORWARD_TO.store(pid.map(Pid::as_raw).unwrap_or(0), Ordering::SeqCst);
}
