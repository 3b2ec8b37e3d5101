//! The wire protocol between a server process and a daemon process.
//!
//! Every message is a frame: an 8-byte header, then the payload.
//!
//! ```text
//! u8 version (3) | u8 kind | u16 flags (big-endian) | u32 payload length (big-endian)
//! ```
//!
//! Payloads are bounded by [`MAX_FRAME`]; every read of a payload is bounds-checked,
//! so a malformed or hostile peer gets a [`ProtocolError`], never a panic or a huge
//! allocation. A connection carries one request at a time and is reused:
//!
//! 1. daemon → server `Hello` once, on accept (the daemon's pid and group);
//!    server → daemon `Auth` once, the generation's secret (see [`super::auth`]):
//!    the daemon reads nothing else before it, and closes the connection of a
//!    peer that does not prove it;
//! 2. server → daemon `Request` (the application, by its index in the group's
//!    list, and the request head);
//! 3. daemon → server `Pull` (how many body bytes it wants) / server → daemon `Body`
//!    (at most that many; empty at the end of the body), as often as the
//!    application reads: the daemon pulls, so neither side ever writes into a
//!    full pipe while the other does the same;
//! 4. daemon → server `Start`, `Data` (flag [`FLAG_FLUSH`]), `Abort`, `Log`, then
//!    `End` with the outcome; or `Timeout` / `Unavailable` instead.

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::auth::{Secret, SECRET_LEN};
use crate::common::cgi::RequestHead;
use crate::common::config::DaemonOptions;
use crate::common::transport::{Header, Outcome};

/// Name/value pairs borrowed from a payload.
pub type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// The protocol version this build speaks.
pub const VERSION: u8 = 4;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;
/// The largest payload either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// `Data` flag: push these bytes to the client now.
pub const FLAG_FLUSH: u16 = 1;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Request = 2,
    Body = 3,
    Pull = 4,
    Start = 5,
    Data = 6,
    Abort = 7,
    End = 8,
    Log = 9,
    Timeout = 10,
    Unavailable = 11,
    Auth = 12,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            Request,
            Body,
            Pull,
            Start,
            Data,
            Abort,
            End,
            Log,
            Timeout,
            Unavailable,
            Auth,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

/// A peer sent something this side cannot accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The frame names a protocol version this build does not speak.
    Version(u8),
    /// Unknown frame kind.
    Kind(u8),
    /// A frame longer than [`MAX_FRAME`].
    TooLarge(u32),
    /// A payload ended before one of its fields.
    Truncated(&'static str),
    /// A field holds a value that makes no sense.
    Invalid(String),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Version(v) => write!(f, "protocol version {v} is not supported (this build speaks {VERSION}): mixed Gateway versions?"),
            ProtocolError::Kind(k) => write!(f, "unknown frame kind {k}"),
            ProtocolError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds the limit of {MAX_FRAME}"),
            ProtocolError::Truncated(what) => write!(f, "frame truncated in {what}"),
            ProtocolError::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for ProtocolError {}

impl From<ProtocolError> for io::Error {
    fn from(e: ProtocolError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A frame header.
pub fn header(kind: Kind, flags: u16, len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_FRAME);
    let mut h = [0u8; HEADER_LEN];
    h[0] = VERSION;
    h[1] = kind as u8;
    h[2..4].copy_from_slice(&flags.to_be_bytes());
    h[4..8].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// Parses a frame header: the kind, flags and payload length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(Kind, u16, usize), ProtocolError> {
    if h[0] != VERSION {
        return Err(ProtocolError::Version(h[0]));
    }
    let kind = Kind::from_u8(h[1]).ok_or(ProtocolError::Kind(h[1]))?;
    let flags = u16::from_be_bytes([h[2], h[3]]);
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    if len as usize > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok((kind, flags, len as usize))
}

/// Appends a whole frame to `out`.
pub fn put_frame(out: &mut Vec<u8>, kind: Kind, flags: u16, payload: &[u8]) {
    out.extend_from_slice(&header(kind, flags, payload.len()));
    out.extend_from_slice(payload);
}

/// Appends a frame whose payload `fill` encodes, patching the length afterwards.
pub fn put_with(
    out: &mut Vec<u8>,
    kind: Kind,
    fill: impl FnOnce(&mut Encoder<'_>),
) -> Result<(), ProtocolError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    fill(&mut Encoder(out));
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(ProtocolError::TooLarge(len.min(u32::MAX as usize) as u32));
    }
    out[start..start + HEADER_LEN].copy_from_slice(&header(kind, 0, len));
    Ok(())
}

/// Reads one frame into `payload`. `Ok(None)` when the peer closed the connection
/// cleanly between frames.
pub fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> io::Result<Option<(Kind, u16)>> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a frame header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let (kind, flags, len) = parse_header(&h)?;
    payload.clear();
    payload.resize(len, 0);
    r.read_exact(payload)?;
    Ok(Some((kind, flags)))
}

/// Writes fields in the protocol's encoding: big-endian integers, byte strings
/// as a u32 length and the bytes.
pub struct Encoder<'a>(pub &'a mut Vec<u8>);

impl Encoder<'_> {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    /// The presence byte of an optional value, which follows when present.
    pub fn present(&mut self, present: bool) {
        self.u8(u8::from(present));
    }
    /// An optional byte string: a presence byte, then the string.
    pub fn opt(&mut self, v: Option<&[u8]>) {
        self.present(v.is_some());
        if let Some(v) = v {
            self.bytes(v);
        }
    }
    pub fn pairs(&mut self, pairs: &[(&[u8], &[u8])]) {
        self.u32(pairs.len() as u32);
        for (k, v) in pairs {
            self.bytes(k);
            self.bytes(v);
        }
    }
}

/// Reads fields written by [`Encoder`], checking every length against what is left.
pub struct Decoder<'a> {
    data: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(data: &'a [u8]) -> Decoder<'a> {
        Decoder { data }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.data.len() < n {
            return Err(ProtocolError::Truncated(what));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        let b = self.take(8, what)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    pub fn str(&mut self, what: &'static str) -> Result<&'a str, ProtocolError> {
        std::str::from_utf8(self.bytes(what)?)
            .map_err(|_| ProtocolError::Invalid(format!("{what} is not UTF-8")))
    }
    /// The presence byte of an optional value: whether the value follows.
    pub fn present(&mut self, what: &'static str) -> Result<bool, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtocolError::Invalid(format!(
                "{what}: bad presence byte {v}"
            ))),
        }
    }
    pub fn opt(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, ProtocolError> {
        if self.present(what)? {
            Ok(Some(self.bytes(what)?))
        } else {
            Ok(None)
        }
    }
    /// A count of entries that each take at least `min_size` bytes: a count that
    /// cannot fit in what is left is refused before anything is allocated.
    pub fn count(&mut self, min_size: usize, what: &'static str) -> Result<usize, ProtocolError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_size) > self.data.len() {
            return Err(ProtocolError::Truncated(what));
        }
        Ok(n)
    }
    pub fn pairs(&mut self, what: &'static str) -> Result<Pairs<'a>, ProtocolError> {
        let n = self.count(8, what)?;
        (0..n)
            .map(|_| Ok((self.bytes(what)?, self.bytes(what)?)))
            .collect()
    }
    /// Fails unless every byte was read.
    pub fn finish(self, what: &'static str) -> Result<(), ProtocolError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Invalid(format!(
                "{} unexpected bytes after {what}",
                self.data.len()
            )))
        }
    }
}

/// Microseconds on the system-wide monotonic clock, which the server and daemon
/// processes share: how long a request waited for a daemon thread.
pub fn monotonic_us() -> u64 {
    // SAFETY: timespec is plain data; all zeroes is valid, clock_gettime overwrites it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC always exists on Linux; ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Encodes a `Hello` frame: the daemon process's pid and group.
pub fn put_hello(out: &mut Vec<u8>, pid: u32, group: &str) -> Result<(), ProtocolError> {
    put_with(out, Kind::Hello, |e| {
        e.u32(pid);
        e.str(group);
    })
}

/// Decodes a `Hello` frame payload: the daemon's pid and group.
pub fn decode_hello(payload: &[u8]) -> Result<(u32, &str), ProtocolError> {
    let mut d = Decoder::new(payload);
    let pid = d.u32("daemon pid")?;
    let group = d.str("group name")?;
    d.finish("the greeting")?;
    Ok((pid, group))
}

/// Appends an `Auth` frame: the secret of the server's configuration generation.
pub fn put_auth(out: &mut Vec<u8>, secret: &Secret) {
    put_frame(out, Kind::Auth, 0, secret.as_bytes());
}

/// How many bytes the `Auth` frame that begins with the frame header `h` takes
/// in all. Anything else as the first frame of a connection is refused, before
/// its payload is read.
pub fn auth_frame_len(h: &[u8; HEADER_LEN]) -> Result<usize, ProtocolError> {
    match parse_header(h)? {
        (Kind::Auth, 0, SECRET_LEN) => Ok(HEADER_LEN + SECRET_LEN),
        (Kind::Auth, _, len) => Err(ProtocolError::Invalid(format!(
            "an authentication frame of {len} bytes (expected {SECRET_LEN})"
        ))),
        (kind, _, _) => Err(ProtocolError::Invalid(format!(
            "a {kind:?} frame before authenticating"
        ))),
    }
}

/// Encodes a `Request` frame: the application (its index in the group's list
/// of applications), when the server began to forward it ([`monotonic_us`]),
/// and the request head. `has_body` false tells the daemon not to pull a body
/// at all.
pub fn put_request(
    out: &mut Vec<u8>,
    app: u32,
    queued_at: u64,
    head: &RequestHead<'_>,
    has_body: bool,
) -> Result<(), ProtocolError> {
    put_with(out, Kind::Request, |e| {
        e.u32(app);
        e.u64(queued_at);
        e.u8(u8::from(has_body));
        e.bytes(head.method);
        e.bytes(head.script_name);
        e.bytes(head.path_info);
        e.bytes(head.query_string);
        e.bytes(head.request_uri);
        e.bytes(head.protocol);
        e.bytes(head.server_name);
        e.u16(head.server_port);
        e.bytes(head.server_addr);
        e.bytes(head.remote_addr);
        e.u16(head.remote_port);
        e.u8(u8::from(head.https));
        e.opt(head.remote_user);
        e.opt(head.auth_type);
        e.pairs(&head.headers);
        e.pairs(&head.server_vars);
    })
}

/// A decoded `Request` frame; the head borrows the frame's payload.
pub struct DecodedRequest<'a> {
    /// The application's index in the group's list; the daemon checks the range.
    pub app: u32,
    /// When the server began to forward the request ([`monotonic_us`]).
    pub queued_at: u64,
    pub has_body: bool,
    pub head: RequestHead<'a>,
}

/// Decodes a `Request` frame payload.
pub fn decode_request(payload: &[u8]) -> Result<DecodedRequest<'_>, ProtocolError> {
    let mut d = Decoder::new(payload);
    let app = d.u32("application index")?;
    let queued_at = d.u64("queue time")?;
    let has_body = d.u8("body flag")? != 0;
    let head = RequestHead {
        method: d.bytes("method")?,
        script_name: d.bytes("script name")?,
        path_info: d.bytes("path info")?,
        query_string: d.bytes("query string")?,
        request_uri: d.bytes("request URI")?,
        protocol: d.bytes("protocol")?,
        server_name: d.bytes("server name")?,
        server_port: d.u16("server port")?,
        server_addr: d.bytes("server address")?,
        remote_addr: d.bytes("remote address")?,
        remote_port: d.u16("remote port")?,
        https: d.u8("https flag")? != 0,
        remote_user: d.opt("remote user")?,
        auth_type: d.opt("auth type")?,
        headers: d.pairs("headers")?,
        server_vars: d.pairs("server variables")?,
    };
    d.finish("the request head")?;
    Ok(DecodedRequest {
        app,
        queued_at,
        has_body,
        head,
    })
}

/// Encodes a `Start` frame: status and headers.
pub fn put_start(
    out: &mut Vec<u8>,
    status: u16,
    status_line: &str,
    headers: &[Header],
) -> Result<(), ProtocolError> {
    put_with(out, Kind::Start, |e| {
        e.u16(status);
        e.str(status_line);
        e.u32(headers.len() as u32);
        for (name, value) in headers {
            e.str(name);
            e.bytes(value);
        }
    })
}

/// Decodes a `Start` frame payload.
pub fn decode_start(payload: &[u8]) -> Result<(u16, String, Vec<Header>), ProtocolError> {
    let mut d = Decoder::new(payload);
    let status = d.u16("status")?;
    if !(100..=999).contains(&status) {
        return Err(ProtocolError::Invalid(format!(
            "status {status} out of range"
        )));
    }
    let line = d.str("status line")?.to_string();
    let n = d.count(8, "headers")?;
    let headers = (0..n)
        .map(|_| {
            Ok((
                d.str("header name")?.to_string(),
                d.bytes("header value")?.to_vec(),
            ))
        })
        .collect::<Result<Vec<_>, ProtocolError>>()?;
    d.finish("the response head")?;
    Ok((status, line, headers))
}

/// The outcome carried by an `End` frame. A daemon answers no status of its
/// own: any status outcome means the application failed before its response.
pub fn outcome_payload(o: Outcome) -> Vec<u8> {
    match o {
        Outcome::Complete => vec![0],
        Outcome::Status(status) => {
            let [hi, lo] = status.to_be_bytes();
            vec![1, hi, lo]
        }
        Outcome::Aborted => vec![2],
        Outcome::ClientGone => vec![3],
    }
}

/// The outcome of an `End` frame payload.
pub fn decode_outcome(payload: &[u8]) -> Result<Outcome, ProtocolError> {
    match payload {
        [0] => Ok(Outcome::Complete),
        [1] => Ok(Outcome::FAILED),
        // Only an error status: the daemon's answer when nothing of the response went out.
        [1, hi, lo] => match u16::from_be_bytes([*hi, *lo]) {
            status @ 400..=599 => Ok(Outcome::Status(status)),
            _ => Ok(Outcome::FAILED),
        },
        [2] => Ok(Outcome::Aborted),
        [3] => Ok(Outcome::ClientGone),
        _ => Err(ProtocolError::Invalid("bad outcome in End frame".into())),
    }
}

/// The numeric form of a log level in `Log` frames.
pub fn level_code(l: log::Level) -> u8 {
    l as usize as u8
}

/// The log level of a `Log` frame.
pub fn decode_level(v: u8) -> log::Level {
    match v {
        1 => log::Level::Error,
        2 => log::Level::Warn,
        3 => log::Level::Info,
        4 => log::Level::Debug,
        _ => log::Level::Trace,
    }
}

/// Encodes the options of a daemon group (for the supervisor and its workers).
pub fn put_options(e: &mut Encoder<'_>, d: &DaemonOptions) {
    let path = |p: &PathBuf| p.as_os_str().as_encoded_bytes().to_vec();
    e.str(&d.name);
    e.u32(d.processes);
    e.u32(d.threads);
    e.opt(d.python_home.as_ref().map(path).as_deref());
    e.u32(d.python_path.len() as u32);
    for p in &d.python_path {
        e.bytes(&path(p));
    }
    e.opt(d.user.as_deref().map(str::as_bytes));
    e.opt(d.group.as_deref().map(str::as_bytes));
    e.u64(d.max_requests);
    e.u64(d.request_timeout);
    e.u64(d.slow_request);
    e.u64(d.max_memory);
    e.u32(d.min_processes);
    e.u64(d.idle_timeout);
    e.u8(u8::from(d.preload));
    e.u8(u8::from(d.reload_on_change));
    e.u64(d.graceful_timeout);
    e.u64(d.socket_timeout);
    e.u64(d.queue_timeout);
    e.u32(d.listen_backlog);
    e.u8(u8::from(d.status_counters));
    e.opt(d.display_name.as_deref().map(str::as_bytes));
}

/// Decodes what [`put_options`] wrote.
pub fn decode_options(d: &mut Decoder<'_>) -> Result<DaemonOptions, ProtocolError> {
    let path = |b: &[u8]| PathBuf::from(OsStr::from_bytes(b));
    let text = |b: Option<&[u8]>| -> Result<Option<String>, ProtocolError> {
        b.map(|b| {
            String::from_utf8(b.to_vec())
                .map_err(|_| ProtocolError::Invalid("option is not UTF-8".into()))
        })
        .transpose()
    };
    let name = d.str("group name")?.to_string();
    let processes = d.u32("processes")?;
    let threads = d.u32("threads")?;
    let python_home = d.opt("python-home")?.map(path);
    let n = d.count(4, "python-path")?;
    let python_path = (0..n)
        .map(|_| d.bytes("python-path").map(path))
        .collect::<Result<_, _>>()?;
    Ok(DaemonOptions {
        name,
        processes,
        threads,
        python_home,
        python_path,
        user: text(d.opt("user")?)?,
        group: text(d.opt("group")?)?,
        max_requests: d.u64("max-requests")?,
        request_timeout: d.u64("request-timeout")?,
        slow_request: d.u64("slow-request")?,
        max_memory: d.u64("max-memory")?,
        min_processes: d.u32("min processes")?,
        idle_timeout: d.u64("idle-timeout")?,
        preload: d.u8("preload")? != 0,
        reload_on_change: d.u8("reload-on-change")? != 0,
        graceful_timeout: d.u64("graceful-timeout")?,
        socket_timeout: d.u64("socket-timeout")?,
        queue_timeout: d.u64("queue-timeout")?,
        listen_backlog: d.u32("listen-backlog")?,
        status_counters: d.u8("status counters")? != 0,
        display_name: text(d.opt("display-name")?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_head() -> RequestHead<'static> {
        RequestHead {
            method: b"POST",
            script_name: b"/app",
            path_info: b"/x y",
            query_string: b"a=1",
            request_uri: b"/app/x%20y?a=1",
            protocol: b"HTTP/1.1",
            server_name: b"localhost",
            server_port: 8080,
            server_addr: b"127.0.0.1",
            remote_addr: b"127.0.0.2",
            remote_port: 40000,
            https: true,
            remote_user: Some(b"alice"),
            auth_type: None,
            headers: vec![(b"Host", b"h"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")],
            server_vars: vec![(b"UNIQUE_ID", b"\xff\x00")],
        }
    }

    #[test]
    fn request_round_trips() {
        let mut out = Vec::new();
        put_request(&mut out, 7, 1234, &sample_head(), true).unwrap();
        let mut payload = Vec::new();
        let (kind, flags) = read_frame(&mut &out[..], &mut payload).unwrap().unwrap();
        assert_eq!((kind, flags), (Kind::Request, 0));
        let req = decode_request(&payload).unwrap();
        assert_eq!(req.app, 7);
        assert_eq!(req.queued_at, 1234);
        assert!(req.has_body);
        assert_eq!(format!("{:?}", req.head), format!("{:?}", sample_head()));
    }

    #[test]
    fn start_and_end_round_trip() {
        let mut out = Vec::new();
        let headers = vec![
            ("Content-Type".to_string(), b"text/plain".to_vec()),
            ("X".to_string(), vec![0xe9]),
        ];
        put_start(&mut out, 404, "404 Not Here", &headers).unwrap();
        let mut payload = Vec::new();
        assert_eq!(
            read_frame(&mut &out[..], &mut payload).unwrap(),
            Some((Kind::Start, 0))
        );
        assert_eq!(
            decode_start(&payload).unwrap(),
            (404, "404 Not Here".to_string(), headers)
        );
        for outcome in [
            Outcome::Complete,
            Outcome::Aborted,
            Outcome::ClientGone,
            Outcome::FAILED,
            Outcome::Status(503),
        ] {
            assert_eq!(decode_outcome(&outcome_payload(outcome)), Ok(outcome));
        }
        assert_eq!(decode_outcome(&[1]), Ok(Outcome::FAILED));
        assert_eq!(
            decode_outcome(&outcome_payload(Outcome::Status(200))),
            Ok(Outcome::FAILED),
            "a status is an error status"
        );
        assert!(decode_outcome(&[9]).is_err());
    }

    #[test]
    fn options_round_trip() {
        let opts = DaemonOptions::parse(&[
            "g",
            "processes=3",
            "python-path=/a:/b",
            "user=nobody",
            "queue-timeout=7",
            "listen-backlog=9",
            "display-name=x y",
        ])
        .unwrap();
        let mut out = Vec::new();
        put_options(&mut Encoder(&mut out), &opts);
        let mut d = Decoder::new(&out);
        assert_eq!(decode_options(&mut d).unwrap(), opts);
        d.finish("options").unwrap();
    }

    #[test]
    fn clean_eof_between_frames_is_none() {
        let mut payload = Vec::new();
        assert_eq!(read_frame(&mut &b""[..], &mut payload).unwrap(), None);
        let err = read_frame(&mut &[VERSION, 6][..], &mut payload).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn bad_headers_are_refused() {
        // A daemon or module of another build speaks another version.
        assert_eq!(
            parse_header(&[VERSION - 1, 6, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::Version(VERSION - 1))
        );
        assert_eq!(
            parse_header(&[VERSION, 99, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::Kind(99))
        );
        assert_eq!(
            parse_header(&[VERSION, 6, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(ProtocolError::TooLarge(u32::MAX))
        );
        // A frame that promises more payload than arrives.
        let mut payload = Vec::new();
        let err = read_frame(
            &mut &[VERSION, 6, 0, 0, 0, 0, 0, 10, 1, 2][..],
            &mut payload,
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let mut out = Vec::new();
        put_request(&mut out, 0, 1234, &sample_head(), false).unwrap();
        let payload = &out[HEADER_LEN..];
        // Every truncation of a valid payload fails cleanly.
        for n in 0..payload.len() {
            assert!(decode_request(&payload[..n]).is_err(), "truncated at {n}");
        }
        // Trailing garbage is refused.
        let mut longer = payload.to_vec();
        longer.push(0);
        assert!(decode_request(&longer).is_err());
        // A header count far beyond the payload is refused before allocating.
        let mut d = Decoder::new(&[0xff, 0xff, 0xff, 0xff, 0, 0]);
        assert_eq!(d.pairs("headers"), Err(ProtocolError::Truncated("headers")));
        // A byte string longer than the payload.
        assert!(Decoder::new(&[0, 0, 1, 0, b'x']).bytes("s").is_err());
        assert!(decode_start(&[0, 50, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn hello_round_trips_and_is_checked() {
        let mut out = Vec::new();
        put_hello(&mut out, 4242, "shop").unwrap();
        let mut payload = Vec::new();
        assert_eq!(
            read_frame(&mut &out[..], &mut payload).unwrap(),
            Some((Kind::Hello, 0))
        );
        assert_eq!(decode_hello(&payload), Ok((4242, "shop")));
        for n in 0..payload.len() {
            assert!(decode_hello(&payload[..n]).is_err(), "truncated at {n}");
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(decode_hello(&longer).is_err());
    }

    #[test]
    fn only_an_auth_frame_of_a_secret_opens_a_connection() {
        let secret = Secret::generate().unwrap();
        let mut out = Vec::new();
        put_auth(&mut out, &secret);
        let h: [u8; HEADER_LEN] = out[..HEADER_LEN].try_into().unwrap();
        assert_eq!(auth_frame_len(&h), Ok(out.len()));
        assert!(secret.matches(&out[HEADER_LEN..]));
        // A request first (the protocol before authentication existed), an Auth
        // frame of another length, flags, an older version: all refused from
        // the header alone, before any payload is read.
        let refused = [
            header(Kind::Request, 0, 100),
            header(Kind::Auth, 0, SECRET_LEN + 1),
            header(Kind::Auth, 0, 0),
            header(Kind::Auth, 1, SECRET_LEN),
            [
                VERSION - 1,
                Kind::Auth as u8,
                0,
                0,
                0,
                0,
                0,
                SECRET_LEN as u8,
            ],
        ];
        for h in refused {
            assert!(auth_frame_len(&h).is_err(), "{h:?}");
        }
    }
}
