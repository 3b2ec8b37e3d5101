//! A daemon process: `gateway-daemon worker`, exec'd by the supervisor with the
//! group's listening socket as fd 3.
//!
//! It drops privileges, starts Python from the group's `python-home` /
//! `python-path`, then serves with `threads=N` Python threads. Connections from
//! the server are persistent and idle most of the time, so they do not each hold
//! a thread: idle connections wait in an epoll set (one-shot) on which the idle
//! Python threads wait; the thread that gets a connection serves its request and
//! parks it again. A watchdog enforces
//! `request-timeout`. SIGTERM (or `max-requests`) makes the process drain: it
//! stops accepting, finishes what it has, and exits.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::auth::GroupAccess;
use super::process::{self, ArgvArea};
use super::protocol::{self, Decoder, Encoder, Kind, FLAG_FLUSH, HEADER_LEN, MAX_FRAME};
use super::supervisor::{
    BOARD_FD, LISTEN_FD, STATUS_BUSY, STATUS_DRAINING, STATUS_FD, STATUS_IDLE, STATUS_READY,
};
use super::watch::Watch;
use crate::common::config::{AppSpec, DaemonOptions};
use crate::common::log::request_line;
use crate::common::panic::{self, Panic};
use crate::common::transport::{Header, Outcome, Request, RequestBody, ResponseChannel};
use crate::common::{socket, thread};
use crate::ops::scoreboard::{self, Board, Reason, Slot};
use crate::python::interpreter::{self, PythonSettings};
use crate::python::{self, ServerInfo};

/// What the supervisor tells a daemon process on its stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    pub server: String,
    pub supervisor_pid: u32,
    pub server_uid: u32,
    pub server_gid: u32,
    pub options: DaemonOptions,
    /// Who may use this group, and for which applications.
    pub access: GroupAccess,
    /// The same for the previous configuration generation's server processes,
    /// which may still send requests after a reload.
    pub previous: Option<GroupAccess>,
}

impl WorkerConfig {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder(&mut out);
        e.str(&self.server);
        e.u32(self.supervisor_pid);
        e.u32(self.server_uid);
        e.u32(self.server_gid);
        protocol::put_options(&mut e, &self.options);
        self.access.encode(&mut e);
        e.present(self.previous.is_some());
        if let Some(previous) = &self.previous {
            previous.encode(&mut e);
        }
        out
    }

    pub fn decode(data: &[u8]) -> Result<WorkerConfig, protocol::ProtocolError> {
        let mut d = Decoder::new(data);
        let config = WorkerConfig {
            server: d.str("server")?.to_string(),
            supervisor_pid: d.u32("supervisor pid")?,
            server_uid: d.u32("server uid")?,
            server_gid: d.u32("server gid")?,
            options: protocol::decode_options(&mut d)?,
            access: GroupAccess::decode(&mut d)?,
            previous: if d.present("previous generation")? {
                Some(GroupAccess::decode(&mut d)?)
            } else {
                None
            },
        };
        d.finish("the daemon configuration")?;
        Ok(config)
    }
}

fn fail(msg: &str) -> ! {
    log::error!("{msg}");
    std::process::exit(3);
}

/// The daemon process: never returns.
pub fn run(argv: Option<ArgvArea>) -> ! {
    process::log_to_stderr();
    let config = read_config();
    map_status_file(config.options.status_counters);
    detach_stdio();
    let opts = &config.options;
    let title = opts
        .display_name
        .clone()
        .unwrap_or_else(|| format!("(gateway:{})", opts.name));
    process::set_title(argv, &title);
    let id = become_daemon_user(&config);
    let signals = own_signals();
    let settings = PythonSettings {
        home: opts.python_home.clone(),
        path: opts.python_path.clone(),
    };
    if let Err(e) = interpreter::initialize(&settings) {
        fail(&format!("daemon process of group '{}': {e}", opts.name));
    }
    log::info!(
        "daemon process {} of group '{}' ready: uid {}, {} thread(s)",
        std::process::id(),
        opts.name,
        id.uid,
        opts.threads
    );
    let info = server_info(&config);
    let unloaded = if opts.preload {
        preload(&config.access.apps, &info, &opts.name)
    } else {
        HashSet::new()
    };
    let accepted = std::iter::once(config.access).chain(config.previous);
    let daemon = Daemon::new(config.options, accepted.collect(), info, signals)
        .unwrap_or_else(|e| fail(&format!("daemon process: {e}")));
    *lock(&daemon.shared.unloaded) = unloaded;
    if daemon.shared.options.reload_on_change {
        watch_for_changes(&daemon.shared);
    }
    report(STATUS_READY);
    daemon.serve()
}

/// Imports the group's applications before the process serves (preload=on);
/// those that fail are logged with their traceback and returned: their
/// requests get a 503 until an import succeeds.
fn preload(apps: &[AppSpec], info: &ServerInfo, group: &str) -> HashSet<AppSpec> {
    let started = Instant::now();
    let failed: HashSet<AppSpec> = apps
        .iter()
        .filter(|app| match python::load(app, info) {
            Ok(()) => false,
            Err(e) => {
                log::error!(
                    "daemon process {} of group '{group}': preloading {} failed; its requests get a 503 until it imports:\n{e}",
                    std::process::id(),
                    app.file.display()
                );
                true
            }
        })
        .cloned()
        .collect();
    log::info!(
        "daemon process {} of group '{group}' preloaded {} of {} application(s) in {:.2}s",
        std::process::id(),
        apps.len() - failed.len(),
        apps.len(),
        started.elapsed().as_secs_f64()
    );
    failed
}

/// How often the modules loaded are looked at for new files to watch.
const RESCAN: Duration = Duration::from_secs(2);

/// reload-on-change: a thread that watches the applications' files and the
/// modules they imported from their directories or python-path, and drains
/// the process (which the supervisor replaces) when one changes.
fn watch_for_changes(shared: &Arc<Shared>) {
    let watch = match Watch::new() {
        Ok(watch) => watch,
        Err(e) => {
            log::error!("reload-on-change cannot watch files (inotify): {e}");
            return;
        }
    };
    let shared = shared.clone();
    let spawned = thread::spawn("gateway-reload".into(), move || watch_loop(&shared, watch));
    if let Err(e) = spawned {
        log::error!("cannot start the reload-on-change thread: {e}");
    }
}

fn watch_loop(shared: &Shared, mut watch: Watch) {
    let apps: Vec<PathBuf> = shared.accepted[0]
        .apps
        .iter()
        .map(|a| a.file.clone())
        .collect();
    let mut roots: Vec<PathBuf> = apps
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    roots.extend(shared.options.python_path.iter().cloned());
    let mut scanned: Option<Instant> = None;
    loop {
        if scanned.is_none_or(|t| t.elapsed() >= RESCAN) {
            let before = watch.count();
            for file in apps
                .iter()
                .cloned()
                .chain(module_files(&roots, shared.options.python_home.as_deref()))
            {
                if let Err(e) = watch.add(&file) {
                    log::warn!("reload-on-change cannot watch {}: {e}", file.display());
                }
            }
            if scanned.is_none() || watch.count() != before {
                log::info!(
                    "daemon process {} of group '{}' watches {} file(s) for reload-on-change",
                    std::process::id(),
                    shared.options.name,
                    watch.count()
                );
            }
            scanned = Some(Instant::now());
        }
        if socket::readable_within(watch.fd(), Duration::from_secs(1)) {
            if let Some(file) = watch.changed() {
                tell_reason(Reason::Change);
                shared.request_drain(format!("reload-on-change: {} changed", file.display()));
                return;
            }
        }
    }
}

/// The source files of the loaded modules under `roots`, leaving out
/// installed packages (a virtualenv inside the application's directory).
fn module_files(roots: &[PathBuf], python_home: Option<&Path>) -> Vec<PathBuf> {
    use pyo3::prelude::*;
    let installed = |p: &Path| {
        python_home.is_some_and(|home| p.starts_with(home))
            || p.components().any(|c| {
                matches!(
                    c.as_os_str().to_str(),
                    Some("site-packages" | "dist-packages")
                )
            })
    };
    interpreter::with_gil(|py| -> PyResult<Vec<PathBuf>> {
        let modules = py.import("sys")?.getattr("modules")?.call_method0("copy")?;
        let mut files = Vec::new();
        for module in modules.call_method0("values")?.try_iter()? {
            let Ok(file) = module?
                .getattr("__file__")
                .and_then(|f| f.extract::<PathBuf>())
            else {
                continue;
            };
            if roots.iter().any(|r| file.starts_with(r)) && !installed(&file) {
                files.push(file);
            }
        }
        Ok(files)
    })
    .unwrap_or_default()
}

/// The configuration the supervisor wrote on stdin.
fn read_config() -> WorkerConfig {
    let mut data = Vec::new();
    // SAFETY: fd 0 is the configuration pipe from the supervisor; reading it to the end.
    let read = unsafe { std::fs::File::from_raw_fd(0) }.read_to_end(&mut data);
    let config = read
        .map_err(|e| e.to_string())
        .and_then(|_| WorkerConfig::decode(&data).map_err(|e| e.to_string()));
    config.unwrap_or_else(|e| {
        fail(&format!(
            "daemon process: cannot read its configuration: {e}"
        ))
    })
}

/// Replaces stdin with /dev/null and sends stdout (Python's print) to the
/// error log, as stderr.
fn detach_stdio() {
    // SAFETY: plain descriptor calls on this process's own standard descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        libc::dup2(null, 0);
        libc::close(null);
        libc::dup2(2, 1);
    }
}

/// Switches for good to the user the group runs as, and asks to die with the
/// supervisor.
fn become_daemon_user(config: &WorkerConfig) -> process::Identity {
    let opts = &config.options;
    let id = process::daemon_identity(
        opts.user.as_deref(),
        opts.group.as_deref(),
        config.server_uid,
        config.server_gid,
    )
    .and_then(|id| process::drop_privileges(&id).map(|_| id))
    .unwrap_or_else(|e| fail(&format!("daemon process of group '{}': {e}", opts.name)));
    // The credential change cleared any parent-death signal: ask again now.
    process::die_with_parent(libc::SIGKILL, config.supervisor_pid);
    id
}

/// A signalfd for the signals the supervisor sends, which no thread handles.
fn own_signals() -> RawFd {
    // The supervisor stops daemons with SIGTERM. A SIGINT left at its default would
    // make Python install its KeyboardInterrupt handler: the daemon owns its signals.
    // SAFETY: sets a disposition before any thread exists.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    process::signal_fd(&[libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1])
        .unwrap_or_else(|e| fail(&format!("daemon process: signalfd failed: {e}")))
}

/// What the applications of this process see of their server (`gateway.*`, `wsgi.*`).
fn server_info(config: &WorkerConfig) -> ServerInfo {
    let opts = &config.options;
    ServerInfo {
        server: Box::leak(config.server.clone().into_boxed_str()),
        mode: "daemon",
        process_group: opts.name.clone(),
        multithread: opts.threads > 1,
        multiprocess: opts.processes > 1,
        shared_interpreter: true,
    }
}

/// Tells the supervisor about this process (see the supervisor's status pipe).
fn report(kind: u8) {
    let mut msg = [kind, 0, 0, 0, 0];
    msg[1..].copy_from_slice(&std::process::id().to_be_bytes());
    // SAFETY: one atomic write (less than PIPE_BUF) of a buffer we own.
    unsafe { libc::write(STATUS_FD, msg.as_ptr().cast(), msg.len()) };
}

/// The reading and writing halves of one connection to the server.
struct ConnIo {
    reader: Mutex<BufReader<UnixStream>>,
    writer: Mutex<Writer>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frames waiting to go out, written in as few system calls as possible.
struct Writer {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Set by the watchdog once it answered for a timed-out request: nothing of
    /// that request may follow on the connection.
    poisoned: bool,
    /// How far the response to the connection's current request went.
    progress: Progress,
    /// The status of the current request's response, once its head went (0 before).
    status: u16,
}

/// How far a response went, as the server sees it: what must follow if the
/// request's thread panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Nothing of it yet: the server can still answer 500.
    Waiting,
    /// Its head went out (or waits in the buffer): it can only be cut short.
    Started,
    /// It ended (`End` or `Unavailable`): nothing more may follow.
    Ended,
}

impl Writer {
    /// Queues the `End` frame of the current request.
    fn end(&mut self, outcome: Outcome) {
        protocol::put_frame(
            &mut self.buf,
            Kind::End,
            0,
            &protocol::outcome_payload(outcome),
        );
        self.progress = Progress::Ended;
    }

    /// Queues an `Unavailable` frame: the server answers 503 with `why`.
    fn unavailable(&mut self, why: &str) {
        let _ = protocol::put_with(&mut self.buf, Kind::Unavailable, |e| e.str(why));
        self.progress = Progress::Ended;
    }

    fn check(&self) -> io::Result<()> {
        if self.poisoned {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request exceeded request-timeout",
            ))
        } else {
            Ok(())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let r = self.stream.write_all(&self.buf);
            self.buf.clear();
            r?;
        }
        Ok(())
    }

    /// Small payloads join the buffer; large ones go straight to the socket.
    fn data(&mut self, data: &[u8], flush: bool) -> io::Result<()> {
        self.check()?;
        for chunk in data.chunks(MAX_FRAME) {
            let flags = if flush { FLAG_FLUSH } else { 0 };
            if self.buf.len() + chunk.len() <= 64 * 1024 {
                protocol::put_frame(&mut self.buf, Kind::Data, flags, chunk);
            } else {
                self.buf
                    .extend_from_slice(&protocol::header(Kind::Data, flags, chunk.len()));
                self.flush()?;
                self.stream.write_all(chunk)?;
            }
        }
        if flush {
            self.flush()?;
        }
        Ok(())
    }
}

/// A connection, identified in the epoll set by its id.
struct Conn {
    id: u64,
    io: Arc<ConnIo>,
    /// The process on the other end, for log lines: `pid N, uid N`.
    peer: String,
    state: ConnState,
}

/// Whether a connection's peer has proven that it is one of the server's processes.
enum ConnState {
    /// Not yet: what it sent of its `Auth` frame so far, and by when it must have
    /// sent all of it. It is read without waiting, so a peer that stalls here
    /// holds no thread.
    Greeting { got: Vec<u8>, deadline: Instant },
    /// It proved the secret of `Shared::accepted[i]`, whose applications it may name.
    Proven(usize),
}

/// The process on the other end of a connection (`SO_PEERCRED`), for log lines.
fn describe_peer(fd: RawFd) -> String {
    // SAFETY: ucred is plain data; all zeroes is valid, getsockopt overwrites it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: reads the peer's credentials of our own socket into cred.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        format!("pid {}, uid {}", cred.pid, cred.uid)
    } else {
        "a process of unknown pid and uid".into()
    }
}

/// How long a new connection may take to prove its secret, and the server to
/// send the rest of a request head once it began (`socket-timeout` covers the
/// application's time): this, or half of `socket-timeout` if that is shorter.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of a connection's greeting so far.
enum Greeted {
    Proven,
    Pending,
    Refused,
}

/// Reads what has arrived of the `Auth` frame a connection must begin with,
/// without waiting: true once `got` holds all of it. Reads no byte beyond it.
fn read_greeting(fd: RawFd, got: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        let need = match got.get(..HEADER_LEN) {
            Some(h) => protocol::auth_frame_len(h.try_into().expect("a frame header"))?,
            None => HEADER_LEN,
        };
        let start = got.len();
        if start == need {
            return Ok(true);
        }
        got.resize(need, 0);
        // SAFETY: receives at most need - start bytes into the tail of got.
        let n = unsafe {
            libc::recv(
                fd,
                got[start..].as_mut_ptr().cast(),
                need - start,
                libc::MSG_DONTWAIT,
            )
        };
        let err = io::Error::last_os_error();
        got.truncate(start + n.max(0) as usize);
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => {}
            _ if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            _ if err.kind() == io::ErrorKind::Interrupted => {}
            _ => return Err(err),
        }
    }
}

/// Open connections of this process (one daemon per process).
static OPEN_CONNS: AtomicUsize = AtomicUsize::new(0);

impl Drop for Conn {
    fn drop(&mut self) {
        OPEN_CONNS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections waiting for their next request, and whether the process drains.
struct Parked {
    conns: HashMap<u64, Conn>,
    draining: bool,
}

/// A request in progress, as the watchdog sees it.
struct Running {
    started: Instant,
    thread: libc::pthread_t,
    io: Arc<ConnIo>,
    line: (Vec<u8>, Vec<u8>),
    timed_out: bool,
    /// Its stack was logged at slow-request (once per request).
    reported_slow: bool,
}

impl Running {
    /// Logs `msg` about this request, under its method and URI.
    fn log(&self, level: log::Level, msg: &str) {
        let (method, uri) = &self.line;
        log_request(level, method, uri, msg);
    }

    /// Whether the TimeoutError raised at request-timeout has not ended the
    /// request one more request-timeout later: its thread does not run Python code.
    fn stuck_outside_python(&self, limit: Duration) -> bool {
        self.timed_out && self.started.elapsed() > 2 * limit
    }
}

const TOKEN_LISTENER: u64 = 1;
const FIRST_CONN: u64 = 16;

/// What the process's threads share.
struct Shared {
    options: DaemonOptions,
    /// Whom this process serves: the server processes of this configuration
    /// generation, then those of the previous one (they finish their requests
    /// after a reload).
    accepted: Vec<GroupAccess>,
    info: ServerInfo,
    /// Applications whose preload failed: their requests get a 503 until one
    /// imports them.
    unloaded: Mutex<HashSet<AppSpec>>,
    /// The listener and the parked connections: the Python threads wait on it.
    epoll: OwnedFd,
    /// Wakes the main thread (max-requests reached).
    wake: OwnedFd,
    parked: Mutex<Parked>,
    next_id: AtomicU64,
    /// Requests being served.
    in_flight: AtomicUsize,
    served: AtomicU64,
    /// Why a thread asked the main thread to drain the process.
    drain_reason: Mutex<Option<String>>,
    /// Whether this process takes new connections at all (not once it drains).
    accepting: AtomicBool,
    /// Whether the one-shot listener is armed in the epoll set.
    listener_armed: AtomicBool,
    /// Set by the main thread when it arms the listener for an overflow connection.
    overflow: AtomicBool,
    slots: Vec<Mutex<Option<Running>>>,
}

fn epoll_ctl(epoll: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: registers a descriptor we own with our epoll instance.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The listener is one-shot: a process takes new connections while it holds
/// fewer than it has threads, so the persistent connections of a busy server
/// spread evenly over the group's processes instead of piling up on the first
/// one to wake. Beyond that (more connections than the group has threads), a
/// process with an idle thread takes one after [`OVERFLOW_DELAY`], so that no
/// connection waits unserved.
const LISTENER_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLONESHOT) as u32;
const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLONESHOT | libc::EPOLLRDHUP) as u32;

const OVERFLOW_DELAY: Duration = Duration::from_millis(50);

impl Shared {
    fn has_idle_thread(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) < self.options.threads as usize
    }

    /// Asks the main thread to drain the process (from any thread).
    fn request_drain(&self, why: String) {
        lock(&self.drain_reason).get_or_insert(why);
        let one = 1u64;
        // SAFETY: writes the eventfd counter from a local.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn has_room(&self) -> bool {
        OPEN_CONNS.load(Ordering::Acquire) < self.options.threads as usize
    }

    /// Re-arms the listener unless it is armed already or the process drains.
    fn arm_listener(&self) {
        if self.accepting.load(Ordering::Acquire)
            && !self.listener_armed.swap(true, Ordering::AcqRel)
        {
            let _ = epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_MOD,
                LISTEN_FD,
                LISTENER_EVENTS,
                TOKEN_LISTENER,
            );
        }
    }

    /// Accepts new connections while this process has room for them, or one
    /// when `overflow` (see [`LISTENER_EVENTS`]).
    fn accept(&self, overflow: bool) {
        self.listener_armed.store(false, Ordering::Release);
        let mut accepted = 0;
        loop {
            if !(self.has_room() || overflow && accepted == 0) {
                // Full: the next connection goes to another process, or here later
                // (the main thread re-arms the listener).
                return;
            }
            // SAFETY: accepts on the inherited listener; the new descriptor is owned below.
            let fd = unsafe {
                libc::accept4(
                    LISTEN_FD,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                if self.has_room() {
                    self.arm_listener();
                }
                return;
            }
            accepted += 1;
            OPEN_CONNS.fetch_add(1, Ordering::AcqRel);
            // SAFETY: fd is a fresh connected socket.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            if let Err(e) = self.open(stream) {
                log::warn!(
                    "daemon process {}: a new connection failed: {e}",
                    std::process::id()
                );
            }
        }
    }

    fn socket_timeout(&self) -> Duration {
        Duration::from_secs(self.options.socket_timeout)
    }

    fn greeting_timeout(&self) -> Duration {
        GREETING_TIMEOUT.min(self.socket_timeout() / 2)
    }

    /// Greets a new connection and parks it until its peer authenticates.
    fn open(&self, stream: UnixStream) -> io::Result<()> {
        stream.set_read_timeout(Some(self.socket_timeout()))?;
        stream.set_write_timeout(Some(self.socket_timeout()))?;
        let mut hello = Vec::new();
        protocol::put_hello(&mut hello, std::process::id(), &self.options.name)?;
        (&stream).write_all(&hello)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fd = stream.as_raw_fd();
        let peer = describe_peer(fd);
        let io = Arc::new(ConnIo {
            reader: Mutex::new(BufReader::with_capacity(64 * 1024, stream.try_clone()?)),
            writer: Mutex::new(Writer {
                stream,
                buf: Vec::with_capacity(64 * 1024),
                poisoned: false,
                progress: Progress::Waiting,
                status: 0,
            }),
        });
        let state = ConnState::Greeting {
            got: Vec::new(),
            deadline: Instant::now() + self.greeting_timeout(),
        };
        let conn = Conn {
            id,
            io,
            peer,
            state,
        };
        let mut parked = lock(&self.parked);
        parked.conns.insert(id, conn);
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            CONN_EVENTS,
            id,
        )
        .inspect_err(|_| {
            parked.conns.remove(&id);
        })
    }

    /// The connection of `conn`, once its peer proved a secret and a request
    /// waits on it; a connection still greeting is parked again, and one whose
    /// peer failed to prove a secret is closed.
    fn admit(&self, mut conn: Conn) -> Option<Conn> {
        if let ConnState::Proven(_) = conn.state {
            return Some(conn);
        }
        match self.greet(&mut conn) {
            Greeted::Proven if has_pending_data(&conn) => Some(conn),
            Greeted::Proven | Greeted::Pending => {
                self.park(conn);
                None
            }
            Greeted::Refused => None,
        }
    }

    /// Reads what arrived of a connection's `Auth` frame and checks its secret.
    fn greet(&self, conn: &mut Conn) -> Greeted {
        let ConnState::Greeting { got, .. } = &mut conn.state else {
            return Greeted::Proven;
        };
        let fd = lock(&conn.io.writer).stream.as_raw_fd();
        let why = match read_greeting(fd, got) {
            Ok(false) => return Greeted::Pending,
            Ok(true) => {
                let secret = &got[HEADER_LEN..];
                // Every secret is compared, so the time taken tells nothing.
                let proven: Vec<bool> = self
                    .accepted
                    .iter()
                    .map(|a| a.secret.matches(secret))
                    .collect();
                if let Some(i) = proven.iter().position(|&p| p) {
                    conn.state = ConnState::Proven(i);
                    return Greeted::Proven;
                }
                "it sent a wrong secret".to_string()
            }
            // A server process that gave up waiting for this process to accept.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && got.is_empty() => {
                return Greeted::Refused
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                "it closed the connection before it authenticated".to_string()
            }
            Err(e) => format!("its first frame was refused: {e}"),
        };
        self.refuse(conn, &why);
        Greeted::Refused
    }

    /// Logs why a connection's peer is refused, and tells it before it is closed.
    fn refuse(&self, conn: &Conn, why: &str) {
        log::warn!(
            "daemon process {} of group '{}' refused a connection from {}: {why}; only the server's own processes may use a daemon group, with the secret of their configuration",
            std::process::id(),
            self.options.name,
            conn.peer
        );
        let mut out = Vec::new();
        let reason = "this connection did not prove the secret of the server's configuration (a server process from before a reload?)";
        if protocol::put_with(&mut out, Kind::Unavailable, |e| e.str(reason)).is_ok() {
            let fd = lock(&conn.io.writer).stream.as_raw_fd();
            // SAFETY: sends a buffer we own on our socket, without waiting.
            unsafe {
                libc::send(
                    fd,
                    out.as_ptr().cast(),
                    out.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }

    /// Closes the connections whose peer did not authenticate in time: a peer
    /// that stalls there must not keep a connection of this process.
    fn drop_stalled_greetings(&self) {
        let now = Instant::now();
        let stalled: Vec<Conn> = {
            let mut parked = lock(&self.parked);
            let ids: Vec<u64> = parked
                .conns
                .values()
                .filter(
                    |c| matches!(c.state, ConnState::Greeting { deadline, .. } if deadline <= now),
                )
                .map(|c| c.id)
                .collect();
            ids.iter()
                .filter_map(|id| parked.conns.remove(id))
                .collect()
        };
        for conn in stalled {
            let why = format!(
                "it did not authenticate within {:.1}s",
                self.greeting_timeout().as_secs_f64()
            );
            self.refuse(&conn, &why);
        }
    }

    /// Parks a connection for its next request, or closes it when the process drains.
    fn park(&self, conn: Conn) {
        let mut parked = lock(&self.parked);
        if parked.draining {
            return;
        }
        let fd = lock(&conn.io.writer).stream.as_raw_fd();
        let id = conn.id;
        parked.conns.insert(id, conn);
        if epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            fd,
            CONN_EVENTS,
            id,
        )
        .is_err()
        {
            parked.conns.remove(&id);
        }
    }
}

/// A daemon process once Python runs: the `threads=N` Python threads wait on the
/// epoll set themselves (one-shot events give each ready connection to exactly
/// one of them, with no hand-over between threads), and the main thread handles
/// signals, draining and exit.
struct Daemon {
    shared: Arc<Shared>,
    signals: OwnedFd,
}

impl Daemon {
    fn new(
        options: DaemonOptions,
        accepted: Vec<GroupAccess>,
        info: ServerInfo,
        signals: RawFd,
    ) -> io::Result<Daemon> {
        // SAFETY: the caller hands over its signalfd.
        let signals = unsafe { OwnedFd::from_raw_fd(signals) };
        let (epoll, wake) = epoll_and_wake()?;
        epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            LISTEN_FD,
            LISTENER_EVENTS,
            TOKEN_LISTENER,
        )?;
        let threads = options.threads as usize;
        let shared = Arc::new(Shared {
            options,
            accepted,
            info,
            unloaded: Mutex::default(),
            epoll,
            wake,
            parked: Mutex::new(Parked {
                conns: HashMap::new(),
                draining: false,
            }),
            next_id: AtomicU64::new(FIRST_CONN),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            drain_reason: Mutex::new(None),
            accepting: AtomicBool::new(true),
            listener_armed: AtomicBool::new(true),
            overflow: AtomicBool::new(false),
            slots: (0..threads).map(|_| Mutex::new(None)).collect(),
        });
        start_threads(&shared)?;
        Ok(Daemon { shared, signals })
    }

    /// The main thread: waits for a reason to drain, drains, exits.
    fn serve(self) -> ! {
        let mut main = MainState {
            draining_since: None,
            drained_from: 0,
            full_since: None,
            memory_checked: Instant::now(),
            rss_shown: Instant::now() - MEMORY_CHECK,
            busy_since: None,
            last_busy: Instant::now(),
            told_idle: false,
            served_seen: 0,
        };
        loop {
            let drain_why = self.wait(main.draining_since.is_some());
            panic::guard("the main thread of a daemon process", (), || {
                self.turn(drain_why, &mut main)
            });
        }
    }

    /// Waits briefly for a signal or a thread that asks to drain: why to drain, if so.
    fn wait(&self, draining: bool) -> Option<String> {
        let watch = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut polled = [
            watch(self.signals.as_raw_fd()),
            watch(self.shared.wake.as_raw_fd()),
        ];
        let timeout = if draining {
            20
        } else {
            OVERFLOW_DELAY.as_millis() as i32 / 2
        };
        // SAFETY: polls two descriptors we own.
        unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
        let mut drain_why = None;
        if polled[0].revents != 0 {
            if let Some(sig) = process::read_signals(self.signals.as_raw_fd()).first() {
                drain_why = Some(format!("received {}", process::signal_name(*sig)));
            }
        }
        if polled[1].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reads the eventfd counter into v.
            unsafe { libc::read(self.shared.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            if let Some(why) = lock(&self.shared.drain_reason).clone() {
                drain_why = Some(why);
            }
        }
        drain_why
    }

    /// One round of the main thread: closes stalled greetings, begins to drain
    /// when `drain_why` (or max-memory) says so, and exits once drained (or
    /// graceful-timeout after the drain began); meanwhile takes overflow
    /// connections.
    fn turn(&self, drain_why: Option<String>, main: &mut MainState) {
        self.shared.drop_stalled_greetings();
        show_memory(main);
        let drain_why = drain_why.or_else(|| self.over_memory(main));
        if let (Some(why), None) = (drain_why, main.draining_since) {
            // Set first: even a drain that panicked half-way ends at graceful-timeout.
            main.draining_since = Some(Instant::now());
            main.drained_from = self.shared.served.load(Ordering::Acquire);
            self.begin_drain(&why);
        }
        let Some(since) = main.draining_since else {
            self.take_overflow(&mut main.full_since);
            self.tell_load(main);
            return;
        };
        let idle = self.shared.in_flight.load(Ordering::Acquire) == 0
            && lock(&self.shared.parked).conns.is_empty();
        if idle {
            self.log_drained(main, since);
            self.exit(0);
        }
        if since.elapsed() > Duration::from_secs(self.shared.options.graceful_timeout) {
            log::warn!(
                "daemon process {}: {} request(s) still running after graceful-timeout={}s; exiting",
                std::process::id(),
                self.shared.in_flight.load(Ordering::Acquire),
                self.shared.options.graceful_timeout
            );
            self.log_drained(main, since);
            self.exit(0);
        }
    }

    /// Why to drain for max-memory, looked at once a second: the process's
    /// resident memory passed it.
    fn over_memory(&self, main: &mut MainState) -> Option<String> {
        let limit = self.shared.options.max_memory;
        if limit == 0
            || main.draining_since.is_some()
            || main.memory_checked.elapsed() < MEMORY_CHECK
        {
            return None;
        }
        main.memory_checked = Instant::now();
        let rss = process::resident_mib()?;
        (rss > limit).then(|| {
            tell_reason(Reason::Memory);
            format!("its resident memory of {rss} MiB passed max-memory={limit} MiB")
        })
    }

    /// Tells the supervisor of a growing pool when all threads have been busy
    /// for [`BUSY_PERIOD`] (it may start another process) and, once for each
    /// idle spell, when nothing ran for idle-timeout (it may stop this one).
    fn tell_load(&self, main: &mut MainState) {
        let options = &self.shared.options;
        if options.min_processes >= options.processes {
            return;
        }
        let now = Instant::now();
        let in_flight = self.shared.in_flight.load(Ordering::Acquire);
        // Requests that began and ended between two looks count too.
        let served = self.shared.served.load(Ordering::Acquire);
        if in_flight > 0 || served != main.served_seen {
            main.last_busy = now;
            main.served_seen = served;
        }
        main.busy_since = match main.busy_since {
            _ if in_flight < options.threads as usize => None,
            None => Some(now),
            since => since,
        };
        if main.busy_since.is_some_and(|t| now - t >= BUSY_PERIOD) {
            // Again each period while it lasts: the supervisor grows one process at a time.
            report(STATUS_BUSY);
            main.busy_since = Some(now);
            main.told_idle = false;
        } else if now - main.last_busy >= Duration::from_secs(options.idle_timeout) {
            if !main.told_idle {
                report(STATUS_IDLE);
                main.told_idle = true;
            }
        } else {
            main.told_idle = false;
        }
    }

    /// How many requests the drain let finish, and how long it took.
    fn log_drained(&self, main: &MainState, since: Instant) {
        let drained = self.shared.served.load(Ordering::Acquire) - main.drained_from;
        log::info!(
            "daemon process {} of group '{}' drained {drained} request(s) in {:.2}s",
            std::process::id(),
            self.shared.options.name,
            since.elapsed().as_secs_f64()
        );
    }

    /// Re-arms the listener when it is idle because this process is full: at
    /// once when a connection closed, after [`OVERFLOW_DELAY`] for an overflow
    /// connection if a thread is idle.
    fn take_overflow(&self, full_since: &mut Option<Instant>) {
        let shared = &self.shared;
        if shared.listener_armed.load(Ordering::Acquire) {
            *full_since = None;
            return;
        }
        if shared.has_room() {
            shared.arm_listener();
            *full_since = None;
            return;
        }
        let since = *full_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= OVERFLOW_DELAY && shared.has_idle_thread() {
            shared.overflow.store(true, Ordering::Release);
            shared.arm_listener();
            *full_since = None;
        }
    }

    fn exit(&self, code: i32) -> ! {
        // A thread still stuck in a request may hold the GIL: atexit handlers then
        // cannot run, and the process must end anyway.
        if self.shared.in_flight.load(Ordering::Acquire) == 0 {
            interpreter::run_exit_handlers();
        }
        // SAFETY: ends the process without running Rust destructors under threads still running.
        unsafe { libc::_exit(code) }
    }

    /// Stops taking connections, closes the idle ones (the server reconnects and
    /// reaches another process), and lets requests already sent finish.
    fn begin_drain(&self, why: &str) {
        log::info!(
            "daemon process {} of group '{}' draining: {why}",
            std::process::id(),
            self.shared.options.name
        );
        report(STATUS_DRAINING);
        self.shared.accepting.store(false, Ordering::Release);
        let _ = epoll_ctl(
            self.shared.epoll.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            LISTEN_FD,
            0,
            0,
        );
        let mut parked = lock(&self.shared.parked);
        parked.draining = true;
        // A connection with a request already on it stays armed and is served.
        parked.conns.retain(|_, conn| has_pending_data(conn));
    }
}

/// Puts the process's resident memory in its slot, once a second.
fn show_memory(main: &mut MainState) {
    let Some(slot) = SLOT.get().copied().flatten() else {
        return;
    };
    if main.rss_shown.elapsed() >= MEMORY_CHECK {
        main.rss_shown = Instant::now();
        if let Some(bytes) = process::resident_bytes() {
            slot.set_rss(bytes);
        }
    }
}

/// What the main thread keeps between its rounds.
struct MainState {
    /// When the drain began, if it did.
    draining_since: Option<Instant>,
    /// Requests served when the drain began.
    drained_from: u64,
    /// Since when the process is full (no thread for another connection).
    full_since: Option<Instant>,
    /// When max-memory was last looked at.
    memory_checked: Instant,
    /// When the resident memory last went to the status page.
    rss_shown: Instant,
    /// Since when all threads are busy, and when a request last ran.
    busy_since: Option<Instant>,
    last_busy: Instant,
    /// Whether the supervisor was told of this idle spell.
    told_idle: bool,
    /// Requests served at the last look at the load.
    served_seen: u64,
}

/// How long all of a process's threads must stay busy for a growing pool
/// (`processes=MIN-MAX`) to start another process.
pub const BUSY_PERIOD: Duration = Duration::from_millis(500);

/// How often the main thread compares the resident memory with max-memory.
const MEMORY_CHECK: Duration = Duration::from_secs(1);

/// A new epoll set, and the eventfd that wakes the main thread.
fn epoll_and_wake() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: creating kernel objects owned by the returned values.
    let (epoll, wake) = unsafe {
        (
            libc::epoll_create1(libc::EPOLL_CLOEXEC),
            libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK),
        )
    };
    // SAFETY: each descriptor was just created, and is owned from here on.
    let own = |fd| (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
    match (own(epoll), own(wake)) {
        (Some(epoll), Some(wake)) => Ok((epoll, wake)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Starts the request threads and, with a request-timeout or slow-request, the watchdog.
fn start_threads(shared: &Arc<Shared>) -> io::Result<()> {
    for slot in 0..shared.slots.len() {
        let shared = shared.clone();
        thread::spawn(format!("gateway-{slot}"), move || {
            request_thread(&shared, slot)
        })?;
    }
    if shared.options.request_timeout > 0 || shared.options.slow_request > 0 {
        let shared = shared.clone();
        thread::spawn("gateway-watchdog".into(), move || watchdog(shared))?;
    }
    Ok(())
}

fn has_pending_data(conn: &Conn) -> bool {
    let fd = lock(&conn.io.writer).stream.as_raw_fd();
    let mut b = 0u8;
    // SAFETY: peeks one byte into a local without consuming it.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

/// One of the `threads=N` Python threads: waits on the epoll set, and serves the
/// connection that has a request.
fn request_thread(shared: &Shared, slot: usize) {
    let mut payload = Vec::with_capacity(64 * 1024);
    let mut event = [libc::epoll_event { events: 0, u64: 0 }];
    loop {
        // SAFETY: waits for one event into a local array.
        let n = unsafe { libc::epoll_wait(shared.epoll.as_raw_fd(), event.as_mut_ptr(), 1, -1) };
        if n != 1 {
            continue;
        }
        let token = event[0].u64;
        // A request's own panic is answered by serve_one; one around it (a new
        // connection, a greeting) costs that connection, never the thread.
        panic::guard("a request thread of a daemon process", (), || {
            on_event(shared, slot, token, &mut payload)
        });
    }
}

/// Handles the event of `token`: new connections on the listener, or a
/// request (or the rest of a greeting) on a parked connection.
fn on_event(shared: &Shared, slot: usize, token: u64, payload: &mut Vec<u8>) {
    if token == TOKEN_LISTENER {
        let overflow = shared.overflow.swap(false, Ordering::AcqRel);
        shared.accept(overflow);
        return;
    }
    let Some(conn) = lock(&shared.parked).conns.remove(&token) else {
        return;
    };
    if let Some(conn) = shared.admit(conn) {
        serve_conn(shared, conn, slot, payload);
    }
    if shared.has_room() {
        shared.arm_listener();
    }
}

/// Serves the request waiting on `conn` (and, while the process drains, any
/// that follows at once), then parks the connection for the next.
fn serve_conn(shared: &Shared, conn: Conn, slot: usize, payload: &mut Vec<u8>) {
    let _busy = InFlight::enter(shared);
    let mut keep = serve_one(shared, &conn, slot, payload);
    let max = shared.options.max_requests;
    let served = shared.served.fetch_add(1, Ordering::AcqRel) + 1;
    if max > 0 && served == max {
        tell_reason(Reason::MaxRequests);
        shared.request_drain(format!("max-requests={max} reached"));
    }
    // While draining, a request already waiting on the connection is still served.
    while keep && lock(&shared.parked).draining && has_pending_data(&conn) {
        keep = serve_one(shared, &conn, slot, payload);
    }
    if keep {
        shared.park(conn);
    }
}

/// Counts a request in [`Shared::in_flight`] for as long as it lives, even if
/// a panic ends it: the drain and the overflow connections rely on the count.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> InFlight<'a> {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads the request frame that began to arrive on `conn`: the server writes
/// it whole, so the rest must follow within the greeting timeout, not
/// `socket-timeout` (a stalled head would hold a thread that long).
fn read_request(shared: &Shared, conn: &Conn, payload: &mut Vec<u8>) -> bool {
    let mut reader = lock(&conn.io.reader);
    let frame = reader
        .get_ref()
        .set_read_timeout(Some(shared.greeting_timeout()))
        .and_then(|_| protocol::read_frame(&mut *reader, payload));
    let restored = reader
        .get_ref()
        .set_read_timeout(Some(shared.socket_timeout()));
    let frame = restored.and(frame);
    let pid = std::process::id();
    match frame {
        Ok(Some((Kind::Request, _))) => true,
        Ok(None) => false,
        Ok(Some((kind, _))) => {
            log::error!("daemon process {pid}: expected a request, got a {kind:?} frame; closing the connection");
            false
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            log::warn!(
                "daemon process {pid}: the request head from {} stalled for {:.1}s; closing the connection",
                conn.peer,
                shared.greeting_timeout().as_secs_f64()
            );
            false
        }
        Err(e) => {
            if e.kind() != io::ErrorKind::ConnectionReset {
                log::warn!("daemon process {pid}: reading a request failed: {e}");
            }
            false
        }
    }
}

/// Answers a request for an application this group does not serve (the server
/// sees a 500 and logs why).
fn unknown_app(
    shared: &Shared,
    conn: &Conn,
    request: &protocol::DecodedRequest<'_>,
    apps: usize,
) -> bool {
    let msg = format!(
        "daemon process group '{}' has no application number {} (it serves {apps}); answering 500",
        shared.options.name, request.app
    );
    let line = request_line(request.head.method, request.head.request_uri, &msg);
    log::error!("{}", line.trim_start_matches("gateway: "));
    let mut w = lock(&conn.io.writer);
    let _ = protocol::put_with(&mut w.buf, Kind::Log, |e| {
        e.u8(protocol::level_code(log::Level::Error));
        e.str(&line);
    });
    w.end(Outcome::FAILED);
    w.flush().is_ok()
}

/// Serves the request waiting on `conn`; false when the connection is done.
fn serve_one(shared: &Shared, conn: &Conn, slot: usize, payload: &mut Vec<u8>) -> bool {
    let ConnState::Proven(generation) = conn.state else {
        return false;
    };
    if !read_request(shared, conn, payload) {
        return false;
    }
    let request = match protocol::decode_request(payload) {
        Ok(r) => r,
        Err(e) => {
            log::error!(
                "daemon process {}: malformed request from the server: {e}",
                std::process::id()
            );
            return false;
        }
    };
    {
        let mut w = lock(&conn.io.writer);
        w.progress = Progress::Waiting;
        w.status = 0;
    }
    let (method, uri) = (request.head.method, request.head.request_uri);
    match panic::catch(move || answer(shared, conn, slot, generation, request)) {
        Ok(keep) => keep,
        Err(p) => {
            lock(&shared.slots[slot]).take();
            end_after_panic(conn, &p, method, uri);
            false
        }
    }
}

/// Answers a request from the server processes of configuration generation
/// `generation`: runs its application, or refuses it. False when the
/// connection is done.
fn answer(
    shared: &Shared,
    conn: &Conn,
    slot: usize,
    generation: usize,
    request: protocol::DecodedRequest<'_>,
) -> bool {
    let apps = &shared.accepted[generation].apps;
    let Some(app) = apps.get(request.app as usize) else {
        return unknown_app(shared, conn, &request, apps.len());
    };
    if let Some(why) = not_imported(shared, app) {
        let mut w = lock(&conn.io.writer);
        w.unavailable(&why);
        let _ = w.flush();
        return false;
    }
    if let Some(why) = waited_too_long(shared, &request) {
        // Too late to be of use: the client has likely given up, and running it
        // would only make the queue behind it longer.
        let mut w = lock(&conn.io.writer);
        w.unavailable(&why);
        let _ = w.flush();
        return false;
    }
    respond(shared, conn, slot, app, request)
}

/// Why `app`, whose preload failed, still cannot serve: it fails to import
/// again (logged with its traceback).
fn not_imported(shared: &Shared, app: &AppSpec) -> Option<String> {
    if !lock(&shared.unloaded).contains(app) {
        return None;
    }
    match python::load(app, &shared.info) {
        Ok(()) => {
            lock(&shared.unloaded).remove(app);
            None
        }
        Err(e) => {
            let why = format!(
                "{} of daemon process group '{}' does not import (preload=on); answering 503",
                app.file.display(),
                shared.options.name
            );
            log::error!("{why}:\n{e}");
            Some(why)
        }
    }
}

/// Why `request` is not worth running any more: it waited for a thread longer
/// than queue-timeout.
fn waited_too_long(shared: &Shared, request: &protocol::DecodedRequest<'_>) -> Option<String> {
    let waited = protocol::monotonic_us().saturating_sub(request.queued_at);
    let limit = shared.options.queue_timeout;
    (limit > 0 && waited > limit * 1_000_000).then(|| {
        format!(
            "the request waited {:.1}s for a thread of daemon process group '{}', longer than queue-timeout={limit}s",
            waited as f64 / 1e6,
            shared.options.name
        )
    })
}

/// Runs application `app` for `request` (the watchdog watching it through the
/// thread's slot) and ends the response; false when the connection is done.
fn respond(
    shared: &Shared,
    conn: &Conn,
    slot: usize,
    app: &AppSpec,
    request: protocol::DecodedRequest<'_>,
) -> bool {
    *lock(&shared.slots[slot]) = Some(Running {
        started: Instant::now(),
        // SAFETY: pthread_self has no preconditions.
        thread: unsafe { libc::pthread_self() },
        io: conn.io.clone(),
        line: (
            request.head.method.to_vec(),
            request.head.request_uri.to_vec(),
        ),
        timed_out: false,
        reported_slow: false,
    });
    let ticket = scoreboard::begin(request.head.method, request.head.request_uri);
    let body = DaemonBody {
        io: conn.io.clone(),
        done: !request.has_body,
    };
    let response = DaemonResponse {
        io: conn.io.clone(),
        file_buf: Vec::new(),
    };
    let request = Request {
        head: request.head,
        has_body: request.has_body,
        body: Box::new(body),
        response: Box::new(response),
    };
    panic::fault_point("daemon-job");
    let outcome = python::run(app, &shared.info, request);
    lock(&shared.slots[slot]).take();
    let mut w = lock(&conn.io.writer);
    if let Some(ticket) = ticket {
        ticket.finish(final_status(&w, outcome));
    }
    if w.poisoned {
        return false;
    }
    w.end(outcome);
    w.flush().is_ok() && outcome != Outcome::ClientGone
}

/// The status the client got for a request that ended with `outcome`: the
/// watchdog's 504, the one the server answers, or the response's own (499,
/// as nginx logs it, for a client that left before any).
fn final_status(w: &Writer, outcome: Outcome) -> u16 {
    match outcome {
        _ if w.poisoned => 504,
        Outcome::Status(status) => status,
        _ if w.status == 0 => 499,
        _ => w.status,
    }
}

/// This process's slot in its group's status file, when the supervisor made one.
static SLOT: OnceLock<Option<&'static Slot>> = OnceLock::new();

/// Maps the group's status file the supervisor handed over (before anything
/// else can take its descriptor number), finds this process's slot, and
/// counts requests in it when the server's status counters are on.
fn map_status_file(counting: bool) {
    let board = Board::map_fd(BOARD_FD).ok();
    // SAFETY: closes the inherited descriptor, which nothing else uses: the mapping stays.
    unsafe { libc::close(BOARD_FD) };
    let slot = board.and_then(|board| {
        let board: &'static Board = Box::leak(Box::new(board));
        let index = board.find(std::process::id())?;
        if counting && board.counting() {
            scoreboard::set_local(board, index);
        }
        Some(&board.slots()[index])
    });
    let _ = SLOT.set(slot);
}

/// Tells the status page why this process drains.
fn tell_reason(reason: Reason) {
    if let Some(slot) = SLOT.get().copied().flatten() {
        slot.set_reason(reason);
    }
}

/// Ends a request whose thread panicked while serving it: the server answers
/// 500 if nothing of the response went out, or cuts it short. The connection
/// is closed: what the panic left on it (half a request body?) is unknown.
fn end_after_panic(conn: &Conn, p: &Panic, method: &[u8], uri: &[u8]) {
    let mut w = lock(&conn.io.writer);
    let what = match (w.poisoned, w.progress) {
        (false, Progress::Waiting) => {
            w.end(Outcome::FAILED);
            "answering 500"
        }
        (false, Progress::Started) => {
            protocol::put_frame(&mut w.buf, Kind::Abort, 0, &[]);
            w.end(Outcome::Aborted);
            "the response was cut short"
        }
        // The server has its answer already (the watchdog's 504, or the End).
        (true, _) | (false, Progress::Ended) => "closing the connection",
    };
    let _ = w.flush();
    let _ = w.stream.shutdown(std::net::Shutdown::Both);
    let msg = format!("{p} in daemon process {}; {what}", std::process::id());
    log_request(log::Level::Error, method, uri, &msg);
}

/// Logs `msg` about the request `METHOD URI` (the logger adds the `gateway:` prefix).
fn log_request(level: log::Level, method: &[u8], uri: &[u8], msg: &str) {
    let line = request_line(method, uri, msg);
    log::log!(level, "{}", line.trim_start_matches("gateway: "));
}

/// `wsgi.input` in a daemon: pulls the body from the server as the application reads.
struct DaemonBody {
    io: Arc<ConnIo>,
    done: bool,
}

impl RequestBody for DaemonBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(MAX_FRAME);
        {
            let mut w = lock(&self.io.writer);
            w.check()?;
            protocol::put_frame(&mut w.buf, Kind::Pull, 0, &(want as u32).to_be_bytes());
            w.flush()?;
        }
        let mut r = lock(&self.io.reader);
        let mut h = [0u8; HEADER_LEN];
        r.read_exact(&mut h)?;
        let (kind, _, len) = protocol::parse_header(&h)?;
        if kind != Kind::Body || len > want {
            self.done = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the server answered a body pull with a {kind:?} frame of {len} bytes"),
            ));
        }
        r.read_exact(&mut buf[..len])?;
        self.done = len == 0;
        Ok(len)
    }

    /// The server sends nothing between a body's end and the request's end:
    /// an end of file then is the server closing the connection because its
    /// client left.
    fn client_gone(&mut self) -> bool {
        let r = lock(&self.io.reader);
        r.buffer().is_empty() && socket::peer_closed(r.get_ref().as_raw_fd())
    }
}

/// The response channel of a daemon: frames to the server.
struct DaemonResponse {
    io: Arc<ConnIo>,
    file_buf: Vec<u8>,
}

impl ResponseChannel for DaemonResponse {
    fn start(&mut self, status: u16, status_line: &str, headers: &[Header]) -> io::Result<()> {
        let mut w = lock(&self.io.writer);
        w.check()?;
        protocol::put_start(&mut w.buf, status, status_line, headers)?;
        w.progress = Progress::Started;
        w.status = status;
        Ok(())
    }

    fn write(&mut self, data: &[u8], flush: bool) -> io::Result<()> {
        lock(&self.io.writer).data(data, flush)
    }

    fn send_file(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.file_buf.resize(256 * 1024, 0);
        let (mut offset, mut left) = (offset, len);
        while left > 0 {
            let want = (left as usize).min(self.file_buf.len());
            // SAFETY: pread into our buffer, at most its length.
            let n = unsafe {
                libc::pread(
                    fd,
                    self.file_buf.as_mut_ptr().cast(),
                    want,
                    offset as libc::off_t,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
            lock(&self.io.writer).data(&self.file_buf[..n as usize], false)?;
            offset += n as u64;
            left -= n as u64;
        }
        lock(&self.io.writer).flush()
    }

    fn abort(&mut self) {
        let mut w = lock(&self.io.writer);
        protocol::put_frame(&mut w.buf, Kind::Abort, 0, &[]);
        let _ = w.flush();
    }

    fn only_buffers(&self, len: usize, flush: bool) -> bool {
        // Writer::data keeps frames in its buffer up to this size.
        !flush && lock(&self.io.writer).buf.len() + 2 * HEADER_LEN + len <= 32 * 1024
    }

    fn log(&self, level: log::Level, line: &str) {
        let mut w = lock(&self.io.writer);
        let sent = !w.poisoned
            && protocol::put_with(&mut w.buf, Kind::Log, |e| {
                e.u8(protocol::level_code(level));
                e.str(line);
            })
            .is_ok()
            && w.flush().is_ok();
        if !sent {
            log::log!(level, "{}", line.trim_start_matches("gateway: "));
        }
    }
}

/// What the watchdog watches for, each if set: `request-timeout` and `slow-request`.
struct Limits {
    timeout: Option<Duration>,
    slow: Option<Duration>,
}

/// Why [`gil_reports`] logs a request's Python stack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    /// Past request-timeout: then TimeoutError is raised in its thread.
    TimedOut,
    /// Past slow-request: the request goes on.
    Slow,
}

/// Enforces `request-timeout`: answers the server for a stuck request (which
/// sends a 504), then has [`gil_reports`] log the request's Python stack and
/// raise TimeoutError in its thread, so it unwinds as soon as it runs Python
/// code again; the other requests of the process go on. At `slow-request` it
/// has the stack of a request still running logged, once, and lets it run. The
/// watchdog itself never waits for the GIL: a request holding it in C code (a
/// catastrophic regex, a heavy C call) must not stop the 504s of the process's
/// other requests.
fn watchdog(shared: Arc<Shared>) {
    let seconds = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let limits = Limits {
        timeout: seconds(shared.options.request_timeout),
        slow: seconds(shared.options.slow_request),
    };
    let (reports, queue) = mpsc::channel();
    let reporter = shared.clone();
    let spawned = thread::spawn("gateway-stacks".into(), move || {
        gil_reports(&reporter, queue)
    });
    if let Err(e) = spawned {
        log::error!("cannot start the thread that logs requests' stacks: {e}");
    }
    loop {
        std::thread::sleep(Duration::from_millis(100));
        // A bug costs one round of checks: the next one comes 100 ms later.
        panic::guard("the watchdog of a daemon process", (), || {
            check_requests(&shared, &limits, &reports)
        });
    }
}

/// One round of the watchdog: answers each request past request-timeout (and
/// queues its stack for [`gil_reports`]), recycles the process for one stuck
/// outside Python code, and queues the stack of each request past slow-request.
fn check_requests(shared: &Shared, limits: &Limits, reports: &Sender<(usize, Instant, Report)>) {
    for (index, slot) in shared.slots.iter().enumerate() {
        let mut slot = lock(slot);
        let Some(running) = slot.as_mut() else {
            continue;
        };
        if let Some(limit) = limits.timeout {
            if running.stuck_outside_python(limit) {
                recycle_for(shared, slot.take().expect("checked"), limit);
                continue;
            }
            if !running.timed_out
                && running.started.elapsed() > limit
                && answer_timeout(shared, running)
            {
                let _ = reports.send((index, running.started, Report::TimedOut));
                continue;
            }
        }
        if let Some(slow) = limits.slow {
            if !running.reported_slow && !running.timed_out && running.started.elapsed() > slow {
                running.reported_slow = true;
                log_slow(shared, running);
                let _ = reports.send((index, running.started, Report::Slow));
            }
        }
    }
}

/// The line before the stack of a request past slow-request.
fn log_slow(shared: &Shared, running: &Running) {
    let msg = format!(
        "daemon process {} of group '{}': the request has run for more than slow-request={}s; \
         its thread's Python stack follows (the request goes on)",
        std::process::id(),
        shared.options.name,
        shared.options.slow_request
    );
    running.log(log::Level::Warn, &msg);
}

/// TimeoutError only fires when the thread runs Python code again: it is stuck
/// in C (a long sleep, a blocking call, a regex holding the GIL). Replace the
/// process the gentle way: its other requests finish, the stuck one is abandoned
/// after graceful-timeout.
fn recycle_for(shared: &Shared, running: Running, limit: Duration) {
    let msg = format!(
        "the thread of this request is still stuck (outside Python code) {}s after request-timeout; recycling daemon process {}",
        limit.as_secs(),
        std::process::id()
    );
    running.log(log::Level::Error, &msg);
    tell_reason(Reason::Timeout);
    shared.request_drain("a request is stuck outside Python code".into());
}

/// Sends the server the Timeout frame of a request past request-timeout and
/// closes its response; false when the request thread holds the writer (blocked
/// on a slow server): the watchdog tries again later.
fn answer_timeout(shared: &Shared, running: &mut Running) -> bool {
    let Ok(mut w) = running.io.writer.try_lock() else {
        return false;
    };
    running.timed_out = true;
    let msg = format!(
        "daemon process {} of group '{}': the request exceeded request-timeout={}s; its thread's Python stack follows once it can be read",
        std::process::id(),
        shared.options.name,
        shared.options.request_timeout
    );
    running.log(log::Level::Error, &msg);
    let _ = protocol::put_with(&mut w.buf, Kind::Timeout, |e| e.str(&msg));
    let _ = w.flush();
    w.poisoned = true;
    true
}

/// Logs the Python stack of each request the watchdog queued, when the GIL
/// comes free, and raises TimeoutError in the thread of a timed-out one. The
/// GIL is taken before a slot's lock, never the other way round, and the
/// request is checked to be the same one (its start time) so that a thread
/// which moved on is left alone.
fn gil_reports(shared: &Shared, queue: Receiver<(usize, Instant, Report)>) {
    for (index, started, why) in queue {
        // A bug costs this report, not the ones that follow.
        panic::guard("the thread that logs requests' stacks", (), || {
            report_stack(shared, index, started, why)
        });
    }
}

/// Logs the stack of the request that started at `started` in slot `index`,
/// if it still runs, and raises TimeoutError in its thread if it timed out.
fn report_stack(shared: &Shared, index: usize, started: Instant, why: Report) {
    let (level, title) = match why {
        Report::TimedOut => (log::Level::Error, "Stack of the stuck thread"),
        Report::Slow => (log::Level::Warn, "Stack of the slow request's thread"),
    };
    let Some(thread) = running_thread(shared, index, started) else {
        return;
    };
    // An ASGI request's code runs in its task on the event loop, not in its thread.
    if let Some(stack) = python::asgi::tasks::stack(thread) {
        if let Some(running) = lock(&shared.slots[index])
            .as_ref()
            .filter(|r| r.started == started)
        {
            let task = match why {
                Report::TimedOut => "Stack of the timed-out request's ASGI task (it is cancelled):",
                Report::Slow => "Stack of the slow request's ASGI task:",
            };
            running.log(level, task);
            for line in stack.lines() {
                running.log(level, line);
            }
        }
        if why == Report::TimedOut {
            python::asgi::tasks::cancel(thread);
        }
        return;
    }
    interpreter::with_gil(|py| {
        let slot = lock(&shared.slots[index]);
        let Some(running) = slot.as_ref().filter(|r| r.started == started) else {
            return;
        };
        for line in python::slow::thread_stack(py, running.thread, title).lines() {
            running.log(level, line);
        }
        if why == Report::TimedOut {
            // SAFETY: the GIL is held; PyExc_TimeoutError is a static exception type.
            unsafe {
                pyo3::ffi::PyThreadState_SetAsyncExc(
                    running.thread as _,
                    pyo3::ffi::PyExc_TimeoutError,
                )
            };
        }
    });
}

/// The thread of the request that started at `started` in slot `index`, if it still runs.
fn running_thread(shared: &Shared, index: usize, started: Instant) -> Option<libc::pthread_t> {
    let slot = lock(&shared.slots[index]);
    slot.as_ref()
        .filter(|r| r.started == started)
        .map(|r| r.thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips() {
        let c = WorkerConfig {
            server: "nginx".into(),
            supervisor_pid: 42,
            server_uid: 33,
            server_gid: 33,
            options: DaemonOptions::parse(&["g", "threads=3", "request-timeout=5"]).unwrap(),
            access: crate::daemon::auth::Generation::new(&[], [])
                .unwrap()
                .access("g"),
            previous: None,
        };
        assert_eq!(WorkerConfig::decode(&c.encode()).unwrap(), c);
        assert!(WorkerConfig::decode(&c.encode()[..10]).is_err());
    }
}
