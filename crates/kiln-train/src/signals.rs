//! SIGINT / SIGTERM / SIGUSR1: while the run loads (data, tokenizer, weights: reads that may block), a
//! signal ends the process at once, since nothing is half-written then. Once training runs, the
//! first one asks the run to stop after the current step and write a checkpoint; a second SIGINT
//! exits at once (the last complete checkpoint stays intact, since checkpoints are renamed into
//! place only when whole).
//!
//! Under `mpirun` a Ctrl-C reaches mpirun alone, which sends the ranks SIGTERM and kills them
//! `odls_base_sigkill_timeout` seconds later (1 by default); SIGUSR1 it forwards at once and
//! leaves the ranks to end. So SIGUSR1 asks for the same checkpoint and stop as SIGINT.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static REQUESTED: AtomicI32 = AtomicI32::new(0);
static LOADING: AtomicBool = AtomicBool::new(true);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if LOADING.load(Ordering::SeqCst)
        || (sig == libc::SIGINT && REQUESTED.load(Ordering::SeqCst) != 0)
    {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    REQUESTED.store(sig, Ordering::SeqCst);
}

/// Marks the end of loading: from now on a signal asks for a checkpoint (the trainer calls it
/// just before its first step).
pub fn loading_done() {
    LOADING.store(false, Ordering::SeqCst);
}

/// Installs the handlers (the CLI does; library users keep their own).
pub fn install() {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: a plain handler that only touches an atomic or calls _exit.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// The signal that asked the run to stop, if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// A signal's conventional name.
pub fn name(sig: i32) -> &'static str {
    #[cfg(unix)]
    {
        if sig == libc::SIGINT {
            return "SIGINT";
        }
        if sig == libc::SIGTERM {
            return "SIGTERM";
        }
        if sig == libc::SIGUSR1 {
            return "SIGUSR1";
        }
    }
    "signal"
}
