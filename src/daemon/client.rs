//! The server side of daemon mode: forwards a request to a daemon group and
//! relays the response. Server-neutral and callable from any thread: the server
//! passes its request head, a [`RequestBody`] and a [`ResponseChannel`], exactly
//! as for embedded mode.
//!
//! Connections are kept in a per-process pool and reused. A pooled connection the
//! daemon closed in the meantime (it drained, or was recycled) is detected before
//! any of the request was processed and the request is retried on a new one.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Write};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use std::sync::LazyLock;

#[cfg(fuzzing)]
pub mod fuzzing;

use super::process;
use super::protocol::{self, Kind, HEADER_LEN, MAX_FRAME};
use super::{exit_record_path, Endpoint};
use crate::common::cgi::RequestHead;
use crate::common::config::AppSpec;
use crate::common::framing::{self, BodyFraming};
use crate::common::log::request_line;
use crate::common::socket;
use crate::common::transport::{Outcome, RequestBody, ResponseChannel};
use crate::ops::scoreboard;

static ENDPOINTS: LazyLock<RwLock<HashMap<String, Arc<Endpoint>>>> =
    LazyLock::new(Default::default);

/// Sets the daemon groups this process can reach (the server's master calls it
/// for each configuration generation; its worker processes inherit the result).
pub fn set_endpoints(endpoints: Vec<Endpoint>) {
    let map = endpoints
        .into_iter()
        .map(|e| (e.group.clone(), Arc::new(e)))
        .collect();
    *ENDPOINTS.write().unwrap_or_else(|e| e.into_inner()) = map;
}

/// The endpoint of a daemon group, if configured.
pub fn endpoint(group: &str) -> Option<Arc<Endpoint>> {
    ENDPOINTS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(group)
        .cloned()
}

/// Every daemon group this process can reach, by name.
pub fn endpoints() -> Vec<Arc<Endpoint>> {
    let map = ENDPOINTS.read().unwrap_or_else(|e| e.into_inner());
    let mut all: Vec<_> = map.values().cloned().collect();
    all.sort_by(|a, b| a.group.cmp(&b.group));
    all
}

/// One connection to a daemon process.
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The daemon process on the other end (from its Hello).
    pid: u32,
    /// The Auth frame of a new connection, sent with its first request: a
    /// draining daemon may close a connection it just accepted, and the request
    /// is then retried on another (which a failure in `connect` could not be).
    auth: Vec<u8>,
}

/// Idle connections per socket.
static POOL: LazyLock<Mutex<HashMap<PathBuf, Vec<Conn>>>> = LazyLock::new(Default::default);
const MAX_IDLE: usize = 128;

/// How often a request waiting for its daemon looks whether its client left.
const CLIENT_CHECK_INTERVAL: Duration = Duration::from_millis(200);

fn pool_take(socket: &Path) -> Option<Conn> {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(socket)?
        .pop()
}

fn pool_put(socket: &Path, conn: Conn) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let idle = pool.entry(socket.to_path_buf()).or_default();
    if idle.len() < MAX_IDLE {
        idle.push(conn);
    }
}

/// Why no connection to a daemon group could be made. Each is answered with a
/// 503 and its text in the log (the tests look for these messages).
#[derive(Debug)]
pub enum ConnectError {
    /// No socket could be created.
    Socket(io::Error),
    /// The socket path does not fit in a Unix socket address.
    PathTooLong(PathBuf),
    /// All the group's threads are busy and its queue of waiting connections is full.
    Overloaded { group: String },
    /// Only the server's worker user may connect, and this process runs as another.
    PermissionDenied { group: String, socket: PathBuf },
    /// Nobody listens on the group's socket.
    NotRunning { group: String, socket: PathBuf },
    /// Connecting failed for another reason.
    Connect {
        group: String,
        socket: PathBuf,
        error: io::Error,
    },
    /// The connection could not be given its timeouts.
    Setup { group: String, error: io::Error },
    /// The daemon's greeting could not be read as one.
    MalformedGreeting {
        group: String,
        error: protocol::ProtocolError,
    },
    /// The supervisor answered for a group that cannot serve, and said why.
    Down { group: String, reason: String },
    /// The other end closed the connection without a word.
    ClosedAtOnce { group: String },
    /// No daemon process took the connection within `limit`.
    TimedOut { group: String, limit: WaitLimit },
    /// Reading the greeting failed for another reason.
    NoGreeting { group: String, error: io::Error },
}

/// Which setting bounds the wait for a daemon process to take a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitLimit {
    /// `queue-timeout`: the request waits for a thread.
    Queue(Duration),
    /// `socket-timeout`, when there is no `queue-timeout`.
    Socket(Duration),
}

impl WaitLimit {
    fn duration(self) -> Duration {
        match self {
            WaitLimit::Queue(t) | WaitLimit::Socket(t) => t,
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Socket(e) => write!(f, "cannot create a socket: {e}"),
            ConnectError::PathTooLong(socket) => {
                write!(f, "socket path {} is too long", socket.display())
            }
            ConnectError::Overloaded { group } => write!(
                f,
                "daemon process group '{group}' is overloaded: all its threads are busy and its queue of waiting connections is full"
            ),
            ConnectError::PermissionDenied { group, socket } => write!(
                f,
                "permission denied on {}: only the server's worker user may connect to daemon process group '{group}'; \
                 was the server's User/Group (nginx: user) changed without a full restart?",
                socket.display()
            ),
            ConnectError::NotRunning { group, socket } => write!(
                f,
                "daemon process group '{group}' is not running (no one listens on {})",
                socket.display()
            ),
            ConnectError::Connect {
                group,
                socket,
                error,
            } => write!(
                f,
                "cannot connect to daemon process group '{group}' at {}: {error}",
                socket.display()
            ),
            ConnectError::Setup { group, error } => write!(
                f,
                "cannot set up the connection to daemon process group '{group}': {error}"
            ),
            ConnectError::MalformedGreeting { group, error } => write!(
                f,
                "daemon process group '{group}' sent a malformed greeting: {error}"
            ),
            ConnectError::Down { group, reason } => {
                write!(f, "daemon process group '{group}' is down: {reason}")
            }
            ConnectError::ClosedAtOnce { group } => write!(
                f,
                "daemon process group '{group}' closed the connection at once"
            ),
            ConnectError::TimedOut {
                group,
                limit: WaitLimit::Queue(t),
            } => write!(
                f,
                "no daemon process of group '{group}' took the request within queue-timeout={}s: all its threads are busy",
                t.as_secs()
            ),
            ConnectError::TimedOut {
                group,
                limit: WaitLimit::Socket(t),
            } => write!(
                f,
                "no daemon process of group '{group}' took the connection within socket-timeout={}s",
                t.as_secs()
            ),
            ConnectError::NoGreeting { group, error } => {
                write!(f, "daemon process group '{group}' did not greet: {error}")
            }
        }
    }
}

impl std::error::Error for ConnectError {}

/// Opens a connection to a process of group `ep`, reads its greeting, and
/// prepares the proof of the secret that goes with the first request.
fn connect(ep: &Endpoint) -> Result<Conn, ConnectError> {
    let stream = dial(ep)?;
    let setup = |error| ConnectError::Setup {
        group: ep.group.clone(),
        error,
    };
    // Until a daemon process accepts, the connection waits in the group's queue.
    let greeting_limit = match ep.queue_timeout {
        Some(t) => WaitLimit::Queue(t),
        None => WaitLimit::Socket(ep.socket_timeout),
    };
    let writer = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(greeting_limit.duration())))
        .and_then(|_| stream.set_write_timeout(Some(ep.socket_timeout)))
        .and_then(|_| stream.try_clone())
        .map_err(setup)?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let pid = greeting(ep, &mut reader, greeting_limit)?;
    let mut auth = Vec::new();
    protocol::put_auth(&mut auth, &ep.access.secret);
    reader
        .get_ref()
        .set_read_timeout(Some(ep.socket_timeout))
        .map_err(setup)?;
    Ok(Conn {
        reader,
        writer,
        pid,
        auth,
    })
}

/// [`connect`], counted in the group's queue (for the status page) until a
/// daemon process takes the connection.
fn connect_queued(ep: &Endpoint) -> Result<Conn, ConnectError> {
    let _queued = scoreboard::group(&ep.group).map(|g| g.enter_queue());
    connect(ep)
}

/// Connects a new socket to the group's, without waiting: a full queue is
/// refused at once rather than waited on.
fn dial(ep: &Endpoint) -> Result<UnixStream, ConnectError> {
    // SAFETY: creates a socket owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(ConnectError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = socket_address(&ep.socket)?;
    // SAFETY: connects our socket to a complete sockaddr_un.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(refusal(ep, io::Error::last_os_error()));
    }
    Ok(UnixStream::from(fd))
}

/// The address of the Unix socket at `path`.
fn socket_address(path: &Path) -> Result<libc::sockaddr_un, ConnectError> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(ConnectError::PathTooLong(path.to_path_buf()));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(addr)
}

/// What a failed `connect` to group `ep` means.
fn refusal(ep: &Endpoint, error: io::Error) -> ConnectError {
    let group = ep.group.clone();
    let socket = ep.socket.clone();
    match error.raw_os_error() {
        Some(libc::EAGAIN) => ConnectError::Overloaded { group },
        Some(libc::EACCES) => ConnectError::PermissionDenied { group, socket },
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => ConnectError::NotRunning { group, socket },
        _ => ConnectError::Connect {
            group,
            socket,
            error,
        },
    }
}

/// Reads the daemon's greeting: the pid of the process that took the connection.
fn greeting(
    ep: &Endpoint,
    reader: &mut BufReader<UnixStream>,
    limit: WaitLimit,
) -> Result<u32, ConnectError> {
    let group = ep.group.clone();
    let mut payload = Vec::new();
    match protocol::read_frame(reader, &mut payload) {
        Ok(Some((Kind::Hello, _))) => match protocol::decode_hello(&payload) {
            Ok((pid, _)) => Ok(pid),
            Err(error) => Err(ConnectError::MalformedGreeting { group, error }),
        },
        Ok(Some((Kind::Unavailable, _))) => {
            let reason = protocol::Decoder::new(&payload)
                .str("reason")
                .unwrap_or("unknown")
                .to_string();
            Err(ConnectError::Down { group, reason })
        }
        Ok(_) => Err(ConnectError::ClosedAtOnce { group }),
        Err(e) if is_timeout(&e) => Err(ConnectError::TimedOut { group, limit }),
        Err(error) => Err(ConnectError::NoGreeting { group, error }),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Whether a process still runs. A daemon runs as another user, so this reads
/// its state from /proc: a killed process stays a zombie until reaped, and
/// `kill(pid, 0)` would still find it.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// How daemon process `pid` ended, from the supervisor's record (which follows
/// its death within milliseconds).
fn death_of(run_dir: &Path, pid: u32) -> Option<String> {
    let record = exit_record_path(run_dir, pid);
    let start = Instant::now();
    loop {
        if let Ok(how) = std::fs::read_to_string(&record) {
            return Some(how);
        }
        // A process killed a moment ago closes its sockets before /proc shows
        // it dead: only one still alive after a short while is.
        let waited = start.elapsed();
        if waited > Duration::from_secs(1) || (waited > STILL_ALIVE && alive(pid)) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long a daemon process must still look alive after closing a
/// connection for the close to count as its own (a drain), not its death.
const STILL_ALIVE: Duration = Duration::from_millis(100);

thread_local! {
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Forwards one request to daemon group `ep` and relays the response into `resp`.
/// `has_body` false promises an empty body (the daemon then never asks for it).
pub fn forward(
    ep: &Endpoint,
    app: &AppSpec,
    head: &RequestHead<'_>,
    has_body: bool,
    body: &mut dyn RequestBody,
    resp: &mut dyn ResponseChannel,
) -> Outcome {
    let log = |resp: &dyn ResponseChannel, level: log::Level, msg: &str| {
        resp.log(level, &request_line(head.method, head.request_uri, msg));
    };
    let Some(index) = ep.access.index_of(app) else {
        let msg = format!(
            "{} is not among the applications of daemon process group '{}'; answering 500",
            app.file.display(),
            ep.group
        );
        log(resp, log::Level::Error, &msg);
        return Outcome::Status(500);
    };
    SCRATCH.with(|scratch| {
        let (out, payload) = &mut *scratch.borrow_mut();
        out.clear();
        if let Err(e) = protocol::put_request(out, index, protocol::monotonic_us(), head, has_body) {
            log(resp, log::Level::Error, &format!("the request head cannot be sent to the daemon: {e}"));
            return Outcome::Status(431);
        }
        // A daemon that drains may close a connection it just accepted: try another.
        let mut fresh_retries = 2;
        loop {
            let (conn, reused) = match pool_take(&ep.socket) {
                Some(conn) => (conn, true),
                None => match connect_queued(ep) {
                    Ok(conn) => (conn, false),
                    Err(refused) => {
                        log(resp, log::Level::Error, &format!("{refused}; answering 503"));
                        return Outcome::Status(503);
                    }
                },
            };
            let mut exchange = Exchange {
                ep,
                conn,
                payload,
                framing: None,
                head_request: head.method == b"HEAD",
                pulled: false,
                heard: false,
            };
            match exchange.run(out, body, resp, &log) {
                Step::Done(reply, reusable) => {
                    if reusable {
                        pool_put(&ep.socket, exchange.conn);
                    }
                    return reply;
                }
                Step::Retry if reused => continue,
                Step::Retry if fresh_retries > 0 => fresh_retries -= 1,
                Step::Retry => {
                    log(resp, log::Level::Error, &format!("daemon process group '{}' closed a new connection at once; answering 503", ep.group));
                    return Outcome::Status(503);
                }
            }
        }
    })
}

enum Step {
    /// The request is over; the bool says whether the connection can be reused.
    Done(Outcome, bool),
    /// Nothing of the request reached the daemon: try another connection.
    Retry,
}

struct Exchange<'a> {
    ep: &'a Endpoint,
    conn: Conn,
    payload: &'a mut Vec<u8>,
    /// Set once the response head went out: how much body it allows.
    framing: Option<BodyFraming>,
    head_request: bool,
    pulled: bool,
    heard: bool,
}

type Logger<'l> = dyn Fn(&dyn ResponseChannel, log::Level, &str) + 'l;

impl Exchange<'_> {
    /// Sends the request and relays what the daemon answers, frame by frame,
    /// until the request is over.
    fn run(
        &mut self,
        request: &[u8],
        body: &mut dyn RequestBody,
        resp: &mut dyn ResponseChannel,
        log: &Logger<'_>,
    ) -> Step {
        let auth = std::mem::take(&mut self.conn.auth);
        let sent = self
            .conn
            .writer
            .write_all(&auth)
            .and_then(|_| self.conn.writer.write_all(request));
        if sent.is_err() {
            // The daemon closed this connection before reading anything of it.
            return Step::Retry;
        }
        let mut body_buf = Vec::new();
        loop {
            if let Err(step) = self.await_frame(body, resp, log) {
                return step;
            }
            let (kind, flags) = match self.next_frame(resp, log) {
                Ok(frame) => frame,
                Err(step) => return step,
            };
            self.heard = true;
            if let ControlFlow::Break(step) =
                self.on_frame(kind, flags, body, &mut body_buf, resp, log)
            {
                return step;
            }
        }
    }

    /// Waits for the daemon's next frame, up to socket-timeout, looking at the
    /// client meanwhile: one that leaves ends the request here, and closing the
    /// connection tells the daemon (an ASGI application gets `http.disconnect`,
    /// any application's next write fails).
    fn await_frame(
        &mut self,
        body: &mut dyn RequestBody,
        resp: &mut dyn ResponseChannel,
        log: &Logger<'_>,
    ) -> Result<(), Step> {
        if !self.conn.reader.buffer().is_empty() {
            return Ok(());
        }
        let fd = self.conn.reader.get_ref().as_raw_fd();
        let deadline = Instant::now() + self.ep.socket_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if socket::readable_within(fd, left.min(CLIENT_CHECK_INTERVAL)) {
                return Ok(());
            }
            if body.client_gone() {
                let _ = self.conn.writer.shutdown(std::net::Shutdown::Both);
                let msg = "the client closed the connection while the application was running";
                log(resp, log::Level::Info, msg);
                return Err(Step::Done(Outcome::ClientGone, false));
            }
            if left.is_zero() {
                return Err(self.silent(resp, log));
            }
        }
    }

    /// The daemon sent nothing for socket-timeout: a 504.
    fn silent(&mut self, resp: &mut dyn ResponseChannel, log: &Logger<'_>) -> Step {
        let msg = format!(
            "daemon process {} of group '{}' sent nothing for socket-timeout={}s",
            self.conn.pid,
            self.ep.group,
            self.ep.socket_timeout.as_secs()
        );
        self.fail(resp, log, 504, &msg)
    }

    /// Reads the daemon's next frame into the payload buffer.
    fn next_frame(
        &mut self,
        resp: &mut dyn ResponseChannel,
        log: &Logger<'_>,
    ) -> Result<(Kind, u16), Step> {
        match protocol::read_frame(&mut self.conn.reader, self.payload) {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(self.lost(resp, log, "closed the connection".into())),
            Err(e) if is_timeout(&e) => Err(self.silent(resp, log)),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let msg = format!(
                    "daemon process {} sent a malformed frame: {e}",
                    self.conn.pid
                );
                Err(self.fail(resp, log, 502, &msg))
            }
            Err(e) => Err(self.lost(resp, log, e.to_string())),
        }
    }

    /// Handles one frame of the daemon's: goes on reading, or ends the request.
    fn on_frame(
        &mut self,
        kind: Kind,
        flags: u16,
        body: &mut dyn RequestBody,
        body_buf: &mut Vec<u8>,
        resp: &mut dyn ResponseChannel,
        log: &Logger<'_>,
    ) -> ControlFlow<Step> {
        match kind {
            Kind::Pull => self.on_pull(body, body_buf, resp, log),
            Kind::Start => self.on_start(resp, log),
            Kind::Data => self.on_data(flags, resp, log),
            Kind::Abort => {
                resp.abort();
                ControlFlow::Continue(())
            }
            Kind::Log => {
                self.on_log(resp);
                ControlFlow::Continue(())
            }
            Kind::End => ControlFlow::Break(self.on_end(resp, log)),
            Kind::Timeout => {
                let msg = self.payload_text("message", "request-timeout");
                ControlFlow::Break(self.fail(resp, log, 504, &msg))
            }
            Kind::Unavailable => {
                let msg = self.payload_text("reason", "unavailable");
                ControlFlow::Break(self.fail(resp, log, 503, &msg))
            }
            Kind::Hello | Kind::Request | Kind::Body | Kind::Auth => {
                let msg = format!("unexpected {kind:?} frame from the daemon");
                ControlFlow::Break(self.fail(resp, log, 502, &msg))
            }
        }
    }

    /// The text a `Timeout` or `Unavailable` frame carries, or `default`.
    fn payload_text(&self, field: &'static str, default: &str) -> String {
        protocol::Decoder::new(self.payload)
            .str(field)
            .unwrap_or(default)
            .to_string()
    }

    /// The daemon asks for the next piece of the request body: read it from
    /// the client and send it.
    fn on_pull(
        &mut self,
        body: &mut dyn RequestBody,
        body_buf: &mut Vec<u8>,
        resp: &mut dyn ResponseChannel,
        log: &Logger<'_>,
    ) -> ControlFlow<Step> {
        self.pulled = true;
        let want = match self.payload.as_slice() {
            [a, b, c, d] => (u32::from_be_bytes([*a, *b, *c, *d]) as usize).min(MAX_FRAME),
            _ => {
                let step = self.fail(resp, log, 502, "malformed body pull from the daemon");
                return ControlFlow::Break(step);
            }
        };
        body_buf.resize(HEADER_LEN + want, 0);
        let n = match body.read(&mut body_buf[HEADER_LEN..]) {
            Ok(n) => n,
            Err(e) => {
                let msg = format!("reading the request body failed: {e}");
                log(resp, log::Level::Info, &msg);
                return ControlFlow::Break(Step::Done(Outcome::ClientGone, false));
            }
        };
        body_buf[..HEADER_LEN].copy_from_slice(&protocol::header(Kind::Body, 0, n));
        if let Err(e) = self.conn.writer.write_all(&body_buf[..HEADER_LEN + n]) {
            return ControlFlow::Break(self.lost(resp, log, e.to_string()));
        }
        ControlFlow::Continue(())
    }

    /// Relays a piece of the response body, within what its head allows.
    fn on_data(
        &mut self,
        flags: u16,
        resp: &mut dyn ResponseChannel,
        log: &Logger<'_>,
    ) -> ControlFlow<Step> {
        let Some(framing) = self.framing.as_mut() else {
            let msg = "the daemon sent body data before the response head";
            return ControlFlow::Break(self.fail(resp, log, 502, msg));
        };
        let n = framing.admit(self.payload.len());
        if let Some(limit) = framing.first_excess(self.payload.len() - n) {
            let msg = format!("daemon process {} sent more than the Content-Length of {limit} bytes; the excess was dropped", self.conn.pid);
            log(resp, log::Level::Error, &msg);
        }
        if resp
            .write(&self.payload[..n], flags & protocol::FLAG_FLUSH != 0)
            .is_err()
        {
            // Closing the connection tells the daemon: its next write fails.
            return ControlFlow::Break(Step::Done(Outcome::ClientGone, false));
        }
        ControlFlow::Continue(())
    }

    /// Passes a log line of the daemon's on to the server's log.
    fn on_log(&mut self, resp: &mut dyn ResponseChannel) {
        let mut d = protocol::Decoder::new(self.payload);
        if let (Ok(level), Ok(line)) = (d.u8("level"), d.str("line")) {
            resp.log(protocol::decode_level(level), line);
        }
    }

    /// The daemon ended the request: how the server finishes it.
    fn on_end(&mut self, resp: &mut dyn ResponseChannel, log: &Logger<'_>) -> Step {
        let reply = match protocol::decode_outcome(self.payload) {
            Ok(Outcome::Complete) => return self.complete(resp, log),
            Ok(status @ Outcome::Status(_)) if self.framing.is_none() => status,
            Ok(Outcome::Status(_) | Outcome::Aborted) => Outcome::Aborted,
            Ok(Outcome::ClientGone) => Outcome::ClientGone,
            Err(e) => {
                let msg = format!("malformed end of response: {e}");
                return self.fail(resp, log, 502, &msg);
            }
        };
        Step::Done(reply, true)
    }

    /// Ends the request with `status`, or cuts the response if it already started.
    fn fail(
        &mut self,
        resp: &mut dyn ResponseChannel,
        log: &Logger<'_>,
        status: u16,
        msg: &str,
    ) -> Step {
        if self.framing.is_some() {
            log(
                resp,
                log::Level::Error,
                &format!("{msg}; the response was cut short"),
            );
            resp.abort();
            Step::Done(Outcome::Aborted, false)
        } else {
            log(
                resp,
                log::Level::Error,
                &format!("{msg}; answering {status}"),
            );
            Step::Done(Outcome::Status(status), false)
        }
    }

    /// Sends the response head of a `Start` frame, checked as an application's
    /// own head is: a daemon must not be able to split or mis-frame a response.
    fn on_start(&mut self, resp: &mut dyn ResponseChannel, log: &Logger<'_>) -> ControlFlow<Step> {
        if self.framing.is_some() {
            let msg = "the daemon sent a second response head";
            return ControlFlow::Break(self.fail(resp, log, 502, msg));
        }
        let checked = protocol::decode_start(self.payload)
            .map_err(|e| e.to_string())
            .and_then(|(status, line, headers)| {
                let framing = framing::check_head(status, &line, &headers, self.head_request)
                    .map_err(|e| e.to_string())?;
                Ok((status, line, headers, framing))
            });
        let (status, line, headers, framing) = match checked {
            Ok(head) => head,
            Err(e) => {
                let msg = format!(
                    "daemon process {} sent an invalid response head: {e}",
                    self.conn.pid
                );
                return ControlFlow::Break(self.fail(resp, log, 502, &msg));
            }
        };
        if let Err(e) = resp.start(status, &line, &headers) {
            let msg = format!("the daemon's response head was refused: {e}");
            return ControlFlow::Break(self.fail(resp, log, 502, &msg));
        }
        self.framing = Some(framing);
        ControlFlow::Continue(())
    }

    /// The daemon says the response is complete: it is, unless its body is
    /// shorter than its Content-Length (then the connection must close).
    fn complete(&mut self, resp: &mut dyn ResponseChannel, log: &Logger<'_>) -> Step {
        let short = self.framing.as_ref().and_then(BodyFraming::shortfall);
        match short {
            None => Step::Done(Outcome::Complete, true),
            Some((declared, sent)) => {
                let msg = format!("daemon process {} ended the response after {sent} of the {declared} bytes its Content-Length declared", self.conn.pid);
                self.fail(resp, log, 502, &msg)
            }
        }
    }

    /// The connection broke: a pooled connection the daemon had closed while idle
    /// is retried; otherwise the daemon died under this request.
    fn lost(&mut self, resp: &mut dyn ResponseChannel, log: &Logger<'_>, error: String) -> Step {
        let pid = self.conn.pid;
        let death = death_of(&self.ep.run_dir, pid);
        let idle_close =
            !self.heard && !self.pulled && death.as_deref().is_none_or(process::is_clean_exit);
        if idle_close {
            return Step::Retry;
        }
        let how = death.unwrap_or_else(|| format!("closed the connection ({error})"));
        let msg = format!(
            "daemon process {pid} of group '{}' {how} while serving this request",
            self.ep.group
        );
        self.fail(resp, log, 502, &msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::transport::Header;
    use crate::daemon::auth::{GroupAccess, Secret, SECRET_LEN};
    use std::os::unix::net::UnixListener;

    /// A response channel that records what it is given.
    #[derive(Default)]
    struct Recorded {
        status: Option<u16>,
        body: Vec<u8>,
    }

    impl ResponseChannel for Recorded {
        fn start(&mut self, status: u16, _line: &str, _headers: &[Header]) -> io::Result<()> {
            self.status = Some(status);
            Ok(())
        }
        fn write(&mut self, data: &[u8], _flush: bool) -> io::Result<()> {
            self.body.extend_from_slice(data);
            Ok(())
        }
        fn send_file(&mut self, _: std::os::fd::RawFd, _: u64, _: u64) -> io::Result<()> {
            unreachable!("the client never sends files")
        }
        fn abort(&mut self) {}
        fn log(&self, _level: log::Level, _line: &str) {}
    }

    struct Bytes(Vec<u8>, usize);

    impl RequestBody for Bytes {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len() - self.1).min(3);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }

    fn endpoint(dir: &Path) -> Endpoint {
        Endpoint {
            group: "t".into(),
            socket: dir.join("t.sock"),
            run_dir: dir.to_path_buf(),
            socket_timeout: Duration::from_secs(5),
            queue_timeout: None,
            access: GroupAccess {
                secret: Secret::from_bytes(&[7; SECRET_LEN]).unwrap(),
                apps: vec![app()],
            },
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gateway-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn app() -> AppSpec {
        AppSpec {
            file: PathBuf::from("/x.py"),
            callable: "application".into(),
            interface: crate::common::config::Interface::Detect,
        }
    }

    fn head() -> RequestHead<'static> {
        RequestHead {
            method: b"POST",
            request_uri: b"/x",
            ..Default::default()
        }
    }

    /// Forwards a GET without a body to the fake daemon at `ep`.
    fn forward_bodiless(ep: &Endpoint, resp: &mut Recorded) -> Outcome {
        forward(ep, &app(), &head(), false, &mut Bytes(vec![], 0), resp)
    }

    /// A fake daemon: greets, checks the secret, then runs `serve` for each
    /// request frame on one connection.
    fn fake_daemon(
        listener: UnixListener,
        serve: impl Fn(&mut UnixStream, &[u8]) + Send + 'static,
    ) {
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut out = Vec::new();
            protocol::put_hello(&mut out, std::process::id(), "t").unwrap();
            stream.write_all(&out).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut payload = Vec::new();
            let auth = protocol::read_frame(&mut reader, &mut payload).unwrap();
            assert_eq!(
                (auth, payload.as_slice()),
                (Some((Kind::Auth, 0)), &[7; SECRET_LEN][..])
            );
            while let Ok(Some((Kind::Request, _))) = protocol::read_frame(&mut reader, &mut payload)
            {
                assert_eq!(protocol::decode_request(&payload).unwrap().app, 0);
                serve(&mut stream, &payload);
            }
        });
    }

    /// Pulls the whole body in small pieces, answers with it.
    fn echo(stream: &mut UnixStream, _request: &[u8]) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut body = Vec::new();
        let mut payload = Vec::new();
        loop {
            let mut pull = Vec::new();
            protocol::put_frame(&mut pull, Kind::Pull, 0, &4u32.to_be_bytes());
            stream.write_all(&pull).unwrap();
            let (kind, _) = protocol::read_frame(&mut reader, &mut payload)
                .unwrap()
                .unwrap();
            assert_eq!(kind, Kind::Body);
            assert!(payload.len() <= 4);
            if payload.is_empty() {
                break;
            }
            body.extend_from_slice(&payload);
        }
        let mut out = Vec::new();
        protocol::put_start(&mut out, 200, "200 OK", &[]).unwrap();
        protocol::put_frame(&mut out, Kind::Data, 0, &body);
        protocol::put_frame(&mut out, Kind::End, 0, &[0]);
        stream.write_all(&out).unwrap();
    }

    #[test]
    fn bodies_are_pulled_and_connections_reused() {
        let dir = temp_dir("echo");
        let ep = endpoint(&dir);
        fake_daemon(UnixListener::bind(&ep.socket).unwrap(), echo);
        // The fake daemon accepts one connection only: the second request must reuse it.
        for text in [&b"hello, daemon"[..], b"again"] {
            let mut resp = Recorded::default();
            let reply = forward(
                &ep,
                &app(),
                &head(),
                true,
                &mut Bytes(text.to_vec(), 0),
                &mut resp,
            );
            assert_eq!(reply, Outcome::Complete);
            assert_eq!((resp.status, resp.body.as_slice()), (Some(200), text));
        }
    }

    #[test]
    fn an_application_the_group_does_not_serve_is_a_500() {
        let dir = temp_dir("foreign");
        let mut resp = Recorded::default();
        let other = AppSpec {
            file: PathBuf::from("/other.py"),
            callable: "application".into(),
            interface: crate::common::config::Interface::Detect,
        };
        let reply = forward(
            &endpoint(&dir),
            &other,
            &head(),
            false,
            &mut Bytes(vec![], 0),
            &mut resp,
        );
        assert_eq!((reply, resp.status), (Outcome::Status(500), None));
    }

    #[test]
    fn nothing_listening_is_a_503() {
        let dir = temp_dir("none");
        let mut resp = Recorded::default();
        let reply = forward_bodiless(&endpoint(&dir), &mut resp);
        assert_eq!(reply, Outcome::Status(503));
        assert_eq!(resp.status, None);
    }

    #[test]
    fn refusals_are_told_apart_and_worded_as_before() {
        let dir = temp_dir("refusals");
        let ep = endpoint(&dir);
        let refused = connect(&ep).err().unwrap();
        assert!(matches!(refused, ConnectError::NotRunning { .. }));
        assert_eq!(
            refused.to_string(),
            format!(
                "daemon process group 't' is not running (no one listens on {})",
                ep.socket.display()
            )
        );
        let long = Endpoint {
            socket: dir.join("x".repeat(120)),
            ..endpoint(&dir)
        };
        assert!(matches!(connect(&long), Err(ConnectError::PathTooLong(_))));
        // A queue of one connection that nobody accepts: the next is refused at once.
        let listener = UnixListener::bind(&ep.socket).unwrap();
        // SAFETY: listen on our own socket.
        unsafe { libc::listen(listener.as_raw_fd(), 0) };
        let _waiting = dial(&ep).ok().unwrap();
        let refused = connect(&ep).err().unwrap();
        assert!(matches!(refused, ConnectError::Overloaded { .. }));
        assert_eq!(refused.to_string(), "daemon process group 't' is overloaded: all its threads are busy and its queue of waiting connections is full");
    }

    #[test]
    fn a_daemon_that_does_not_greet_in_time_is_a_timeout() {
        let dir = temp_dir("silent");
        let ep = Endpoint {
            socket_timeout: Duration::from_millis(50),
            ..endpoint(&dir)
        };
        let _listener = UnixListener::bind(&ep.socket).unwrap();
        let refused = connect(&ep).err().unwrap();
        assert!(matches!(
            refused,
            ConnectError::TimedOut {
                limit: WaitLimit::Socket(_),
                ..
            }
        ));
        assert_eq!(
            refused.to_string(),
            "no daemon process of group 't' took the connection within socket-timeout=0s"
        );
        let queued = Endpoint {
            queue_timeout: Some(Duration::from_millis(50)),
            ..ep
        };
        assert_eq!(
            connect(&queued).err().unwrap().to_string(),
            "no daemon process of group 't' took the request within queue-timeout=0s: all its threads are busy"
        );
    }

    #[test]
    fn a_group_that_is_down_says_why() {
        let dir = temp_dir("down");
        let ep = endpoint(&dir);
        let listener = UnixListener::bind(&ep.socket).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut out = Vec::new();
            protocol::put_with(&mut out, Kind::Unavailable, |e| e.str("it broke")).unwrap();
            stream.write_all(&out).unwrap();
        });
        let refused = connect(&ep).err().unwrap();
        assert!(matches!(&refused, ConnectError::Down { reason, .. } if reason == "it broke"));
        assert_eq!(
            refused.to_string(),
            "daemon process group 't' is down: it broke"
        );
    }

    #[test]
    fn malformed_frames_are_a_502() {
        let dir = temp_dir("garbage");
        let ep = endpoint(&dir);
        fake_daemon(UnixListener::bind(&ep.socket).unwrap(), |stream, _| {
            // A response head whose status is out of range.
            stream
                .write_all(&[protocol::VERSION, 5, 0, 0, 0, 0, 0, 2, 0xff, 0xff])
                .unwrap();
        });
        let mut resp = Recorded::default();
        let reply = forward_bodiless(&ep, &mut resp);
        assert_eq!(reply, Outcome::Status(502));
    }

    #[test]
    fn a_daemon_that_hangs_up_mid_request_is_a_502() {
        let dir = temp_dir("hangup");
        let ep = endpoint(&dir);
        fake_daemon(UnixListener::bind(&ep.socket).unwrap(), |stream, _| {
            let mut out = Vec::new();
            protocol::put_start(&mut out, 200, "200 OK", &[]).unwrap();
            stream.write_all(&out).unwrap();
            stream.shutdown(std::net::Shutdown::Both).unwrap();
        });
        let mut resp = Recorded::default();
        let reply = forward_bodiless(&ep, &mut resp);
        // The head went out already: the response is cut short rather than replaced.
        assert_eq!(reply, Outcome::Aborted);
    }

    /// A fake daemon that answers every request with `frames`.
    fn forged(name: &str, frames: Vec<u8>) -> (Outcome, Recorded) {
        let dir = temp_dir(name);
        let ep = endpoint(&dir);
        fake_daemon(UnixListener::bind(&ep.socket).unwrap(), move |stream, _| {
            stream.write_all(&frames).unwrap();
        });
        let mut resp = Recorded::default();
        let reply = forward_bodiless(&ep, &mut resp);
        (reply, resp)
    }

    fn start(status: u16, line: &str, headers: &[(&str, &[u8])]) -> Vec<u8> {
        let headers: Vec<Header> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect();
        let mut out = Vec::new();
        protocol::put_start(&mut out, status, line, &headers).unwrap();
        out
    }

    fn then(mut frames: Vec<u8>, kind: Kind, payload: &[u8]) -> Vec<u8> {
        protocol::put_frame(&mut frames, kind, 0, payload);
        frames
    }

    #[test]
    fn forged_response_heads_are_a_502() {
        let forgeries = [
            start(200, "200 OK\r\nSet-Cookie: x=1", &[]),
            start(200, "200 OK", &[("X-A", b"1\r\nSet-Cookie: x=1")]),
            start(200, "200 OK", &[("X-A", b"\x0b")]),
            start(200, "200 OK", &[("Bad Name", b"1")]),
            start(200, "200 OK", &[("Content-Length", b"5, 6")]),
            start(103, "103 Early Hints", &[]),
            start(204, "200 OK", &[]),
        ];
        for (i, head) in forgeries.into_iter().enumerate() {
            let (reply, resp) = forged(&format!("forged-{i}"), then(head, Kind::End, &[0]));
            assert_eq!(
                (reply, resp.status),
                (Outcome::Status(502), None),
                "forgery {i}"
            );
        }
    }

    #[test]
    fn body_data_before_the_head_is_a_502() {
        let frames = then(
            then(Vec::new(), Kind::Data, b"HTTP/1.1 200 OK\r\n\r\n"),
            Kind::End,
            &[0],
        );
        let (reply, resp) = forged("data-first", frames);
        assert_eq!((reply, resp.body.len()), (Outcome::Status(502), 0));
    }

    #[test]
    fn daemon_bodies_are_framed_by_their_content_length() {
        let long = start(200, "200 OK", &[("Content-Length", b"5")]);
        let long = then(
            then(long, Kind::Data, b"HelloHTTP/1.1 200 OK\r\n"),
            Kind::End,
            &[0],
        );
        let (reply, resp) = forged("long", long);
        assert_eq!(
            (reply, resp.body.as_slice()),
            (Outcome::Complete, &b"Hello"[..])
        );
        let short = start(200, "200 OK", &[("Content-Length", b"10")]);
        let short = then(then(short, Kind::Data, b"abc"), Kind::End, &[0]);
        let (reply, resp) = forged("short", short);
        assert_eq!(
            (reply, resp.body.as_slice()),
            (Outcome::Aborted, &b"abc"[..])
        );
    }
}
