//! `gateway-daemon`: the supervisor and the daemon processes of Gateway's daemon
//! mode. The server modules start it (`gateway-daemon supervisor`), and the
//! supervisor starts the daemons (`gateway-daemon worker`); it is not meant to be
//! run by hand.

use std::ffi::{c_char, c_int};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use gateway::common::panic;
use gateway::daemon::process::{self, ArgvArea};
use gateway::daemon::{supervisor, worker};

static ARGV_START: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static ARGV_LEN: AtomicUsize = AtomicUsize::new(0);

/// Records where the argv strings live, so the process title can overwrite them.
/// glibc passes argc/argv/envp to `.init_array` functions of the executable.
///
/// It runs before `main`, so without the panic guard (whose hook and logger do
/// not exist yet); it needs none: it only reads argv and stores to atomics, and
/// has no path that can panic (no indexing, no arithmetic that can overflow).
extern "C" fn capture_argv(argc: c_int, argv: *const *mut c_char, _envp: *const *mut c_char) {
    let Some(last_index) = usize::try_from(argc).ok().and_then(|n| n.checked_sub(1)) else {
        return;
    };
    if argv.is_null() {
        return;
    }
    // SAFETY: argv holds argc NUL-terminated strings, laid out one after another by the kernel.
    unsafe {
        let first = *argv;
        let last = *argv.add(last_index);
        if first.is_null() || last.is_null() {
            return;
        }
        let end = last.add(std::ffi::CStr::from_ptr(last).to_bytes().len());
        let Ok(len) = usize::try_from(end.offset_from(first)) else {
            return;
        };
        ARGV_START.store(first.cast(), Ordering::Relaxed);
        ARGV_LEN.store(len.saturating_add(1), Ordering::Relaxed);
    }
}

#[used]
#[link_section = ".init_array"]
static CAPTURE_ARGV: extern "C" fn(c_int, *const *mut c_char, *const *mut c_char) = capture_argv;

fn main() {
    let argv = ArgvArea {
        start: ARGV_START.load(Ordering::Relaxed),
        len: ARGV_LEN.load(Ordering::Relaxed),
    };
    let role = std::env::args().nth(1);
    // The supervisor and the daemons guard their own loops; this catches a
    // panic anywhere else (at start-up), so that it is logged as a gateway: line.
    let panicked = panic::catch(|| match role.as_deref() {
        Some("supervisor") => supervisor::run(),
        Some("worker") => worker::run(Some(argv)),
        _ => {
            eprintln!("gateway-daemon is started by the Gateway server modules (daemon mode), not by hand");
            std::process::exit(2);
        }
    });
    // Both roles end the process themselves: only a panic returns here.
    if let Err(p) = panicked {
        process::log_to_stderr();
        let role = role.as_deref().unwrap_or("gateway-daemon");
        log::error!("{p} in the daemon {role} process; exiting");
    }
    // SAFETY: ends the process at once; a daemon's other threads may still run Python code.
    unsafe { libc::_exit(EXIT_PANIC) }
}

/// The exit status after a panic (EX_SOFTWARE): the supervisor reports it.
const EXIT_PANIC: c_int = 70;
