//! The one guard every entry from a server (each `extern "C"` function) and
//! every job of a pool thread runs behind. A panic there is a bug in Gateway;
//! it must cost the one request it happened in, never the server process, the
//! thread, or another request. The server answers 500 (or closes the
//! connection if the headers went out) and logs a `gateway:` line that says
//! where it happened.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

/// A panic caught by [`catch`]: what it said and where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panic {
    pub message: String,
    pub location: String,
}

impl fmt::Display for Panic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "internal error (panic at {}: {})",
            self.location, self.message
        )
    }
}

thread_local! {
    /// Where the last panic of this thread happened, kept by the hook for [`catch`].
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
    /// How many [`catch`]es this thread is inside.
    static CATCHING: Cell<usize> = const { Cell::new(0) };
}

/// Replaces the default hook, which writes to stderr (the server's error log,
/// without the `gateway:` prefix). Inside [`catch`] it keeps the location for
/// the caller's log line; elsewhere (a thread without a guard, which the next
/// unwinding ends) it logs the panic itself as a `gateway:` line.
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        panic::set_hook(Box::new(|info| {
            let at = info.location().map_or_else(
                || "an unknown place".into(),
                |l| format!("{}:{}", l.file(), l.line()),
            );
            if CATCHING.get() == 0 {
                log::error!(
                    "internal error (panic at {at}: {}) outside any guard",
                    message(info.payload())
                );
            }
            LOCATION.with(|l| *l.borrow_mut() = Some(at));
        }))
    });
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "no message".into()
    }
}

/// Runs `f`; a panic inside it is caught and returned as a [`Panic`]. The
/// caller logs it with what it knows (the request) and answers.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, Panic> {
    install_hook();
    CATCHING.set(CATCHING.get() + 1);
    let caught = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.set(CATCHING.get() - 1);
    caught.map_err(|payload| Panic {
        message: message(&*payload),
        location: LOCATION
            .with(|l| l.borrow_mut().take())
            .unwrap_or_else(|| "an unknown place".into()),
    })
}

/// Runs `f`, which has no request to answer (a hook, an event handler, a
/// thread's job): a panic is logged with `what` and `fallback` is returned.
pub fn guard<T>(what: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    catch(f).unwrap_or_else(|p| {
        log::error!("{p} in {what}");
        fallback
    })
}

/// Test-only faults: with the cargo feature `fault-injection`, the point named
/// by the environment variable `GATEWAY_FAULT` panics, so the tests can show
/// that the guard holds at each kind of entry. `NAME:FILE` arms the point only
/// while FILE exists, so a test can show that the same thread serves the next
/// request. Without the feature, nothing.
#[cfg(feature = "fault-injection")]
#[track_caller]
pub fn fault_point(name: &str) {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(fault) = FAULT.get_or_init(|| std::env::var(FAULT_VAR).ok()) else {
        return;
    };
    let (point, armed) = match fault.split_once(':') {
        Some((point, file)) => (point, std::path::Path::new(file).exists()),
        None => (fault.as_str(), true),
    };
    if point == name && armed {
        panic!("fault injected at '{name}'");
    }
}

/// Test-only faults (see the `fault-injection` feature): nothing in this build.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fault_point(_name: &str) {}

/// The variable that names the point where a fault-injection build panics.
pub const FAULT_VAR: &str = "GATEWAY_FAULT";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message_and_place() {
        let p = catch(|| -> u8 { panic!("broken {}", 42) }).unwrap_err();
        assert_eq!(p.message, "broken 42");
        assert!(
            p.location.starts_with("src/common/panic.rs:"),
            "{}",
            p.location
        );
        assert!(p
            .to_string()
            .starts_with("internal error (panic at src/common/panic.rs:"));
        assert_eq!(catch(|| 7), Ok(7));
        assert_eq!(guard("a test", 1, || -> i32 { panic!("x") }), 1);
    }
}
