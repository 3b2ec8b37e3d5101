//! slow-request for embedded applications (`GatewaySlowRequest`,
//! `gateway_slow_request`), as PHP-FPM's slowlog: the requests running in this
//! process, and a thread that logs the Python stack of one still running after
//! the limit, once, under its method and URI, and lets it go on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::{asgi, interpreter};
use crate::common::cgi::RequestHead;
use crate::common::log::request_line;

/// The limit of this process, once configured (never when off).
static LIMIT: OnceLock<Duration> = OnceLock::new();

static RUNNING: LazyLock<Mutex<HashMap<u64, Entry>>> = LazyLock::new(Default::default);

/// How often the watcher looks at the running requests.
const TICK: Duration = Duration::from_millis(200);

/// Where a request's Python code runs.
#[derive(Clone, Copy)]
enum Runs {
    /// In a server thread (WSGI, or the thread that drives an ASGI task).
    Thread(libc::pthread_t),
    /// In an ASGI task on the event loop, with no thread of its own.
    Task(u64),
}

#[derive(Clone)]
struct Entry {
    started: Instant,
    runs: Runs,
    method: Box<[u8]>,
    uri: Box<[u8]>,
    reported: bool,
}

fn running() -> MutexGuard<'static, HashMap<u64, Entry>> {
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Watches this process's requests from now on (0 seconds: never). Called
/// once per process, after the server forked it.
pub fn configure(seconds: u64) {
    if seconds == 0 || LIMIT.set(Duration::from_secs(seconds)).is_err() {
        return;
    }
    let spawned = crate::common::thread::spawn("gateway-slow".into(), watch);
    if let Err(e) = spawned {
        log::error!("cannot start the thread that logs slow requests: {e}");
    }
}

/// A request being watched, until dropped.
pub struct Watched(Option<u64>);

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(key) = self.0 {
            running().remove(&key);
        }
    }
}

fn enter(head: &RequestHead<'_>, runs: Runs) -> Watched {
    if LIMIT.get().is_none() {
        return Watched(None);
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let key = NEXT.fetch_add(1, Ordering::Relaxed);
    let entry = Entry {
        started: Instant::now(),
        runs,
        method: head.method.into(),
        uri: head.request_uri.into(),
        reported: false,
    };
    running().insert(key, entry);
    Watched(Some(key))
}

/// Watches the request this thread runs.
pub fn watch_thread(head: &RequestHead<'_>) -> Watched {
    // SAFETY: pthread_self has no preconditions.
    enter(head, Runs::Thread(unsafe { libc::pthread_self() }))
}

/// Watches ASGI request `id`, run on the loop without a thread.
pub fn watch_task(head: &RequestHead<'_>, id: u64) -> Watched {
    enter(head, Runs::Task(id))
}

fn watch() {
    let Some(&limit) = LIMIT.get() else { return };
    loop {
        std::thread::sleep(TICK);
        let slow: Vec<Entry> = running()
            .values_mut()
            .filter(|e| !e.reported && e.started.elapsed() > limit)
            .map(|e| {
                e.reported = true;
                e.clone()
            })
            .collect();
        for e in slow {
            report(e.runs, &e.method, &e.uri, limit);
        }
    }
}

/// Logs the stack of a slow request, each line under its method and URI.
fn report(runs: Runs, method: &[u8], uri: &[u8], limit: Duration) {
    // The server's logger adds the `gateway: ` of every module line.
    let log = |line: &str| {
        let line = request_line(method, uri, line);
        log::warn!("{}", line.trim_start_matches("gateway: "));
    };
    log(&format!(
        "process {}: the request has run for more than slow-request={}s; its Python stack follows (the request goes on)",
        std::process::id(),
        limit.as_secs()
    ));
    let stack = match runs {
        Runs::Task(id) => asgi::tasks::stack_of_request(id),
        Runs::Thread(thread) => asgi::tasks::stack(thread).unwrap_or_else(|| {
            interpreter::with_gil(|py| {
                thread_stack(py, thread, "Stack of the slow request's thread")
            })
        }),
    };
    for line in stack.lines() {
        log(line);
    }
}

/// The Python stack of a thread, formatted like a traceback under `title`.
pub fn thread_stack(py: Python<'_>, thread: libc::pthread_t, title: &str) -> String {
    let stack = (|| -> PyResult<String> {
        let frames = py.import("sys")?.call_method0("_current_frames")?;
        let Some(frame) = frames
            .call_method1("get", (thread,))
            .ok()
            .filter(|f| !f.is_none())
        else {
            return Ok("(the thread is not running Python code)".into());
        };
        let lines: Vec<String> = py
            .import("traceback")?
            .call_method1("format_stack", (frame,))?
            .extract()?;
        Ok(format!(
            "{title} (most recent call last):\n{}",
            lines.concat()
        ))
    })();
    stack.unwrap_or_else(|e| format!("(cannot read the Python stack: {e})"))
}
