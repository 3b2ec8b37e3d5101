//! The server side of daemon mode: forwards a request to a daemon group and
//! relays the response. Server-neutral and callable from any thread: the server
//! passes its request head, a [`RequestBody`] and a [`ResponseChannel`], exactly
//! as for embedded mode.
//!
//! Connections are kept in a per-process pool and reused. A pooled connection the
//! daemon closed in the meantime (it drained, or was recycled) is detected before
//! any of the request was processed and the request is retried on a new one.

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use std::sync::LazyLock;

#[cfg(fuzzing)]
pub mod fuzzing;

use super::protocol::{self, Kind, HEADER_LEN, MAX_FRAME};
use super::{exit_record_path, Endpoint};
use crate::common::cgi::RequestHead;
use crate::common::config::AppSpec;
use crate::common::framing::{self, BodyFraming};
use crate::common::log::request_line;
use crate::common::transport::{Outcome, RequestBody, ResponseChannel};

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

/// Why no connection could be made: each is a 503 with this text in the log.
struct Refused(String);

fn connect(ep: &Endpoint) -> Result<Conn, Refused> {
    let group = &ep.group;
    // SAFETY: creates a socket owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(Refused(format!(
            "cannot create a socket: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = ep.socket.as_os_str().as_encoded_bytes();
    if path.len() >= addr.sun_path.len() {
        return Err(Refused(format!(
            "socket path {} is too long",
            ep.socket.display()
        )));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(path) {
        *dst = src as libc::c_char;
    }
    // SAFETY: connects our socket to a complete sockaddr_un.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(Refused(match e.raw_os_error() {
            Some(libc::EAGAIN) => format!(
                "daemon process group '{group}' is overloaded: all its threads are busy and its queue of waiting connections is full"
            ),
            Some(libc::EACCES) => format!(
                "permission denied on {}: only the server's worker user may connect to daemon process group '{group}'; \
                 was the server's User/Group (nginx: user) changed without a full restart?",
                ep.socket.display()
            ),
            Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => {
                format!("daemon process group '{group}' is not running (no one listens on {})", ep.socket.display())
            }
            _ => format!("cannot connect to daemon process group '{group}' at {}: {e}", ep.socket.display()),
        }));
    }
    let stream = UnixStream::from(fd);
    // Until a daemon process accepts, the connection waits in the group's queue.
    let greeting_timeout = ep.queue_timeout.unwrap_or(ep.socket_timeout);
    let setup = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(greeting_timeout)))
        .and_then(|_| stream.set_write_timeout(Some(ep.socket_timeout)))
        .and_then(|_| stream.try_clone());
    let writer = setup.map_err(|e| {
        Refused(format!(
            "cannot set up the connection to daemon process group '{group}': {e}"
        ))
    })?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut payload = Vec::new();
    match protocol::read_frame(&mut reader, &mut payload) {
        Ok(Some((Kind::Hello, _))) => {
            let (pid, _) = protocol::decode_hello(&payload).map_err(|e| {
                Refused(format!(
                    "daemon process group '{group}' sent a malformed greeting: {e}"
                ))
            })?;
            let mut auth = Vec::new();
            protocol::put_auth(&mut auth, &ep.access.secret);
            reader
                .get_ref()
                .set_read_timeout(Some(ep.socket_timeout))
                .map_err(|e| {
                    Refused(format!(
                        "cannot set up the connection to daemon process group '{group}': {e}"
                    ))
                })?;
            Ok(Conn {
                reader,
                writer,
                pid,
                auth,
            })
        }
        Ok(Some((Kind::Unavailable, _))) => {
            let reason = protocol::Decoder::new(&payload)
                .str("reason")
                .unwrap_or("unknown")
                .to_string();
            Err(Refused(format!(
                "daemon process group '{group}' is down: {reason}"
            )))
        }
        Ok(_) => Err(Refused(format!(
            "daemon process group '{group}' closed the connection at once"
        ))),
        Err(e) if is_timeout(&e) => Err(Refused(match ep.queue_timeout {
            Some(t) => format!(
                "no daemon process of group '{group}' took the request within queue-timeout={}s: all its threads are busy",
                t.as_secs()
            ),
            None => format!(
                "no daemon process of group '{group}' took the connection within socket-timeout={}s",
                ep.socket_timeout.as_secs()
            ),
        })),
        Err(e) => Err(Refused(format!(
            "daemon process group '{group}' did not greet: {e}"
        ))),
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
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if let Ok(how) = std::fs::read_to_string(&record) {
            return Some(how);
        }
        if Instant::now() > deadline || alive(pid) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

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
                None => match connect(ep) {
                    Ok(conn) => (conn, false),
                    Err(Refused(why)) => {
                        log(resp, log::Level::Error, &format!("{why}; answering 503"));
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
            let frame = protocol::read_frame(&mut self.conn.reader, self.payload);
            let (kind, flags) = match frame {
                Ok(Some(f)) => f,
                Ok(None) => return self.lost(resp, log, "closed the connection".into()),
                Err(e) if is_timeout(&e) => {
                    let msg = format!(
                        "daemon process {} of group '{}' sent nothing for socket-timeout={}s",
                        self.conn.pid,
                        self.ep.group,
                        self.ep.socket_timeout.as_secs()
                    );
                    return self.fail(resp, log, 504, &msg);
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return self.fail(
                        resp,
                        log,
                        502,
                        &format!(
                            "daemon process {} sent a malformed frame: {e}",
                            self.conn.pid
                        ),
                    );
                }
                Err(e) => return self.lost(resp, log, e.to_string()),
            };
            self.heard = true;
            match kind {
                Kind::Pull => {
                    self.pulled = true;
                    let want = match self.payload.as_slice() {
                        [a, b, c, d] => {
                            (u32::from_be_bytes([*a, *b, *c, *d]) as usize).min(MAX_FRAME)
                        }
                        _ => {
                            return self.fail(resp, log, 502, "malformed body pull from the daemon")
                        }
                    };
                    body_buf.resize(HEADER_LEN + want, 0);
                    let n = match body.read(&mut body_buf[HEADER_LEN..]) {
                        Ok(n) => n,
                        Err(e) => {
                            log(
                                resp,
                                log::Level::Info,
                                &format!("reading the request body failed: {e}"),
                            );
                            return Step::Done(Outcome::ClientGone, false);
                        }
                    };
                    body_buf[..HEADER_LEN].copy_from_slice(&protocol::header(Kind::Body, 0, n));
                    if let Err(e) = self.conn.writer.write_all(&body_buf[..HEADER_LEN + n]) {
                        return self.lost(resp, log, e.to_string());
                    }
                }
                Kind::Start => {
                    if let Err(step) = self.start(resp, log) {
                        return step;
                    }
                }
                Kind::Data => {
                    let Some(framing) = self.framing.as_mut() else {
                        return self.fail(
                            resp,
                            log,
                            502,
                            "the daemon sent body data before the response head",
                        );
                    };
                    let n = framing.admit(self.payload.len());
                    if let Some(limit) = framing.first_excess(self.payload.len() - n) {
                        log(resp, log::Level::Error, &format!("daemon process {} sent more than the Content-Length of {limit} bytes; the excess was dropped", self.conn.pid));
                    }
                    if resp
                        .write(&self.payload[..n], flags & protocol::FLAG_FLUSH != 0)
                        .is_err()
                    {
                        // Closing the connection tells the daemon: its next write fails.
                        return Step::Done(Outcome::ClientGone, false);
                    }
                }
                Kind::Abort => resp.abort(),
                Kind::Log => {
                    let mut d = protocol::Decoder::new(self.payload);
                    if let (Ok(level), Ok(line)) = (d.u8("level"), d.str("line")) {
                        resp.log(protocol::decode_level(level), line);
                    }
                }
                Kind::End => {
                    let reply = match protocol::decode_outcome(self.payload) {
                        Ok(Outcome::Complete) => return self.complete(resp, log),
                        Ok(status @ Outcome::Status(_)) if self.framing.is_none() => status,
                        Ok(Outcome::Status(_) | Outcome::Aborted) => Outcome::Aborted,
                        Ok(Outcome::ClientGone) => Outcome::ClientGone,
                        Err(e) => {
                            return self.fail(
                                resp,
                                log,
                                502,
                                &format!("malformed end of response: {e}"),
                            )
                        }
                    };
                    return Step::Done(reply, true);
                }
                Kind::Timeout => {
                    let msg = protocol::Decoder::new(self.payload)
                        .str("message")
                        .unwrap_or("request-timeout")
                        .to_string();
                    return self.fail(resp, log, 504, &msg);
                }
                Kind::Unavailable => {
                    let msg = protocol::Decoder::new(self.payload)
                        .str("reason")
                        .unwrap_or("unavailable")
                        .to_string();
                    return self.fail(resp, log, 503, &msg);
                }
                Kind::Hello | Kind::Request | Kind::Body | Kind::Auth => {
                    return self.fail(
                        resp,
                        log,
                        502,
                        &format!("unexpected {kind:?} frame from the daemon"),
                    );
                }
            }
        }
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
    fn start(&mut self, resp: &mut dyn ResponseChannel, log: &Logger<'_>) -> Result<(), Step> {
        if self.framing.is_some() {
            return Err(self.fail(resp, log, 502, "the daemon sent a second response head"));
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
                return Err(self.fail(resp, log, 502, &msg));
            }
        };
        if let Err(e) = resp.start(status, &line, &headers) {
            let msg = format!("the daemon's response head was refused: {e}");
            return Err(self.fail(resp, log, 502, &msg));
        }
        self.framing = Some(framing);
        Ok(())
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
        let idle_close = !self.heard
            && !self.pulled
            && death
                .as_deref()
                .is_none_or(|how| how == "exited with status 0");
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
