//! Per-worker runtime: the interpreter, the Python threads the module owns, and
//! the eventfd through which those threads wake the event loop. The loop never
//! runs Python; the threads never call nginx.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::config::{MainConfig, DEFAULT_THREADS, MAX_THREADS};
use super::daemons;
use super::exchange::Exchange;
use super::ffi::*;
use super::inherit;
use super::records::{self, Cycle, LoopThread, Timer, Watcher};
use super::request;
use crate::common::config::AppSpec;
use crate::common::config::DaemonOptions;
use crate::common::log::escape_controls;
use crate::common::panic::{catch, fault_point, guard};
use crate::ops::scoreboard;
use crate::python::interpreter::{self, PythonSettings};
use crate::python::{self, ServerInfo};

/// Work for a module thread: one request, and the exchange that ends its
/// response should the work fail.
pub struct Job {
    exchange: Arc<Exchange>,
    work: Box<dyn FnOnce(&ServerInfo) + Send>,
}

impl Job {
    pub fn new(exchange: Arc<Exchange>, work: impl FnOnce(&ServerInfo) + Send + 'static) -> Job {
        Job {
            exchange,
            work: Box::new(work),
        }
    }

    /// Runs the request. A panic in it costs that request only: it is logged
    /// with its method and URI, and its response ends (a 500, or cut short once
    /// its head went out), so that the loop finishes it and counts it done.
    fn run(self, info: &ServerInfo) {
        let Job { exchange, work } = self;
        let ran = catch(|| {
            fault_point("nginx-job");
            work(info)
        });
        if let Err(p) = ran {
            log_line(log::Level::Error, &exchange.request_line(&p.to_string()));
            exchange.end_failed(wake);
        }
    }
}

/// What a module thread is given: a share's turn ([`Share::run_from`]).
type Task = Box<dyn FnOnce(&ServerInfo) + Send>;

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
    /// The thread stops counting as running this share in the same lock that
    /// finds no job waiting (so that no job is queued behind a thread that
    /// leaves), or, should a panic get past [`Job::run`]'s own guard, as it unwinds.
    fn run_from(&self, mut job: Job, info: &ServerInfo) {
        struct Unwinding<'a>(Option<&'a Share>);
        impl Drop for Unwinding<'_> {
            fn drop(&mut self) {
                if let Some(share) = self.0 {
                    share.lock().running -= 1;
                }
            }
        }
        let mut unwinding = Unwinding(Some(self));
        loop {
            job.run(info);
            let mut state = self.lock();
            match state.waiting.pop_front() {
                Some((_, next)) => job = next,
                None => {
                    state.running -= 1;
                    unwinding.0 = None;
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
    tasks: Mutex<Option<Sender<Task>>>,
    shares: Arc<Vec<Share>>,
    info: ServerInfo,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The eventfd through which the threads wake the loop.
    wakeup: File,
    /// The loop's connection watching `wakeup`.
    watcher: Watcher,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// Requests handed to Python threads whose `End` the loop has not seen yet.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Requests whose queues have something for the loop.
static READY: Mutex<Vec<Arc<Exchange>>> = Mutex::new(Vec::new());

/// Keeps a quitting worker alive while requests run (nginx waits for timers).
static BUSY_TIMER: Timer = Timer::new();
static QUIT_SEEN: Mutex<Option<(Instant, usize)>> = Mutex::new(None);

/// Requests whose `End` the loop has seen, for the drain's report.
static FINISHED: AtomicUsize = AtomicUsize::new(0);

/// nginx's level for a `log` level.
fn ngx_level(level: log::Level) -> u32 {
    match level {
        log::Level::Error => NGX_LOG_ERR,
        log::Level::Warn => NGX_LOG_WARN,
        log::Level::Info => NGX_LOG_INFO,
        log::Level::Debug | log::Level::Trace => NGX_LOG_DEBUG,
    }
}

/// Writes a finished line to the worker's error log. Safe from any thread: the
/// cycle's log has no request context to read.
pub fn log_line(level: log::Level, line: &str) {
    records::log_current(ngx_level(level), &escape_controls(line));
}

#[no_mangle]
pub unsafe extern "C" fn gateway_init_process(
    cycle: *mut ngx_cycle_t,
    mcf: *mut std::ffi::c_void,
    worker_processes: ngx_int_t,
) -> ngx_int_t {
    // SAFETY: nginx passes the worker's live cycle; the shim the http main record
    // (made by gateway_create_main_conf), or NULL without an http block.
    let (cycle, cfg) = unsafe { (Cycle::from_raw(cycle), mcf.cast::<MainConfig>().as_ref()) };
    // A panic costs this worker its applications, as a failed start does (their
    // requests get a 500), not the worker: nginx would not start another.
    if let Err(p) = catch(|| init_process(cycle, cfg, worker_processes)) {
        cycle.log(NGX_LOG_ERR, &format!("gateway: {p} in the worker's start"));
        let _ = RUNTIME.set(Err(p.to_string()));
    }
    records::OK
}

fn init_process(cycle: Cycle<'_>, cfg: Option<&MainConfig>, worker_processes: ngx_int_t) {
    let Some(cfg) = cfg else { return };
    let process = records::process_kind(cycle.loop_thread());
    // With `master_process off` this is the master itself, which keeps the lifeline.
    if process == NGX_PROCESS_WORKER || process == NGX_PROCESS_HELPER {
        daemons::release_lifeline();
    }
    // Cache manager and loader processes run init_process too, but serve no requests.
    if cfg.apps == 0 || process == NGX_PROCESS_HELPER {
        return;
    }
    crate::common::log::install(log_line);
    let runtime = start(cycle, cfg, worker_processes);
    match &runtime {
        Ok(_) if cfg.embedded > 0 => {
            scoreboard::claim_embedded(thread_count(cfg, true) as u32);
        }
        Ok(_) => {}
        Err(e) => log::error!("{e}"),
    }
    let _ = RUNTIME.set(runtime);
}

fn start(
    cycle: Cycle<'_>,
    cfg: &MainConfig,
    worker_processes: ngx_int_t,
) -> Result<Runtime, String> {
    // A worker whose applications all run in daemon groups only forwards: no Python.
    let python = cfg.embedded > 0;
    if python {
        start_python(cycle, cfg)?;
    }
    let (wakeup, watcher) = watch_wakeups(cycle)?;
    let count = thread_count(cfg, python);
    let info = ServerInfo {
        server: "nginx",
        mode: "embedded",
        process_group: String::new(),
        multithread: count > 1,
        multiprocess: worker_processes > 1,
        shared_interpreter: cfg.shared_interpreter.unwrap_or(false),
    };
    if python {
        python::slow::configure(cfg.slow_request.unwrap_or(0));
    }
    if python && cfg.preload == Some(true) {
        preload(&cfg.embedded_apps, &info);
    }
    let (tx, rx) = crossbeam_channel::unbounded::<Task>();
    let threads = spawn_threads(count, &info, &rx)?;
    log_started(python, count);
    Ok(Runtime {
        tasks: Mutex::new(Some(tx)),
        shares: shares(cfg, count),
        info,
        threads: Mutex::new(threads),
        wakeup,
        watcher,
    })
}

/// `gateway_preload on`: imports the embedded applications before the worker
/// takes a request. One that fails is logged, and imported again at its first
/// request.
fn preload(apps: &[AppSpec], info: &ServerInfo) {
    let started = Instant::now();
    let loaded = apps
        .iter()
        .filter(|app| match python::load(app, info) {
            Ok(()) => true,
            Err(e) => {
                log::error!(
                    "preloading {} failed; it is imported again at its first request:\n{e}",
                    app.file.display()
                );
                false
            }
        })
        .count();
    log::info!(
        "worker {} preloaded {loaded} of {} application(s) in {:.2}s",
        std::process::id(),
        apps.len(),
        started.elapsed().as_secs_f64()
    );
}

fn start_python(cycle: Cycle<'_>, cfg: &MainConfig) -> Result<(), String> {
    // Applications may start processes: they must not inherit nginx's sockets.
    inherit::protect(cycle);
    let settings = PythonSettings {
        home: cfg.python_home.clone(),
        path: cfg.python_path.clone(),
    };
    interpreter::initialize(&settings).map_err(|e| e.to_string())
}

/// The eventfd the threads wake the loop through, and the loop's watch of it.
fn watch_wakeups(cycle: Cycle<'_>) -> Result<(File, Watcher), String> {
    // SAFETY: eventfd has no memory arguments; the descriptor it returns is ours alone.
    let wakeup = unsafe {
        let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        if fd < 0 {
            return Err(format!(
                "cannot create an eventfd: {}",
                std::io::Error::last_os_error()
            ));
        }
        File::from(OwnedFd::from_raw_fd(fd))
    };
    // The loop's connection gets a duplicate: closing it at exit leaves `wakeup` valid.
    let watched = wakeup
        .try_clone()
        .map_err(|e| format!("cannot duplicate the eventfd: {e}"))?;
    let watcher = cycle
        .watch(watched.into(), on_wakeup)
        .ok_or("cannot watch the wake-up eventfd (worker_connections exhausted?)")?;
    Ok((wakeup, watcher))
}

/// The worker's threads: `gateway_threads`, or by default one for each request
/// forwarded to a daemon group that its daemon threads can take at once, besides
/// the embedded applications' own.
fn thread_count(cfg: &MainConfig, python: bool) -> usize {
    let daemon_capacity: usize = cfg
        .groups
        .iter()
        .map(|(d, _)| (d.processes as usize).saturating_mul(d.threads as usize))
        .sum();
    let embedded = if python { DEFAULT_THREADS } else { 0 };
    cfg.threads.unwrap_or_else(|| {
        embedded
            .saturating_add(daemon_capacity)
            .clamp(DEFAULT_THREADS, MAX_THREADS)
    })
}

fn spawn_threads(
    count: usize,
    info: &ServerInfo,
    rx: &Receiver<Task>,
) -> Result<Vec<JoinHandle<()>>, String> {
    (0..count)
        .map(|i| {
            let (rx, info) = (rx.clone(), info.clone());
            crate::common::thread::spawn(format!("gateway-py-{i}"), move || serve(&rx, &info))
                .map_err(|e| format!("cannot start Python thread {i}: {e}"))
        })
        .collect()
}

/// A module thread: runs what it is given until the worker closes the channel.
fn serve(rx: &Receiver<Task>, info: &ServerInfo) {
    while let Ok(task) = rx.recv() {
        // Each job guards itself (Job::run); this keeps the thread should the rest fail.
        guard("a Python thread's task", (), || task(info));
    }
}

fn log_started(python: bool, count: usize) {
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
    pub fn submit(
        &self,
        job: Job,
        group: Option<&str>,
        lt: LoopThread,
    ) -> Result<(), &'static str> {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let tx = tasks.as_ref().ok_or("the worker is shutting down")?;
        let index = self
            .shares
            .iter()
            .position(|s| s.group.as_deref() == group)
            .ok_or("its daemon group is not configured in this worker")?;
        let mut state = self.shares[index].lock();
        if state.running < self.shares[index].limit {
            let shares = self.shares.clone();
            let run: Task = Box::new(move |info| shares[index].run_from(job, info));
            tx.send(run)
                .map_err(|_| "the Python threads have stopped")?;
            state.running += 1;
        } else {
            state.waiting.push_back((Instant::now(), job));
        }
        drop(state);
        self.count_running(lt);
        Ok(())
    }

    /// What the interpreter of this worker knows of its server.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// Counts a request whose application runs until the loop sees its `End`
    /// ([`job_done`]): a quitting worker waits for it. Loop thread only.
    pub fn count_running(&self, lt: LoopThread) {
        if RUNNING.fetch_add(1, Ordering::Relaxed) == 0 {
            BUSY_TIMER.arm(lt, on_busy_tick, BUSY_TICK_MS);
        }
    }

    /// Lets each job that waited in its group's queue past the group's
    /// queue-timeout answer its 503 (which it does at once, without blocking).
    /// Loop thread only.
    fn answer_expired(&self) {
        for share in self.shares.iter() {
            for job in share.expired() {
                job.run(&self.info);
            }
        }
    }
}

/// Called by the loop when it has seen a request's `End`.
pub fn job_done() {
    RUNNING.fetch_sub(1, Ordering::Relaxed);
    FINISHED.fetch_add(1, Ordering::Relaxed);
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
            let _ = (&rt.wakeup).write(&1u64.to_ne_bytes());
        }
    }
}

/// The loop's handler of the wake-up eventfd: sends what the threads queued.
extern "C" fn on_wakeup(_ev: *mut ngx_event_t) {
    guard("the wake-up handler", (), || {
        let Ok(rt) = runtime() else { return };
        let _ = (&rt.wakeup).read(&mut [0u8; 8]);
        let batch = std::mem::take(&mut *READY.lock().unwrap_or_else(|e| e.into_inner()));
        for exchange in batch {
            // Guarded for each request: a panic costs that one, not the rest of the batch.
            request::on_ready(&exchange);
        }
    })
}

extern "C" fn on_busy_tick(_ev: *mut ngx_event_t) {
    // SAFETY: nginx runs timer handlers on its loop thread.
    let lt = unsafe { LoopThread::assume() };
    guard("the busy timer", (), || busy_tick(lt))
}

fn busy_tick(lt: LoopThread) {
    if RUNNING.load(Ordering::Relaxed) == 0 {
        return;
    }
    if let Ok(rt) = runtime() {
        rt.answer_expired();
    }
    if records::exiting(lt) {
        let mut seen = QUIT_SEEN.lock().unwrap_or_else(|e| e.into_inner());
        let (since, _) =
            *seen.get_or_insert_with(|| (Instant::now(), FINISHED.load(Ordering::Relaxed)));
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
    BUSY_TIMER.arm(lt, on_busy_tick, BUSY_TICK_MS);
}

#[no_mangle]
pub extern "C" fn gateway_exit_process(_cycle: *mut ngx_cycle_t) {
    // SAFETY: nginx runs exit_process on the worker's loop thread.
    let lt = unsafe { LoopThread::assume() };
    guard("the worker's exit", (), || exit_process(lt))
}

/// How many requests the worker let finish since it was told to quit, and how
/// long that took (from the first busy tick that saw it quitting).
fn log_drain() {
    let seen = *QUIT_SEEN.lock().unwrap_or_else(|e| e.into_inner());
    match seen {
        Some((since, finished)) => log::info!(
            "worker {} drained {} request(s) in {:.2}s",
            std::process::id(),
            FINISHED.load(Ordering::Relaxed) - finished,
            since.elapsed().as_secs_f64()
        ),
        None => log::info!(
            "worker {} drained 0 request(s): none was running when it was told to quit",
            std::process::id()
        ),
    }
}

fn exit_process(lt: LoopThread) {
    // The worker's counters stay in the server's totals after it exits.
    scoreboard::release_local();
    let Some(Ok(rt)) = RUNTIME.get() else { return };
    log_drain();
    // Requests still open get no more of their bodies: a thread waiting for one goes on.
    crate::common::inbound::abandon_all();
    // Closing the channel ends each thread after its current request.
    drop(rt.tasks.lock().unwrap_or_else(|e| e.into_inner()).take());
    let threads = std::mem::take(&mut *rt.threads.lock().unwrap_or_else(|e| e.into_inner()));
    let deadline = Instant::now()
        + if records::terminating(lt) {
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
    rt.watcher.close(lt);
}
