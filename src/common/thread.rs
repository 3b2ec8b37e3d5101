//! Threads the module starts inside a server's processes.
//!
//! A signal sent to a process goes to any of its threads that does not block
//! it. The servers count on their own threads getting them: Apache prefork's
//! handler ends the child from whichever thread it runs on (on the ASGI loop's,
//! it would wait for that very thread), and nginx's only sets a flag that its
//! event loop would not see until its next event. So every thread started here
//! blocks the asynchronous signals, and so do the threads it starts (Python's
//! included): they inherit the mask.

use std::io;
use std::thread::JoinHandle;

/// Signals raised by the faulting thread itself, which must never be blocked.
const SYNCHRONOUS: [libc::c_int; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTRAP,
    libc::SIGSYS,
];

/// Starts the thread `name` running `f`, with every asynchronous signal blocked
/// in it from its first instruction on.
pub fn spawn<F, T>(name: String, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: sigset_t is plain data, filled in by sigfillset before use.
    let mut blocked: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the old mask is written by pthread_sigmask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: builds a set we own, then swaps this thread's mask for it; the new
    // thread inherits it, and this thread's own is restored right after.
    unsafe {
        libc::sigfillset(&mut blocked);
        for sig in SYNCHRONOUS {
            libc::sigdelset(&mut blocked, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, &mut old);
    }
    let spawned = std::thread::Builder::new().name(name).spawn(f);
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked_in_this_thread(sig: libc::c_int) -> bool {
        // SAFETY: reads this thread's mask into a set we own.
        unsafe {
            let mut mask: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask);
            libc::sigismember(&mask, sig) == 1
        }
    }

    #[test]
    fn the_thread_blocks_server_signals_and_the_caller_keeps_its_mask() {
        let before = blocked_in_this_thread(libc::SIGTERM);
        let inside = spawn("t".into(), || {
            [libc::SIGTERM, libc::SIGQUIT, libc::SIGHUP, libc::SIGSEGV].map(blocked_in_this_thread)
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(inside, [true, true, true, false]);
        assert_eq!(blocked_in_this_thread(libc::SIGTERM), before);
    }
}
