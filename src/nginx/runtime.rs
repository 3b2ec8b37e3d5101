//! Per-worker runtime: the interpreter, the Python threads the module owns, and
//! the eventfd through which those threads wake the event loop. The loop never
//! runs Python; the threads never call nginx.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use std::sync::OnceLock;

use super::config::{MainConfig, DEFAULT_THREADS, MAX_THREADS};
use super::daemons;
use super::exchange::Exchange;
use super::ffi::*;
use super::inherit;
use super::request;
use crate::common::config::DaemonOptions;
use crate::python::interpreter::{self, PythonSettings};
use crate::python::ServerInfo;

/// Work for a Python thread.
pub type Job = Box<dyn FnOnce(&ServerInfo) + Send>;

/// How long `exit_process` waits for the Python threads to finish their requests.
const THREAD_EXIT_WAIT: Duration = Duration::from_secs(10);

/// The same on a fast shutdown (`nginx -s stop`): the master kills workers that linger.
const THREAD_EXIT_WAIT_STOP: Duration = Duration::from_millis(500);

/// How long a worker that was told to quit keeps waiting for running requests.
const QUIT_GRACE: Duration = Duration::from_secs(30);

/// Interval of the timer that keeps a quitting worker alive while requests run.
const BUSY_TICK_MS: ngx_msec_t = 500;

/// Those a worker's threads work for: the embedded applications, or one daemon
/// group (by name). Each may hold at most `limit` threads at once; its jobs
/// beyond that wait in its own queue, so a slow group or application never
/// makes the others wait for a thread.
struct Share {
    group: Option<String>,
    limit: usize,
    /// The group's queue-timeout, which a wait in this worker counts against.
    queue_timeout: Option<Duration>,
    state: Mutex<ShareState>,
}

#[derive(Default)]
struct ShareState {
    /// Threads running this share's jobs.
    running: usize,
    /// Jobs waiting for a thread, and since when.
    waiting: VecDeque<(Instant, Job)>,
}

impl Share {
    fn lock(&self) -> std::sync::MutexGuard<'_, ShareState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `job`, then this share's waiting jobs, on the thread it was given.
    fn run_from(&self, mut job: Job, info: &ServerInfo) {
        loop {
            job(info);
            let mut state = self.lock();
            match state.waiting.pop_front() {
                Some((_, next)) => job = next,
                None => {
                    state.running -= 1;
                    return;
                }
            }
        }
    }

    /// Takes the jobs that waited past the group's queue-timeout.
    fn expired(&self) -> Vec<Job> {
        let Some(limit) = self.queue_timeout else {
            return Vec::new();
        };
        let mut state = self.lock();
        let mut jobs = Vec::new();
        while state
            .waiting
            .front()
            .is_some_and(|(since, _)| since.elapsed() >= limit)
        {
            jobs.extend(state.waiting.pop_front().map(|(_, job)| job));
        }
        jobs
    }
}

/// Each share's thread limit: `threads` split in proportion to `weights`, at
/// least one each.
fn limits(threads: usize, weights: &[usize]) -> Vec<usize> {
    let total = weights.iter().sum::<usize>().max(1);
    weights
        .iter()
        .map(|&w| (threads.saturating_mul(w) / total).max(1))
        .collect()
}

/// The shares of a worker with `cfg`'s applications and `threads` threads: the
/// embedded applications weigh as many threads as they get by default, a
/// daemon group its processes times threads.
fn shares(cfg: &MainConfig, threads: usize) -> Arc<Vec<Share>> {
    let mut holders: Vec<(Option<&DaemonOptions>, usize)> = Vec::new();
    if cfg.embedded > 0 {
        holders.push((None, DEFAULT_THREADS));
    }
    holders.extend(cfg.groups.iter().map(|(d, _)| {
        (
            Some(d),
            (d.processes as usize).saturating_mul(d.threads as usize),
        )
    }));
    let weights: Vec<usize> = holders.iter().map(|(_, w)| *w).collect();
    Arc::new(
        holders
            .into_iter()
            .zip(limits(threads, &weights))
            .map(|((group, _), limit)| Share {
                group: group.map(|d| d.name.clone()),
                limit,
                queue_timeout: group
                    .filter(|d| d.queue_timeout > 0)
                    .map(|d| Duration::from_secs(d.queue_timeout)),
                state: Mutex::default(),
            })
            .collect(),
    )
}

/// What this worker runs requests with, or why it cannot.
pub struct Runtime {
    jobs: Mutex<Option<Sender<Job>>>,
    shares: Arc<Vec<Share>>,
    info: ServerInfo,
    threads: Mutex<Vec<JoinHandle<()>>>,
    wakeup: OwnedFd,
    /// The loop's connection watching `wakeup`.
    watcher: std::sync::atomic::AtomicPtr<ngx_connection_t>,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// Requests handed to Python threads whose `End` the loop has not seen yet.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Requests whose queues have something for the loop.
static READY: Mutex<Vec<Arc<Exchange>>> = Mutex::new(Vec::new());

/// Keeps a quitting worker alive while requests run (nginx waits for timers).
// SAFETY: ngx_event_t is plain C data for which all zeroes is nginx's initial state.
static mut BUSY_TIMER: ngx_event_t = unsafe { std::mem::zeroed() };
static QUIT_SEEN: Mutex<Option<Instant>> = Mutex::new(None);

/// nginx's level for a `log` level.
fn ngx_level(level: log::Level) -> ngx_uint_t {
    (match level {
        log::Level::Error => NGX_LOG_ERR,
        log::Level::Warn => NGX_LOG_WARN,
        log::Level::Info => NGX_LOG_INFO,
        log::Level::Debug | log::Level::Trace => NGX_LOG_DEBUG,
    }) as ngx_uint_t
}

/// Writes a finished line to the worker's error log. Safe from any thread: the
/// cycle's log has no request context to read.
pub fn log_line(level: log::Level, line: &str) {
    let line = crate::common::log::c_line(line);
    // SAFETY: ngx_cycle is set for the worker's life; its log writes with a stack buffer.
    unsafe {
        let cycle = ngx_cycle;
        if !cycle.is_null() {
            gateway_ngx_log((*cycle).log, ngx_level(level), line.as_ptr());
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_init_process(
    cycle: *mut ngx_cycle_t,
    mcf: *mut std::ffi::c_void,
    worker_processes: ngx_int_t,
) -> ngx_int_t {
    // SAFETY: the shim passes the http main record, or NULL without an http block.
    let Some(cfg) = (unsafe { mcf.cast::<MainConfig>().as_ref() }) else {
        return NGX_OK as ngx_int_t;
    };
    // SAFETY: ngx_process is set before init_process runs and only read here.
    let process = unsafe { ngx_process } as u32;
    // With `master_process off` this is the master itself, which keeps the lifeline.
    if process == NGX_PROCESS_WORKER || process == NGX_PROCESS_HELPER {
        daemons::release_lifeline();
    }
    // Cache manager and loader processes run init_process too, but serve no requests.
    if cfg.apps == 0 || process == NGX_PROCESS_HELPER {
        return NGX_OK as ngx_int_t;
    }
    crate::common::log::install(log_line);
    // SAFETY: nginx calls init_process in the worker with its live cycle.
    let runtime = unsafe { start(cycle, cfg, worker_processes) };
    if let Err(e) = &runtime {
        log::error!("{e}");
    }
    let _ = RUNTIME.set(runtime);
    NGX_OK as ngx_int_t
}

unsafe fn start(
    cycle: *mut ngx_cycle_t,
    cfg: &MainConfig,
    worker_processes: ngx_int_t,
) -> Result<Runtime, String> {
    // A worker whose applications all run in daemon groups only forwards: no Python.
    let python = cfg.embedded > 0;
    if python {
        // Applications may start processes: they must not inherit nginx's sockets.
        // SAFETY: init_process, on the loop thread, before it accepts connections.
        unsafe { inherit::protect(cycle) };
        let settings = PythonSettings {
            home: cfg.python_home.clone(),
            path: cfg.python_path.clone(),
        };
        interpreter::initialize(&settings).map_err(|e| e.to_string())?;
    }
    // SAFETY: eventfd has no memory arguments; the fd is ours.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "cannot create an eventfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just created and is owned here only.
    let wakeup = unsafe { OwnedFd::from_raw_fd(fd) };
    // The loop's connection gets a duplicate: closing it at exit leaves `wakeup` valid.
    // SAFETY: F_DUPFD_CLOEXEC has no memory arguments.
    let watched = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if watched < 0 {
        return Err(format!(
            "cannot duplicate the eventfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: cycle is the worker's cycle; the handler lives as long as the module.
    let watcher = unsafe { gateway_ngx_watch_fd(cycle, watched, Some(on_wakeup)) };
    if watcher.is_null() {
        // SAFETY: watched is ours and unused.
        unsafe { libc::close(watched) };
        return Err("cannot watch the wake-up eventfd (worker_connections exhausted?)".into());
    }
    // A thread waits for each request forwarded to a daemon group: by default
    // enough for every daemon thread of every group to be busy, besides the
    // embedded applications' own.
    let daemon_capacity: usize = cfg
        .groups
        .iter()
        .map(|(d, _)| (d.processes as usize).saturating_mul(d.threads as usize))
        .sum();
    let embedded = if python { DEFAULT_THREADS } else { 0 };
    let count = cfg.threads.unwrap_or_else(|| {
        embedded
            .saturating_add(daemon_capacity)
            .clamp(DEFAULT_THREADS, MAX_THREADS)
    });
    let info = ServerInfo {
        server: "nginx",
        mode: "embedded",
        process_group: String::new(),
        multithread: count > 1,
        multiprocess: worker_processes > 1,
        shared_interpreter: cfg.shared_interpreter.unwrap_or(false),
    };
    let (tx, rx) = crossbeam_channel::unbounded::<Job>();
    let mut threads = Vec::with_capacity(count);
    for i in 0..count {
        let rx: Receiver<Job> = rx.clone();
        let info = info.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("gateway-py-{i}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&info);
                }
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => return Err(format!("cannot start Python thread {i}: {e}")),
        }
    }
    if python {
        log::info!(
            "Gateway/{} started Python with {count} thread(s) in worker {}",
            crate::common::VERSION,
            std::process::id()
        );
    } else {
        log::info!(
            "Gateway/{} forwards to daemon groups with {count} thread(s) in worker {} (no Python here)",
            crate::common::VERSION,
            std::process::id()
        );
    }
    Ok(Runtime {
        jobs: Mutex::new(Some(tx)),
        shares: shares(cfg, count),
        info,
        threads: Mutex::new(threads),
        wakeup,
        watcher: std::sync::atomic::AtomicPtr::new(watcher),
    })
}

/// This worker's runtime, or why requests cannot run.
pub fn runtime() -> Result<&'static Runtime, &'static str> {
    match RUNTIME.get() {
        Some(Ok(rt)) => Ok(rt),
        Some(Err(why)) => Err(why),
        None => Err("Python was not started in this worker"),
    }
}

impl Runtime {
    /// Hands a job for daemon group `group` (None: an embedded application) to
    /// the threads, or to the group's queue while it holds its share of them.
    /// Loop thread only.
    pub fn submit(&self, job: Job, group: Option<&str>) -> Result<(), &'static str> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let tx = jobs.as_ref().ok_or("the worker is shutting down")?;
        let index = self
            .shares
            .iter()
            .position(|s| s.group.as_deref() == group)
            .ok_or("its daemon group is not configured in this worker")?;
        let mut state = self.shares[index].lock();
        if state.running < self.shares[index].limit {
            let shares = self.shares.clone();
            let run: Job = Box::new(move |info| shares[index].run_from(job, info));
            tx.send(run)
                .map_err(|_| "the Python threads have stopped")?;
            state.running += 1;
        } else {
            state.waiting.push_back((Instant::now(), job));
        }
        drop(state);
        if RUNNING.fetch_add(1, Ordering::Relaxed) == 0 {
            arm_busy_timer();
        }
        Ok(())
    }
}

impl Runtime {
    /// Lets each job that waited in its group's queue past the group's
    /// queue-timeout answer its 503 (which it does at once, without blocking).
    /// Loop thread only.
    fn answer_expired(&self) {
        for share in self.shares.iter() {
            for job in share.expired() {
                job(&self.info);
            }
        }
    }
}

/// Called by the loop when it has seen a request's `End`.
pub fn job_done() {
    RUNNING.fetch_sub(1, Ordering::Relaxed);
}

/// Tells the loop that `exchange` has pieces for it. Any thread; one eventfd
/// write per batch, however many requests are in it.
pub fn wake(exchange: Arc<Exchange>) {
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    let first = ready.is_empty();
    ready.push(exchange);
    drop(ready);
    if first {
        if let Ok(rt) = runtime() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local to our eventfd.
            unsafe { libc::write(rt.wakeup.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

unsafe extern "C" fn on_wakeup(_ev: *mut ngx_event_t) {
    let Ok(rt) = runtime() else { return };
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into a local from our non-blocking eventfd.
    unsafe { libc::read(rt.wakeup.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    let batch = std::mem::take(&mut *READY.lock().unwrap_or_else(|e| e.into_inner()));
    for exchange in batch {
        request::on_ready(&exchange);
    }
}

fn arm_busy_timer() {
    // SAFETY: the timer event is only touched on the loop thread.
    unsafe {
        let ev = &raw mut BUSY_TIMER;
        if (*ev).timer_set() != 0 {
            return;
        }
        (*ev).handler = Some(on_busy_tick);
        (*ev).log = (*ngx_cycle).log;
        (*ev).set_cancelable(0);
        gateway_ngx_add_timer(ev, BUSY_TICK_MS);
    }
}

unsafe extern "C" fn on_busy_tick(_ev: *mut ngx_event_t) {
    if RUNNING.load(Ordering::Relaxed) == 0 {
        return;
    }
    if let Ok(rt) = runtime() {
        rt.answer_expired();
    }
    // SAFETY: ngx_exiting is written by the loop thread only (signal flags are copied there).
    if unsafe { ngx_exiting } != 0 {
        let mut seen = QUIT_SEEN.lock().unwrap_or_else(|e| e.into_inner());
        let since = *seen.get_or_insert_with(Instant::now);
        if since.elapsed() > QUIT_GRACE {
            log::warn!(
                "worker {} quits with {} request(s) still running after {}s",
                std::process::id(),
                RUNNING.load(Ordering::Relaxed),
                QUIT_GRACE.as_secs()
            );
            return;
        }
    }
    arm_busy_timer();
}

#[no_mangle]
pub unsafe extern "C" fn gateway_exit_process(_cycle: *mut ngx_cycle_t) {
    let Some(Ok(rt)) = RUNTIME.get() else { return };
    // Closing the channel ends each thread after its current request.
    drop(rt.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
    let threads = std::mem::take(&mut *rt.threads.lock().unwrap_or_else(|e| e.into_inner()));
    // SAFETY: ngx_terminate is a flag the loop thread reads and nginx's signal handler sets.
    let stopping = unsafe { ngx_terminate } != 0;
    let deadline = Instant::now()
        + if stopping {
            THREAD_EXIT_WAIT_STOP
        } else {
            THREAD_EXIT_WAIT
        };
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let running = threads.iter().filter(|t| !t.is_finished()).count();
    if running == 0 {
        for t in threads {
            let _ = t.join();
        }
        interpreter::run_exit_handlers();
    } else {
        log::warn!(
            "worker {} exits with {running} Python thread(s) still busy",
            std::process::id()
        );
    }
    let watcher = rt.watcher.swap(std::ptr::null_mut(), Ordering::Relaxed);
    if !watcher.is_null() {
        // SAFETY: watcher is the live connection made in start(); closing it removes the event.
        unsafe { ngx_close_connection(watcher) };
    }
}
