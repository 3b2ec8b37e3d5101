//! The event loop of this process: one thread that runs every ASGI request's
//! task, started on the first ASGI request (servers and daemons fork after
//! loading the module, and a thread does not survive a fork).
//!
//! Other threads never call Python to reach it: they push an [`Event`] on a
//! Rust queue and, when the queue was empty, write to an eventfd the loop
//! watches (one system call per batch). The loop drains the queue in one
//! callback.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Wake;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use pyo3::prelude::*;

use super::backend::{Backend, Op, Reply};
use super::scope::OwnedHead;
use super::{channel, lifespan};
use crate::common::config::AppSpec;
use crate::common::panic;
use crate::common::transport::Outcome;
use crate::python::{interpreter, ServerInfo};

/// A request for the loop to start.
pub struct NewRequest {
    pub id: u64,
    pub spec: AppSpec,
    pub info: ServerInfo,
    pub head: OwnedHead,
    pub has_body: bool,
    pub backend: Box<dyn Backend>,
}

impl NewRequest {
    /// Ends a request the loop will never run.
    fn refuse(mut self, why: &str) {
        let line = crate::common::log::request_line(&self.head.method, &self.head.request_uri, why);
        self.backend.submit(Op::Log(log::Level::Error, line));
        self.backend.submit(Op::Finish(Outcome::Status(503)));
    }
}

/// What other threads tell the loop.
pub enum Event {
    New(Box<NewRequest>),
    /// The answer to an operation of request `id`.
    Reply(u64, Reply),
    /// Request `id`'s transport may go on (a [`Flow`] woke it).
    ///
    /// [`Flow`]: crate::common::transport::Flow
    Wake(u64),
    /// Format request `id`'s task stack and send it back.
    Stack(u64, crossbeam_channel::Sender<String>),
    /// Cancel request `id`'s task (request-timeout).
    Cancel(u64),
    /// The process is stopping: shut the applications down and stop.
    Shutdown,
}

/// The queue to one loop thread, shared with every thread that posts to it.
pub struct Shared {
    /// Events not drained yet; None once the loop is gone.
    queue: Mutex<Option<Vec<Event>>>,
    /// Readable while the queue has events.
    wakeup: OwnedFd,
    pid: u32,
    /// Disconnects when the loop thread has ended.
    alive: Receiver<()>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Hands `event` to the loop. A loop that is gone refuses new requests at
    /// once (and drops the rest: their senders see the loop vanish).
    pub fn post(&self, event: Event) {
        let mut queue = lock(&self.queue);
        let Some(events) = queue.as_mut() else {
            drop(queue);
            if let Event::New(request) = event {
                request.refuse("the ASGI event loop is not running");
            }
            return;
        };
        let was_empty = events.is_empty();
        events.push(event);
        drop(queue);
        if was_empty {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes we own to the eventfd this struct owns.
            unsafe { libc::write(self.wakeup.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }

    /// The events posted since the last call (the wake-up is reset first, so
    /// that an event posted meanwhile wakes the loop again).
    fn take(&self) -> Vec<Event> {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a buffer we own, from a non-blocking eventfd.
        unsafe { libc::read(self.wakeup.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        lock(&self.queue)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Whether the loop has ended.
    fn is_closed(&self) -> bool {
        lock(&self.queue).is_none()
    }

    /// Marks the loop gone and returns what was still queued.
    fn close(&self) -> Vec<Event> {
        lock(&self.queue).take().unwrap_or_default()
    }
}

/// The loop of this process, unless it is stopping.
static LOOP: Mutex<Option<Arc<Shared>>> = Mutex::new(None);
/// Set by [`shutdown`]: requests that come later are refused.
static STOPPED: Mutex<bool> = Mutex::new(false);

/// Numbers the requests of this process.
pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The loop of this process, started on first use. Never waits for Python.
pub fn get() -> Result<Arc<Shared>, String> {
    if *lock(&STOPPED) {
        return Err("the process is stopping".into());
    }
    let mut slot = lock(&LOOP);
    match slot.as_ref() {
        // A loop that ended (an application's SystemExit escaped it) is
        // replaced, as is one inherited through a fork.
        Some(shared) if shared.pid == std::process::id() && !shared.is_closed() => {
            return Ok(shared.clone())
        }
        _ => {}
    }
    let shared = spawn()?;
    *slot = Some(shared.clone());
    Ok(shared)
}

fn spawn() -> Result<Arc<Shared>, String> {
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let wakeup = unsafe { OwnedFd::from_raw_fd(fd) };
    let (alive_tx, alive) = crossbeam_channel::bounded::<()>(0);
    let shared = Arc::new(Shared {
        queue: Mutex::new(Some(Vec::new())),
        wakeup,
        pid: std::process::id(),
        alive,
        thread: Mutex::new(None),
    });
    let for_thread = shared.clone();
    let thread = crate::common::thread::spawn("gateway-asgi".into(), move || {
        thread_main(for_thread, alive_tx)
    })
    .map_err(|e| format!("starting the ASGI event loop thread: {e}"))?;
    *lock(&shared.thread) = Some(thread);
    Ok(shared)
}

/// Runs the loop until [`shutdown`]; then ends the requests still open, so
/// that no server thread waits for them forever.
fn thread_main(shared: Arc<Shared>, _alive: Sender<()>) {
    let ran = panic::catch(|| {
        interpreter::with_gil(|py| {
            if let Err(e) = run(py, &shared) {
                log::error!("the ASGI event loop failed: {e}");
            }
            channel::end_all(py);
            lifespan::forget(py);
        })
    });
    if let Err(p) = ran {
        log::error!("{p} in the ASGI event loop");
    }
    for event in shared.close() {
        if let Event::New(request) = event {
            request.refuse("the ASGI event loop stopped");
        }
    }
}

fn run(py: Python<'_>, shared: &Arc<Shared>) -> PyResult<()> {
    let event_loop = new_loop(py)?;
    let drain = Bound::new(
        py,
        Drain {
            shared: shared.clone(),
        },
    )?;
    event_loop.call_method1("add_reader", (shared.wakeup.as_raw_fd(), drain))?;
    channel::set_loop(py, &event_loop)?;
    let result = event_loop.call_method0("run_forever").map(drop);
    let _ = event_loop.call_method1("remove_reader", (shared.wakeup.as_raw_fd(),));
    channel::end_all(py);
    let _ = event_loop.call_method0("close");
    result
}

/// uvloop's loop when the application's environment has it, asyncio's
/// otherwise; says which in the log once.
fn new_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let (kind, event_loop) = match py.import("uvloop") {
        Ok(uvloop) => ("uvloop", uvloop.call_method0("new_event_loop")?),
        Err(_) => (
            "asyncio",
            py.import("asyncio")?.call_method0("new_event_loop")?,
        ),
    };
    py.import("asyncio")?
        .call_method1("set_event_loop", (&event_loop,))?;
    log::info!("ASGI event loop: {kind}");
    Ok(event_loop)
}

/// The loop's reader callback for the wake-up fd.
#[pyclass(module = "gateway")]
struct Drain {
    shared: Arc<Shared>,
}

#[pymethods]
impl Drain {
    fn __call__(&self, py: Python<'_>) {
        for event in self.shared.take() {
            panic::guard("the ASGI event loop", (), || handle(py, event));
        }
    }
}

fn handle(py: Python<'_>, event: Event) {
    match event {
        Event::New(request) => channel::begin(py, *request),
        Event::Reply(id, reply) => channel::on_reply(py, id, reply),
        Event::Wake(id) => channel::on_wake(py, id),
        Event::Stack(id, answer) => super::tasks::on_stack(py, id, answer),
        Event::Cancel(id) => super::tasks::on_cancel(py, id),
        Event::Shutdown => lifespan::shutdown_and_stop(py),
    }
}

/// Wakes request `id` on the loop: the [`std::task::Waker`] given to a
/// transport's `poll_*` methods.
pub struct RequestWaker {
    pub id: u64,
    pub shared: Arc<Shared>,
}

impl Wake for RequestWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.post(Event::Wake(self.id));
    }
}

/// How long the applications' lifespan shutdown may take, in all.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// Stops the loop of this process, if it runs: lifespan shutdown for each
/// application (bounded), leftover tasks cancelled, the thread joined. Called
/// once at process exit; a loop that does not stop in time is left behind
/// rather than holding the exit up.
pub fn shutdown() {
    *lock(&STOPPED) = true;
    let Some(shared) = lock(&LOOP).take() else {
        return;
    };
    if shared.pid != std::process::id() {
        return;
    }
    shared.post(Event::Shutdown);
    let wait = SHUTDOWN_WAIT + Duration::from_secs(5);
    match shared.alive.recv_timeout(wait) {
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            if let Some(thread) = lock(&shared.thread).take() {
                let _ = thread.join();
            }
        }
        _ => log::warn!("the ASGI event loop did not stop within {wait:?}; exiting anyway"),
    }
}
