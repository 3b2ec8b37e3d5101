//! The supervisor: a process of the `gateway-daemon` executable that owns the
//! daemon groups of one server configuration.
//!
//! The server's master starts it with [`start`]: a double fork (so the server,
//! which may reap every child with `waitpid(-1)`, never sees it) and an exec, with
//! a pipe on its stdin. The master keeps the write end, the [`Lifeline`]; it
//! carries the configuration, and its end of file means "this configuration is
//! over" (a stop, a reload, or the master died, even by `kill -9`).
//!
//! The supervisor creates each group's listening socket (owned by the server's
//! worker user, mode 0600, in a run directory that only root may change: see
//! [`super::rundir`]), forks and execs the group's daemon processes with the
//! socket as fd 3, restarts any that die, starts a replacement as soon as one
//! begins to drain (max-requests), listens anew when a socket file is removed,
//! and, at end of file, lets its daemons finish their requests (graceful-timeout)
//! while the next generation's supervisor has already taken over the socket path.

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::auth::Generation;
use super::process::{self, describe_status};
use super::protocol::{self, Decoder, Encoder, Kind};
use super::rundir::RunDir;
use super::{
    exit_record_name, socket_name, socket_path, status_name, Endpoint, EXIT_RECORD_PREFIX,
    MAX_SOCKET_PATH,
};
use crate::common::config::DaemonOptions;
use crate::common::panic;
use crate::ops::scoreboard::{Board, Reason, State};
use crate::python::interpreter;

/// Everything the supervisor needs, sent over the lifeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// `apache` or `nginx` (`gateway.server` in the daemons).
    pub server: String,
    /// The directory for the sockets, e.g. `RUNTIME/gateway-<master pid>`.
    pub run_dir: PathBuf,
    /// The master process: when it is gone, so is the supervisor. 0 when not
    /// known yet (nginx forks its master after starting the supervisor): then
    /// only the lifeline tells.
    pub server_pid: u32,
    /// The server's worker user: owns the sockets, default user of the daemons.
    pub server_uid: u32,
    pub server_gid: u32,
    pub groups: Vec<DaemonOptions>,
    /// The secret and the groups' applications of this configuration generation.
    pub generation: Generation,
    /// The previous generation's, while its server processes finish their
    /// requests after a reload: they reach this generation's daemons.
    pub previous: Option<Generation>,
}

impl SupervisorConfig {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder(&mut out);
        e.str(&self.server);
        e.bytes(self.run_dir.as_os_str().as_encoded_bytes());
        e.u32(self.server_pid);
        e.u32(self.server_uid);
        e.u32(self.server_gid);
        e.u32(self.groups.len() as u32);
        for g in &self.groups {
            protocol::put_options(&mut e, g);
        }
        self.generation.encode(&mut e);
        e.present(self.previous.is_some());
        if let Some(previous) = &self.previous {
            previous.encode(&mut e);
        }
        out
    }

    fn decode(data: &[u8]) -> Result<SupervisorConfig, protocol::ProtocolError> {
        use std::os::unix::ffi::OsStrExt;
        let mut d = Decoder::new(data);
        let server = d.str("server")?.to_string();
        let run_dir = PathBuf::from(std::ffi::OsStr::from_bytes(d.bytes("run dir")?));
        let server_pid = d.u32("server pid")?;
        let server_uid = d.u32("server uid")?;
        let server_gid = d.u32("server gid")?;
        let n = d.count(8, "groups")?;
        let groups = (0..n)
            .map(|_| protocol::decode_options(&mut d))
            .collect::<Result<_, _>>()?;
        let generation = Generation::decode(&mut d)?;
        let previous = if d.present("previous generation")? {
            Some(Generation::decode(&mut d)?)
        } else {
            None
        };
        d.finish("the supervisor configuration")?;
        Ok(SupervisorConfig {
            server,
            run_dir,
            server_pid,
            server_uid,
            server_gid,
            groups,
            generation,
            previous,
        })
    }

    /// What the server's workers connect to, one entry per group.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.groups
            .iter()
            .map(|g| Endpoint {
                group: g.name.clone(),
                socket: socket_path(&self.run_dir, &g.name),
                run_dir: self.run_dir.clone(),
                socket_timeout: Duration::from_secs(g.socket_timeout),
                queue_timeout: (g.queue_timeout > 0).then(|| Duration::from_secs(g.queue_timeout)),
                access: self.generation.access(&g.name),
            })
            .collect()
    }

    /// Checks what can be checked before anything starts, in words for the
    /// configuration's author.
    pub fn check(&self) -> Result<(), String> {
        for g in &self.groups {
            let path = socket_path(&self.run_dir, &g.name);
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(format!(
                    "the socket path of daemon group '{}' ({}) is longer than {MAX_SOCKET_PATH} bytes: use a shorter runtime directory or group name",
                    g.name,
                    path.display()
                ));
            }
            if g.name.contains('/') || g.name.starts_with('.') {
                return Err(format!(
                    "daemon group name '{}' may not contain '/' or start with '.'",
                    g.name
                ));
            }
            let id = process::daemon_identity(
                g.user.as_deref(),
                g.group.as_deref(),
                self.server_uid,
                self.server_gid,
            )
            .map_err(|e| format!("daemon group '{}': {e}", g.name))?;
            if let Some(home) = &g.python_home {
                // The daemons run as `id` (with its groups when named): they must read the home.
                let user = interpreter::HomeUser::new(id.uid, id.gid, id.name.is_some());
                interpreter::check_home(home)
                    .and_then(|()| interpreter::check_home_access(home, &user))
                    .map_err(|e| format!("daemon group '{}': python-home: {e}", g.name))?;
            }
        }
        Ok(())
    }
}

/// The master's end of the pipe to a supervisor. Closing it (or the master's
/// death) ends that supervisor's generation.
#[derive(Debug)]
pub struct Lifeline(OwnedFd);

impl Lifeline {
    /// The descriptor, for a server that must keep it across its own reloads.
    pub fn into_raw_fd(self) -> RawFd {
        self.0.into_raw_fd()
    }
}

/// Closes a lifeline descriptor inherited by a server worker process, so that
/// only the master holds it and its death is seen at once.
pub fn close_inherited(fd: RawFd) {
    // SAFETY: closing a descriptor the caller says is an inherited lifeline.
    unsafe { libc::close(fd) };
}

/// Makes a pipe whose two ends close on exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((own_fd(fds[0])?, own_fd(fds[1])?))
}

/// The supervisor reports on this descriptor that its sockets exist ("ok"), or why not.
const STARTED_FD: RawFd = 3;

/// Starts a supervisor for `config` from the server's master process: the
/// `gateway-daemon` executable at `exe`. Returns once the group sockets exist
/// (not once the daemons are ready: requests that arrive before wait in the
/// sockets' queues).
pub fn start(exe: &Path, config: &SupervisorConfig) -> io::Result<Lifeline> {
    start_with(exe, config, None)
}

/// [`start`] for a server that cannot restart a supervisor that dies (nginx):
/// the supervisor gets a keeper that does (see [`keep`]).
pub fn start_kept(exe: &Path, config: &SupervisorConfig) -> io::Result<Lifeline> {
    start_with(exe, config, Some(KEPT))
}

fn start_with(
    exe: &Path,
    config: &SupervisorConfig,
    flag: Option<&std::ffi::CStr>,
) -> io::Result<Lifeline> {
    config.check().map_err(io::Error::other)?;
    let exe_c = CString::new(exe.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let role = c"supervisor";
    let argv = [
        exe_c.as_ptr(),
        role.as_ptr(),
        flag.map_or(std::ptr::null(), |f| f.as_ptr()),
        std::ptr::null(),
    ];
    let (read_end, write_end) = pipe()?;
    let (started_read, started_write) = pipe()?;
    // SAFETY: fork in the (single-threaded) master; the children only call
    // async-signal-safe functions before exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: new session, second fork, then exec or _exit.
        unsafe {
            libc::setsid();
            if libc::fork() != 0 {
                libc::_exit(0);
            }
            process::reset_signals();
            process::move_fd(read_end.as_raw_fd(), 0);
            process::move_fd(started_write.as_raw_fd(), STARTED_FD);
            process::close_from(STARTED_FD + 1);
            libc::execv(exe_c.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    drop(read_end);
    drop(started_write);
    let mut status = 0;
    // The intermediate child exits at once; nginx's master may reap it first (ECHILD).
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let payload = config.encode();
    let mut pipe = fs::File::from(write_end);
    pipe.write_all(&(payload.len() as u32).to_be_bytes())?;
    pipe.write_all(&payload)?;
    let lifeline = Lifeline(OwnedFd::from(pipe));
    let mut report = String::new();
    fs::File::from(started_read).read_to_string(&mut report)?;
    StartError::from_report(&report, exe)?;
    Ok(lifeline)
}

/// What a supervisor that started writes on [`STARTED_FD`]; one that did not
/// writes why instead, and one that died writes nothing.
const STARTED: &str = "ok";

/// Why a supervisor did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// It ended before it reported how its start went.
    ExitedAtStartup(PathBuf),
    /// It could not start, and said why.
    Failed(String),
}

impl StartError {
    /// Reads the report of the supervisor `exe` on [`STARTED_FD`].
    fn from_report(report: &str, exe: &Path) -> Result<(), StartError> {
        match report {
            STARTED => Ok(()),
            "" => Err(StartError::ExitedAtStartup(exe.to_path_buf())),
            why => Err(StartError::Failed(why.to_string())),
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::ExitedAtStartup(exe) => write!(
                f,
                "the daemon supervisor ({}) exited at start-up",
                exe.display()
            ),
            StartError::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for StartError {}

impl From<StartError> for io::Error {
    fn from(e: StartError) -> io::Error {
        io::Error::other(e)
    }
}

/// Tells [`start`] how the start went, once: [`STARTED`], or why not.
fn report_started(result: Result<(), &str>) {
    let text = result.err().unwrap_or(STARTED);
    // SAFETY: writes to and closes the descriptor start() gave us for this.
    unsafe {
        libc::write(STARTED_FD, text.as_ptr().cast(), text.len());
        libc::close(STARTED_FD);
    }
}

/// Status messages from daemon processes to the supervisor, on one shared pipe:
/// a kind byte and the pid (big-endian), 5 bytes, written atomically.
pub const STATUS_READY: u8 = b'R';
pub const STATUS_DRAINING: u8 = b'D';
/// All the process's threads have been busy for a while (a growing pool grows).
pub const STATUS_BUSY: u8 = b'B';
/// The process has served nothing for idle-timeout (a grown pool shrinks).
pub const STATUS_IDLE: u8 = b'I';

/// The descriptor numbers a daemon process finds at exec.
pub const LISTEN_FD: RawFd = 3;
pub const STATUS_FD: RawFd = 4;
/// The group's status file (its scoreboard), open for writing, when there is one.
pub const BOARD_FD: RawFd = 5;

/// One daemon process as the supervisor sees it.
struct Child {
    group: usize,
    ready: bool,
    draining: bool,
    /// Stopped because the grown pool shrinks.
    shrunk: bool,
    /// Its slot in the group's scoreboard.
    slot: Option<usize>,
}

/// One group's state in the supervisor.
struct Group {
    options: DaemonOptions,
    listener: UnixListener,
    socket: PathBuf,
    inode: (u64, u64),
    /// Whether the socket file was removed and making it again failed (logged once).
    unbound: bool,
    /// Why the group cannot serve, when its daemons fail to start.
    down: Option<String>,
    next_start: Instant,
    failures: u32,
    /// How many processes the group runs now: from min to max processes.
    wanted: usize,
    /// No growth before this: one process a second at most.
    next_growth: Instant,
    /// The status file: the scoreboard the group's processes write into.
    board: Option<StatusFile>,
}

/// A group's status file as the supervisor holds it.
struct StatusFile {
    board: Board,
    /// Open for writing: each daemon process inherits it.
    fd: OwnedFd,
    /// Which file it is, to remove it at the end only if it is still this one.
    id: (u64, u64),
}

struct Supervisor {
    config: SupervisorConfig,
    run_dir: RunDir,
    exe: CString,
    groups: Vec<Group>,
    children: HashMap<i32, Child>,
    status_read: OwnedFd,
    status_write: OwnedFd,
    stopping: Option<Instant>,
}

/// The supervisor process: `gateway-daemon supervisor`, started by [`start`].
pub fn run() -> ! {
    process::log_to_stderr();
    let config = match read_config() {
        Ok(c) => c,
        Err(e) => {
            report_started(Err(&format!(
                "the daemon supervisor cannot read its configuration: {e}"
            )));
            std::process::exit(2);
        }
    };
    process::set_title(None, "gateway-super");
    let mut supervisor = match Supervisor::new(config) {
        Ok(s) => s,
        Err(e) => {
            report_started(Err(&e.to_string()));
            std::process::exit(1);
        }
    };
    report_started(Ok(()));
    if std::env::args().nth(2).as_deref() == KEPT.to_str().ok() {
        supervisor = keep(supervisor);
    }
    match supervisor.run() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            log::error!("daemon supervisor: {e}");
            std::process::exit(1);
        }
    }
}

fn read_config() -> io::Result<SupervisorConfig> {
    // SAFETY: fd 0 is the lifeline pipe, owned by this process for its whole life.
    let mut stdin = std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(0) });
    let mut len = [0u8; 4];
    stdin.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > protocol::MAX_FRAME {
        return Err(io::Error::other("configuration too large"));
    }
    let mut data = vec![0; len];
    stdin.read_exact(&mut data)?;
    SupervisorConfig::decode(&data).map_err(io::Error::from)
}

fn own_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: fd was just returned by a successful system call.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Binds a group's socket under a temporary name, gives it to the server's
/// worker user, then renames it into place: a previous generation's daemons keep
/// their own socket until they drain, and new connections reach this generation
/// at once. Returns the listener and which file the socket path now is.
fn bind_group_socket(
    run_dir: &RunDir,
    config: &SupervisorConfig,
    name: &str,
    backlog: u32,
) -> io::Result<(UnixListener, (u64, u64))> {
    let tmp = format!(".{name}.{}", std::process::id());
    run_dir.remove(&tmp)?;
    let listener = bind_private(&run_dir.path().join(&tmp))?;
    // Requests wait there while daemons start, restart or are all busy; beyond
    // it a connection is refused at once, which the server answers with a 503.
    // SAFETY: listen on our own socket.
    unsafe { libc::listen(listener.as_raw_fd(), backlog as libc::c_int) };
    run_dir.set_owner(&tmp, config.server_uid, config.server_gid)?;
    run_dir.rename(&tmp, &socket_name(name))?;
    let inode = run_dir.entry(&socket_name(name))?.id;
    listener.set_nonblocking(true)?;
    Ok((listener, inode))
}

/// Makes the status file of group `options` for this generation: slots for
/// its processes, those that drain and their replacements. The daemon
/// processes write it through the descriptor they inherit; the server's
/// workers read it. Without it the group runs, unseen by the status page.
fn make_board(
    run_dir: &RunDir,
    config: &SupervisorConfig,
    options: &DaemonOptions,
) -> Option<StatusFile> {
    let slots = 2 * options.processes.max(1) as usize + 2;
    let name = status_name(&options.name);
    let made = run_dir
        .create_shared(&name, config.server_gid)
        .and_then(|fd| {
            let board = Board::create_in(fd.as_raw_fd(), slots, options.status_counters)?;
            let id = run_dir.entry(&name)?.id;
            Ok(StatusFile { board, fd, id })
        });
    match made {
        Ok(board) => Some(board),
        Err(e) => {
            log::warn!(
                "cannot make the status file of daemon group '{}' in {}: {e}; the status page will not show it",
                options.name,
                run_dir.path().display()
            );
            None
        }
    }
}

/// Binds a Unix socket whose file is mode 0600 from the start, so that nobody
/// but its owner can connect before it is handed over.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's mask; the supervisor is single-threaded.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask the daemons inherit.
    unsafe { libc::umask(previous) };
    bound.map_err(|e| io::Error::other(format!("cannot listen on {}: {e}", path.display())))
}

impl Supervisor {
    fn new(config: SupervisorConfig) -> io::Result<Supervisor> {
        let run_dir = RunDir::prepare(&config.run_dir, config.server_gid)?;
        let exe = std::env::current_exe()?;
        let exe = CString::new(exe.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        let mut groups = Vec::new();
        for options in &config.groups {
            let (listener, inode) =
                bind_group_socket(&run_dir, &config, &options.name, options.listen_backlog)?;
            groups.push(Group {
                options: options.clone(),
                listener,
                socket: socket_path(&config.run_dir, &options.name),
                inode,
                unbound: false,
                down: None,
                next_start: Instant::now(),
                failures: 0,
                wanted: options.min_processes.clamp(1, options.processes) as usize,
                next_growth: Instant::now(),
                board: make_board(&run_dir, &config, options),
            });
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (status_read, status_write) = (own_fd(fds[0])?, own_fd(fds[1])?);
        Ok(Supervisor {
            config,
            run_dir,
            exe,
            groups,
            children: HashMap::new(),
            status_read,
            status_write,
            stopping: None,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let signals = own_fd(process::signal_fd(&[
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
        ])?)?;
        log::info!(
            "daemon supervisor for {} started: {} group(s) in {}",
            self.config.server,
            self.groups.len(),
            self.config.run_dir.display()
        );
        let mut last_check = Instant::now();
        loop {
            // A bug must not take the daemons down with the supervisor: the
            // round is logged and the next one goes on from the state as it is.
            match panic::catch(|| self.turn(signals.as_raw_fd(), &mut last_check)) {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => break,
                Ok(Err(e)) => return Err(e),
                Err(p) => {
                    log::error!(
                        "{p} in the daemon supervisor: {}; going on in a second",
                        p.message
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        self.cleanup();
        log::info!("daemon supervisor for {} stopped", self.config.server);
        Ok(())
    }

    /// One round of the supervisor's loop: starts what is missing, waits up to
    /// 200 ms for something to happen and acts on it. False once it stopped and
    /// its daemons are gone.
    fn turn(&mut self, signals: RawFd, last_check: &mut Instant) -> io::Result<bool> {
        if self.stopping.is_none() {
            self.start_missing();
        }
        if let Some(since) = self.stopping {
            if self.children.is_empty() {
                return Ok(false);
            }
            if since.elapsed() > self.grace() {
                self.kill_stragglers();
            }
        }
        let down: Vec<usize> = (0..self.groups.len())
            .filter(|&i| self.is_down(i))
            .collect();
        let polled = self.wait(signals, &down)?;
        self.handle(&polled, signals, &down);
        if last_check.elapsed() > Duration::from_secs(1) && self.stopping.is_none() {
            *last_check = Instant::now();
            self.check_master();
            self.restore_sockets();
        }
        Ok(true)
    }

    /// Kills the daemons still busy after graceful-timeout.
    fn kill_stragglers(&self) {
        for &pid in self.children.keys() {
            log::warn!("daemon process {pid} still busy after graceful-timeout; killing it");
            // SAFETY: signals our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Waits up to 200 ms for the lifeline (unless stopping), a signal, a
    /// daemon's status, or a connection to one of the groups that are `down`.
    fn wait(&self, signals: RawFd, down: &[usize]) -> io::Result<Vec<libc::pollfd>> {
        let watch = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let lifeline = if self.stopping.is_some() { -1 } else { 0 };
        let mut polled = vec![
            watch(lifeline),
            watch(signals),
            watch(self.status_read.as_raw_fd()),
        ];
        polled.extend(
            down.iter()
                .map(|&i| watch(self.groups[i].listener.as_raw_fd())),
        );
        // SAFETY: polls descriptors we own, in a vector we own.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 200) };
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
        Ok(polled)
    }

    /// Acts on what [`Supervisor::wait`] saw, and reaps the daemons that ended.
    fn handle(&mut self, polled: &[libc::pollfd], signals: RawFd, down: &[usize]) {
        if polled[0].revents != 0 && self.lifeline_closed() {
            self.stop("the server closed its lifeline (stop, reload, or its master died)");
        }
        if polled[1].revents != 0 {
            for sig in process::read_signals(signals) {
                if sig != libc::SIGCHLD {
                    self.stop(&format!("received {}", process::signal_name(sig)));
                }
            }
        }
        self.reap();
        if polled[2].revents != 0 {
            self.read_status();
        }
        for (k, &i) in down.iter().enumerate() {
            if polled[3 + k].revents != 0 {
                self.refuse_while_down(i);
            }
        }
    }

    /// Stops when the server's master is gone (if its pid is known).
    fn check_master(&mut self) {
        if self.config.server_pid == 0 {
            return;
        }
        // SAFETY: kill with signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(self.config.server_pid as i32, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            self.stop(&format!(
                "the server's master process {} is gone",
                self.config.server_pid
            ));
        }
    }

    /// Listens anew for each group whose socket file was removed (a tmp cleaner,
    /// an operator): nobody could connect to it any more. A path that names
    /// another socket is left alone: a newer generation took it over.
    fn restore_sockets(&mut self) {
        if self.run_dir.is_removed() {
            // A failure shows in each group's attempt to listen anew.
            if let Ok(dir) = RunDir::prepare(&self.config.run_dir, self.config.server_gid) {
                log::warn!(
                    "the run directory {} was removed; made it again",
                    dir.path().display()
                );
                self.run_dir = dir;
            }
        }
        for i in 0..self.groups.len() {
            let missing = self
                .run_dir
                .entry(&socket_name(&self.groups[i].options.name))
                .is_err_and(|e| e.kind() == io::ErrorKind::NotFound);
            if missing {
                self.rebind(i);
            }
        }
    }

    /// Gives group `i` a new socket and replaces its daemon processes, which
    /// listen on the old one: they drain while new ones start on the new socket.
    fn rebind(&mut self, i: usize) {
        let group = &self.groups[i];
        let name = &group.options.name;
        let socket = group.socket.display();
        match bind_group_socket(
            &self.run_dir,
            &self.config,
            name,
            group.options.listen_backlog,
        ) {
            Ok((listener, inode)) => {
                log::warn!("the socket of daemon group '{name}' ({socket}) was removed; listening on a new one and replacing the group's daemon processes");
                let group = &mut self.groups[i];
                group.listener = listener;
                group.inode = inode;
                group.unbound = false;
                for (&pid, child) in self.children.iter_mut().filter(|(_, c)| c.group == i) {
                    child.draining = true;
                    // SAFETY: signals our own child: it finishes its requests and exits.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
            Err(e) if !group.unbound => {
                log::error!("the socket of daemon group '{name}' ({socket}) was removed and cannot be made again: {e}; retrying every second");
                self.groups[i].unbound = true;
            }
            Err(_) => {}
        }
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(
            self.groups
                .iter()
                .map(|g| g.options.graceful_timeout)
                .max()
                .unwrap_or(0)
                + 1,
        )
    }

    /// Whether the lifeline reached end of file (anything else on it is ignored).
    fn lifeline_closed(&self) -> bool {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a buffer we own.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted)
    }

    /// A group is down when none of its daemons is ready and the last start failed.
    fn is_down(&self, i: usize) -> bool {
        self.groups[i].down.is_some() && !self.children.values().any(|c| c.group == i && c.ready)
    }

    /// Answers connections to a group that cannot serve with the reason, so that
    /// clients fail fast with a 503 instead of waiting.
    fn refuse_while_down(&mut self, i: usize) {
        let group = &self.groups[i];
        let reason = group.down.clone().unwrap_or_default();
        while let Ok((mut stream, _)) = group.listener.accept() {
            let mut out = Vec::new();
            let _ = protocol::put_with(&mut out, Kind::Unavailable, |e| e.str(&reason));
            let _ = stream.set_nonblocking(true);
            let _ = stream.write_all(&out);
        }
    }

    fn start_missing(&mut self) {
        for i in 0..self.groups.len() {
            let serving = self
                .children
                .values()
                .filter(|c| c.group == i && !c.draining)
                .count();
            let wanted = self.groups[i].wanted;
            if serving < wanted && Instant::now() >= self.groups[i].next_start {
                for _ in serving..wanted {
                    if let Err(e) = self.spawn(i) {
                        log::error!(
                            "cannot start a daemon process of group '{}': {e}",
                            self.groups[i].options.name
                        );
                        self.groups[i].next_start = Instant::now() + Duration::from_secs(1);
                        break;
                    }
                }
            }
        }
    }

    /// What a daemon process of group `i` reads on its stdin.
    fn worker_config(&self, i: usize) -> Vec<u8> {
        let name = &self.groups[i].options.name;
        super::worker::WorkerConfig {
            server: self.config.server.clone(),
            supervisor_pid: std::process::id(),
            server_uid: self.config.server_uid,
            server_gid: self.config.server_gid,
            options: self.groups[i].options.clone(),
            access: self.config.generation.access(name),
            previous: self.config.previous.as_ref().map(|p| p.access(name)),
        }
        .encode()
    }

    /// The environment of a daemon process of group `i` (see
    /// [`process::daemon_environment`]).
    fn worker_environment(&self, i: usize) -> Vec<CString> {
        let options = &self.groups[i].options;
        // A user that does not exist is the daemon's to report, as it exits.
        let uid = process::daemon_identity(
            options.user.as_deref(),
            options.group.as_deref(),
            self.config.server_uid,
            self.config.server_gid,
        )
        .map_or(self.config.server_uid, |id| id.uid);
        process::daemon_environment(
            &self.config.server,
            std::env::vars_os(),
            crate::common::account::account(uid).as_ref(),
        )
    }

    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let (config_read, config_write) = pipe()?;
        // The configuration is small: it fits in the pipe before the child reads it.
        fs::File::from(config_write).write_all(&self.worker_config(i))?;
        let role = c"worker";
        // Room for the display name when the title overwrites argv.
        let padding = CString::new(" ".repeat(96)).expect("no NUL");
        let argv = [
            self.exe.as_ptr(),
            role.as_ptr(),
            padding.as_ptr(),
            std::ptr::null(),
        ];
        let env = self.worker_environment(i);
        let file = self.groups[i].board.as_ref();
        let slot = file.and_then(|f| f.board.free_slot());
        if let (Some(file), Some(slot)) = (file, slot) {
            file.board.prepare(slot, self.groups[i].options.threads);
        }
        let board_fd = file.map(|f| f.fd.as_raw_fd());
        // The child takes its slot before exec, so that it finds it at once.
        let own_slot = file.zip(slot).map(|(f, i)| &f.board.slots()[i]);
        let envp: Vec<*const libc::c_char> = env
            .iter()
            .map(|var| var.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        // SAFETY: the supervisor is single-threaded; the child calls only
        // async-signal-safe functions before exec.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            if let Some(own) = own_slot {
                // An atomic store into shared memory: async-signal-safe.
                // SAFETY: getpid has no preconditions.
                own.set_pid(unsafe { libc::getpid() } as u32);
            }
            // SAFETY: in the child, between fork and exec.
            unsafe {
                process::reset_signals();
                process::move_fd(config_read.as_raw_fd(), 0);
                process::move_fd(self.groups[i].listener.as_raw_fd(), LISTEN_FD);
                process::move_fd(self.status_write.as_raw_fd(), STATUS_FD);
                match board_fd {
                    Some(fd) => {
                        process::move_fd(fd, BOARD_FD);
                        process::close_from(BOARD_FD + 1);
                    }
                    None => process::close_from(STATUS_FD + 1),
                }
                libc::execve(self.exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        if let (Some(file), Some(slot)) = (self.groups[i].board.as_ref(), slot) {
            file.board.slots()[slot].set_pid(pid as u32);
        }
        self.children.insert(
            pid,
            Child {
                group: i,
                ready: false,
                draining: false,
                shrunk: false,
                slot,
            },
        );
        Ok(())
    }

    fn read_status(&mut self) {
        let mut buf = [0u8; 5 * 64];
        loop {
            // SAFETY: reads into a buffer we own.
            let n = unsafe {
                libc::read(
                    self.status_read.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n <= 0 {
                return;
            }
            for msg in buf[..n as usize].chunks_exact(5) {
                let pid = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as i32;
                let Some(child) = self.children.get_mut(&pid) else {
                    continue;
                };
                let state = match msg[0] {
                    STATUS_READY => Some(State::Ready),
                    STATUS_DRAINING => Some(State::Draining),
                    _ => None,
                };
                if let (Some(state), Some(slot)) = (state, child.slot) {
                    if let Some(file) = &self.groups[child.group].board {
                        file.board.slots()[slot].set_state(state);
                    }
                }
                match msg[0] {
                    STATUS_READY => {
                        child.ready = true;
                        let group = &mut self.groups[child.group];
                        group.down = None;
                        group.failures = 0;
                    }
                    STATUS_DRAINING => child.draining = true,
                    // A draining process's load no longer counts.
                    STATUS_BUSY if !child.draining => {
                        let group = child.group;
                        self.grow(group);
                    }
                    STATUS_IDLE if !child.draining => {
                        let group = child.group;
                        self.shrink(group, pid);
                    }
                    _ => {}
                }
            }
        }
    }

    /// One more process for group `i`, whose processes are all busy, up to
    /// its maximum.
    fn grow(&mut self, i: usize) {
        let group = &mut self.groups[i];
        if group.wanted >= group.options.processes as usize || Instant::now() < group.next_growth {
            return;
        }
        group.wanted += 1;
        group.next_growth = Instant::now() + Duration::from_secs(1);
        log::info!(
            "daemon process group '{}' grows to {} process(es) (at most {}): all threads of a process have been busy for {}ms",
            group.options.name,
            group.wanted,
            group.options.processes,
            super::worker::BUSY_PERIOD.as_millis()
        );
        self.start_missing();
    }

    /// Stops process `pid` of group `i`, idle for idle-timeout, when the
    /// group runs more than its minimum.
    fn shrink(&mut self, i: usize, pid: i32) {
        let group = &mut self.groups[i];
        if group.wanted <= group.options.min_processes as usize || !self.children.contains_key(&pid)
        {
            return;
        }
        group.wanted -= 1;
        log::info!(
            "daemon process group '{}' shrinks to {} process(es) (at least {}): process {pid} served nothing for idle-timeout={}s",
            group.options.name,
            group.wanted,
            group.options.min_processes,
            group.options.idle_timeout
        );
        let Some(child) = self.children.get_mut(&pid) else {
            return;
        };
        child.draining = true;
        child.shrunk = true;
        // SAFETY: pid is a child this process has not reaped (it is in
        // `children`), so the pid is still its: it drains and exits.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }

    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: reaps our own children without blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let Some(child) = self.children.remove(&pid) else {
                continue;
            };
            let how = describe_status(status);
            self.prune_exit_records();
            if let Err(e) = self
                .run_dir
                .write_new(&exit_record_name(pid as u32), how.as_bytes())
            {
                log::warn!(
                    "cannot record how daemon process {pid} ended in {}: {e}",
                    self.run_dir.path().display()
                );
            }
            let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            self.retire(&child, clean);
            let group = &mut self.groups[child.group];
            let name = &group.options.name;
            if self.stopping.is_some() || (child.draining && clean) {
                log::info!("daemon process {pid} of group '{name}' {how}");
            } else if !child.ready {
                group.failures += 1;
                let delay = Duration::from_millis(250u64 << group.failures.min(5));
                let reason = format!("daemon process {pid} of group '{name}' {how} before it was ready (see the lines above)");
                log::error!("{reason}; next attempt in {} ms", delay.as_millis());
                group.down = Some(reason);
                group.next_start = Instant::now() + delay;
            } else {
                log::error!("daemon process {pid} of group '{name}' {how}; starting a replacement");
            }
        }
    }

    /// Keeps what the ended process `child` counted in its group's totals, and
    /// counts why it was replaced: its own word for a clean exit (max-requests,
    /// memory, change), the supervisor's for a shrink or a stop, a crash otherwise.
    fn retire(&self, child: &Child, clean: bool) {
        let (Some(file), Some(slot)) = (&self.groups[child.group].board, child.slot) else {
            return;
        };
        let board = &file.board;
        let told = board.slots()[slot].reason();
        let reason = if child.shrunk {
            Reason::IdleShrink
        } else if self.stopping.is_some() {
            Reason::Reload
        } else if !clean {
            Reason::Crash
        } else {
            told.unwrap_or(Reason::Reload)
        };
        board.retire(slot, Some(reason));
    }

    /// Removes exit records old enough that no client still waits for them (a
    /// long-lived server recycles processes without end).
    fn prune_exit_records(&self) {
        for name in self.run_dir.names_starting(EXIT_RECORD_PREFIX) {
            let old = self.run_dir.entry(&name).is_ok_and(|e| {
                e.modified
                    .elapsed()
                    .is_ok_and(|age| age > Duration::from_secs(60))
            });
            if old {
                let _ = self.run_dir.remove(&name);
            }
        }
    }

    fn stop(&mut self, why: &str) {
        if self.stopping.is_some() {
            return;
        }
        log::info!("daemon supervisor stopping: {why}");
        self.stopping = Some(Instant::now());
        for &pid in self.children.keys() {
            // SAFETY: signals our own child: it stops accepting and finishes its requests.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        self.remove_own_sockets();
    }

    /// Removes each socket path that is still this generation's (a newer
    /// supervisor may have replaced it already).
    fn remove_own_sockets(&self) {
        for g in &self.groups {
            let name = socket_name(&g.options.name);
            if self.run_dir.entry(&name).is_ok_and(|e| e.id == g.inode) {
                let _ = self.run_dir.remove(&name);
            }
            let status = status_name(&g.options.name);
            let own = |e: super::rundir::Entry| g.board.as_ref().is_some_and(|f| f.id == e.id);
            if self.run_dir.entry(&status).is_ok_and(own) {
                let _ = self.run_dir.remove(&status);
            }
        }
    }

    fn cleanup(&self) {
        // Exit records are kept briefly for clients still reporting a death.
        std::thread::sleep(Duration::from_millis(200));
        for name in self.run_dir.names_starting(EXIT_RECORD_PREFIX) {
            let _ = self.run_dir.remove(&name);
        }
        let _ = fs::remove_dir(self.run_dir.path());
    }
}

/// The argument that gives a supervisor a keeper.
const KEPT: &std::ffi::CStr = c"kept";

/// The keeper of a supervisor whose server cannot restart it: this process
/// forks the supervisor and, whenever it dies while the lifeline is still open
/// (a crash, `kill -9`), starts a new one; once the lifeline is closed (a stop,
/// a reload, the master's death), it exits with its supervisor. Returns in the
/// child that is to supervise. The keeper holds none of the group sockets.
fn keep(first: Supervisor) -> Supervisor {
    let config = first.config.clone();
    let mut next = Some(first);
    loop {
        match panic::catch(|| keep_once(&config, &mut next)) {
            Ok(Some(supervisor)) => return supervisor,
            Ok(None) => {}
            Err(p) => {
                log::error!(
                    "{p} in the keeper of the daemon supervisor: {}; going on in a second",
                    p.message
                );
                std::thread::sleep(Duration::from_secs(1));
                exit_if_lifeline_closed();
            }
        }
    }
}

/// One round of the keeper: forks a supervisor (`next`, or a new one for
/// `config`) and returns it in the child; in the keeper, waits for it to end
/// and returns None.
fn keep_once(config: &SupervisorConfig, next: &mut Option<Supervisor>) -> Option<Supervisor> {
    let supervisor = match next.take() {
        Some(s) => s,
        None => match Supervisor::new(config.clone()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("restarting the daemon supervisor failed (next try in a second): {e}");
                std::thread::sleep(Duration::from_secs(1));
                exit_if_lifeline_closed();
                return None;
            }
        },
    };
    // SAFETY: this process is single-threaded; the child goes on as the supervisor.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        return Some(supervisor);
    }
    drop(supervisor);
    if pid < 0 {
        log::error!(
            "cannot fork the daemon supervisor (next try in a second): {}",
            io::Error::last_os_error()
        );
        std::thread::sleep(Duration::from_secs(1));
        exit_if_lifeline_closed();
        return None;
    }
    process::set_title(None, "gateway-keeper");
    let started = Instant::now();
    let status = wait_for(pid);
    exit_if_lifeline_closed();
    log::error!(
        "the daemon supervisor {pid} {}; starting a new one",
        describe_status(status)
    );
    // One that dies at once is not restarted in a busy loop.
    if started.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_secs(1));
    }
    None
}

/// Waits for child `pid` to end; its wait status.
fn wait_for(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child, writing its status into a local.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    status
}

/// Ends the keeper once the server has closed the lifeline (fd 0).
fn exit_if_lifeline_closed() {
    let mut polled = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls our own descriptor without waiting.
    let n = unsafe { libc::poll(&mut polled, 1, 0) };
    if n > 0 && polled.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        std::process::exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_checks_socket_length() {
        let config = SupervisorConfig {
            server: "apache".into(),
            run_dir: PathBuf::from("/run/gateway-1"),
            server_pid: 1,
            server_uid: 33,
            server_gid: 33,
            groups: vec![
                DaemonOptions::parse(&["a", "threads=2"]).unwrap(),
                DaemonOptions::parse(&["b"]).unwrap(),
            ],
            generation: Generation::new(&[], []).unwrap(),
            previous: None,
        };
        assert_eq!(SupervisorConfig::decode(&config.encode()).unwrap(), config);
        let reloaded = SupervisorConfig {
            previous: Some(Generation::new(&[], []).unwrap()),
            ..config.clone()
        };
        assert_eq!(
            SupervisorConfig::decode(&reloaded.encode()).unwrap(),
            reloaded
        );
        assert!(config.check().is_ok());
        assert_eq!(
            config.endpoints()[1].socket,
            PathBuf::from("/run/gateway-1/b.sock")
        );
        let long = SupervisorConfig {
            run_dir: PathBuf::from("/x".repeat(60)),
            ..config
        };
        assert!(long.check().unwrap_err().contains("longer than"));
    }

    #[test]
    fn start_reports_are_read_as_before() {
        let exe = Path::new("/usr/lib/gateway-daemon");
        assert_eq!(StartError::from_report("ok", exe), Ok(()));
        let died = StartError::from_report("", exe).unwrap_err();
        assert_eq!(died, StartError::ExitedAtStartup(exe.to_path_buf()));
        assert_eq!(
            io::Error::from(died).to_string(),
            "the daemon supervisor (/usr/lib/gateway-daemon) exited at start-up"
        );
        let refused = StartError::from_report("cannot listen on /x: no", exe).unwrap_err();
        assert_eq!(refused.to_string(), "cannot listen on /x: no");
    }
}
