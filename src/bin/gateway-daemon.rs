//! `gateway-daemon`: the supervisor and the daemon processes of Gateway's daemon
//! mode. The server modules start it (`gateway-daemon supervisor`), and the
//! supervisor starts the daemons (`gateway-daemon worker`); it is not meant to be
//! run by hand.

use std::ffi::{c_char, c_int};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use gateway::daemon::{process::ArgvArea, supervisor, worker};

static ARGV_START: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static ARGV_LEN: AtomicUsize = AtomicUsize::new(0);

/// Records where the argv strings live, so the process title can overwrite them.
/// glibc passes argc/argv/envp to `.init_array` functions of the executable.
extern "C" fn capture_argv(argc: c_int, argv: *const *mut c_char, _envp: *const *mut c_char) {
    if argc < 1 || argv.is_null() {
        return;
    }
    // SAFETY: argv holds argc NUL-terminated strings, laid out one after another by the kernel.
    unsafe {
        let first = *argv;
        let last = *argv.add(argc as usize - 1);
        if first.is_null() || last.is_null() {
            return;
        }
        let end = last.add(std::ffi::CStr::from_ptr(last).to_bytes().len());
        ARGV_START.store(first.cast(), Ordering::Relaxed);
        ARGV_LEN.store(end.offset_from(first) as usize + 1, Ordering::Relaxed);
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
    match std::env::args().nth(1).as_deref() {
        Some("supervisor") => supervisor::run(),
        Some("worker") => worker::run(Some(argv)),
        _ => {
            eprintln!("gateway-daemon is started by the Gateway server modules (daemon mode), not by hand");
            std::process::exit(2);
        }
    }
}
