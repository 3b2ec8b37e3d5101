//! What a Python thread gets of a request: a copy of its head, its body (as
//! nginx stored it when it came whole with the head, else from the exchange's
//! queue as it arrives), and a response that queues pieces for the event loop.
//! Nothing here touches nginx's memory once the hand-off is taken.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::config::Mount;
use super::exchange::{Exchange, Piece};
use super::records::{self, BodyPart};
use super::runtime::{self, log_line};
use crate::common::cgi::RequestHead;
use crate::common::framing;
use crate::common::log::request_line;
use crate::common::transport::{Flow, Header, Outcome, Request, RequestBody, ResponseChannel};
use crate::dispatch::{self, Runner};
use crate::python::ServerInfo;

/// A request ready for a Python thread.
pub struct Handoff {
    snapshot: Snapshot,
    body: VecDeque<Segment>,
    /// The body arrives in the exchange's queue ([`Exchange::body`]).
    streamed: bool,
}

impl Handoff {
    /// Copies what the application needs out of `r`, whose body nginx has read.
    pub fn take(r: &records::Request<'_>) -> io::Result<Handoff> {
        Ok(Handoff {
            snapshot: Snapshot::take(r),
            body: body_segments(r)?,
            streamed: false,
        })
    }

    /// Copies the head of `r`, whose body is still arriving: the loop queues it
    /// in the request's exchange.
    pub fn streamed(r: &records::Request<'_>) -> Handoff {
        Handoff {
            snapshot: Snapshot::take(r),
            body: VecDeque::new(),
            streamed: true,
        }
    }

    /// The request as a runner gets it, its body and response over `exchange`.
    fn request<'a>(
        snapshot: &'a Snapshot,
        mount: &'a Mount,
        body: VecDeque<Segment>,
        streamed: bool,
        exchange: &Arc<Exchange>,
        queue_only: bool,
    ) -> Request<'a> {
        Request {
            head: snapshot.head(mount),
            has_body: streamed || !body.is_empty(),
            body: Box::new(NginxBody {
                segments: body,
                offset: 0,
                streamed,
                exchange: exchange.clone(),
            }),
            response: Box::new(NginxResponse {
                exchange: exchange.clone(),
                queue_only,
            }),
        }
    }

    /// Runs the request (on a module thread, which waits for it) with `runner`
    /// and queues its response, then its end. `waited` is how long it waited for
    /// a thread in this worker, which counts against a daemon group's
    /// queue-timeout: past it, the request gets a 503 at once.
    pub fn run(self, mount: &Mount, runner: Runner<'_>, exchange: Arc<Exchange>, waited: Duration) {
        let Handoff {
            snapshot,
            body,
            streamed,
        } = self;
        let outcome = match queue_timeout_passed(&runner, waited) {
            Some(why) => {
                let head = snapshot.head(mount);
                log_line(
                    log::Level::Error,
                    &request_line(head.method, head.request_uri, &why),
                );
                if let Runner::Daemon(endpoint) = &runner {
                    dispatch::count_refusal(&endpoint.group, Outcome::Status(503));
                }
                Outcome::Status(503)
            }
            None => {
                let request = Self::request(&snapshot, mount, body, streamed, &exchange, false);
                dispatch::run(runner, &mount.app, request)
            }
        };
        let _ = exchange.push(Piece::End(outcome), runtime::wake);
    }

    /// Starts the request of an application that runs without a thread (on
    /// the interpreter's event loop) and returns at once; its response and its
    /// end are queued as a thread's are. Loop thread: nothing here blocks.
    pub fn start(self, mount: &Mount, info: &ServerInfo, exchange: Arc<Exchange>) {
        let Handoff {
            snapshot,
            body,
            streamed,
        } = self;
        let request = Self::request(&snapshot, mount, body, streamed, &exchange, true);
        let flow = Box::new(ExchangeFlow {
            exchange: exchange.clone(),
            streamed,
        });
        let done = Box::new(move |outcome| {
            let _ = exchange.push_now(Piece::End(outcome), runtime::wake);
        });
        dispatch::start(&mount.app, info, request, flow, done);
    }
}

/// The body, backpressure and disconnects of a request served without a thread.
struct ExchangeFlow {
    exchange: Arc<Exchange>,
    /// The body arrives in the exchange's queue (else it came whole with the head).
    streamed: bool,
}

impl Flow for ExchangeFlow {
    fn poll_body(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.streamed {
            return Poll::Ready(());
        }
        self.exchange.body.poll_ready(cx)
    }

    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.exchange.poll_room(cx)
    }

    fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.exchange.poll_gone(cx)
    }
}

/// Why a request that waited `waited` for a thread of this worker must not be
/// forwarded any more, if its daemon group's queue-timeout has passed.
fn queue_timeout_passed(runner: &Runner<'_>, waited: Duration) -> Option<String> {
    let Runner::Daemon(endpoint) = runner else {
        return None;
    };
    let limit = endpoint.queue_timeout.filter(|&limit| waited >= limit)?;
    Some(format!(
        "no daemon process of group '{}' took the request within queue-timeout={}s: \
         all its threads are busy; answering 503",
        endpoint.group,
        limit.as_secs()
    ))
}

/// What the application sees of the request, copied out of nginx's memory so that
/// the Python thread never reads the request while the loop may free it.
struct Snapshot {
    bytes: Vec<u8>,
    method: Range<usize>,
    path: Range<usize>,
    query: Range<usize>,
    request_uri: Range<usize>,
    protocol: Range<usize>,
    server_name: Range<usize>,
    server_addr: Range<usize>,
    remote_addr: Range<usize>,
    user: Option<Range<usize>>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    server_port: u16,
    remote_port: u16,
    https: bool,
}

/// The bytes of a [`Snapshot`] as they are copied in.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn add(&mut self, s: &[u8]) -> Range<usize> {
        let start = self.0.len();
        self.0.extend_from_slice(s);
        start..self.0.len()
    }
}

impl Snapshot {
    fn take(r: &records::Request<'_>) -> Snapshot {
        let c = r.connection();
        let mut b = Bytes(Vec::with_capacity(1024));
        let method = b.add(r.method());
        let path = b.add(r.uri());
        let query = b.add(r.args());
        let request_uri = b.add(r.unparsed_uri());
        let protocol = b.add(r.protocol());
        let host = r.host();
        let server_name = b.add(if host.is_empty() {
            r.server_name()
        } else {
            host
        });
        let server_addr = b.add(c.local_addr(&mut [0u8; 256]));
        // Known once local_addr has asked for it.
        let server_port = c.local_port();
        let remote_addr = b.add(c.remote_addr());
        let user = (!r.user().is_empty()).then(|| b.add(r.user()));
        let headers = r.headers().map(|(k, v)| (b.add(k), b.add(v))).collect();
        Snapshot {
            bytes: b.0,
            method,
            path,
            query,
            request_uri,
            protocol,
            server_name,
            server_addr,
            remote_addr,
            user,
            headers,
            server_port,
            remote_port: c.remote_port(),
            https: c.is_ssl(),
        }
    }

    fn head<'a>(&'a self, mount: &'a Mount) -> RequestHead<'a> {
        let b = |r: &Range<usize>| &self.bytes[r.clone()];
        let (script_name, path_info) = mount.prefix.split_or_root(b(&self.path));
        RequestHead {
            method: b(&self.method),
            script_name,
            path_info,
            query_string: b(&self.query),
            request_uri: b(&self.request_uri),
            protocol: b(&self.protocol),
            server_name: b(&self.server_name),
            server_port: self.server_port,
            server_addr: b(&self.server_addr),
            remote_addr: b(&self.remote_addr),
            remote_port: self.remote_port,
            https: self.https,
            remote_user: self.user.as_ref().map(b),
            auth_type: self.user.as_ref().map(|_| &b"Basic"[..]),
            headers: self.headers.iter().map(|(k, v)| (b(k), b(v))).collect(),
            server_vars: Vec::new(),
        }
    }
}

/// A part of the request body as nginx stored it.
enum Segment {
    Memory(Vec<u8>),
    /// A range of the temporary file nginx spooled the body to (a duplicate of its
    /// descriptor: nginx closes and removes the file with the request).
    File {
        file: File,
        pos: u64,
        end: u64,
    },
}

/// The body nginx read (from memory or its temporary file), in order.
fn body_segments(r: &records::Request<'_>) -> io::Result<VecDeque<Segment>> {
    let mut segments = VecDeque::new();
    for part in r.body() {
        match part {
            BodyPart::File { fd, pos, end } => segments.push_back(Segment::File {
                file: File::from(fd.try_clone_to_owned()?),
                pos,
                end,
            }),
            BodyPart::Memory(data) => match segments.back_mut() {
                Some(Segment::Memory(v)) => v.extend_from_slice(data),
                _ => segments.push_back(Segment::Memory(data.to_vec())),
            },
        }
    }
    Ok(segments)
}

/// `wsgi.input`'s source on the Python thread.
struct NginxBody {
    segments: VecDeque<Segment>,
    offset: usize,
    /// The body arrives in the exchange's queue instead.
    streamed: bool,
    /// Tells whether the client left (the loop ends the request then).
    exchange: Arc<Exchange>,
}

impl NginxBody {
    /// Reads from the queue the loop fills, and wakes the loop when it paused
    /// for room that this read made.
    fn read_streamed(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (read, resume) = self.exchange.body.read(buf);
        if resume {
            runtime::wake(self.exchange.clone());
        }
        read
    }
}

impl RequestBody for NginxBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.streamed {
            return self.read_streamed(buf);
        }
        loop {
            let Some(front) = self.segments.front_mut() else {
                return Ok(0);
            };
            if buf.is_empty() {
                return Ok(0);
            }
            let n = match front {
                Segment::Memory(data) => {
                    let n = buf.len().min(data.len() - self.offset);
                    buf[..n].copy_from_slice(&data[self.offset..self.offset + n]);
                    self.offset += n;
                    n
                }
                Segment::File { file, pos, end } => {
                    let want = buf.len().min((*end - *pos) as usize);
                    let n = file.read_at(&mut buf[..want], *pos)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the spooled request body is shorter than expected",
                        ));
                    }
                    *pos += n as u64;
                    n
                }
            };
            let done = match front {
                Segment::Memory(data) => self.offset == data.len(),
                Segment::File { pos, end, .. } => pos == end,
            };
            if done {
                self.segments.pop_front();
                self.offset = 0;
            }
            if n > 0 {
                return Ok(n);
            }
        }
    }

    fn client_gone(&mut self) -> bool {
        self.exchange.is_gone()
    }
}

/// The response on the Python thread: pieces queued for the loop.
struct NginxResponse {
    exchange: Arc<Exchange>,
    /// Served without a thread: never wait for room (the runner polls for it).
    queue_only: bool,
}

impl NginxResponse {
    fn push(&self, piece: Piece) -> io::Result<()> {
        if self.queue_only {
            self.exchange.push_now(piece, runtime::wake)
        } else {
            self.exchange.push(piece, runtime::wake)
        }
    }
}

impl ResponseChannel for NginxResponse {
    fn start(&mut self, status: u16, status_line: &str, headers: &[Header]) -> io::Result<()> {
        framing::declared_length(headers)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let piece = Piece::Start {
            status,
            status_line: status_line.to_string(),
            headers: headers.to_vec(),
        };
        self.push(piece)
    }

    fn write(&mut self, data: &[u8], flush: bool) -> io::Result<()> {
        self.push(Piece::Data {
            data: data.to_vec(),
            flush,
        })
    }

    fn send_file(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        // The application closes its file when the request returns; nginx sends later.
        // SAFETY: fd is the application's open file, for the length of this call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        self.push(Piece::File { fd, offset, len })
    }

    fn abort(&mut self) {
        // The End(Aborted) that follows cuts the response short.
    }

    fn log(&self, level: log::Level, line: &str) {
        log_line(level, line);
    }
}
