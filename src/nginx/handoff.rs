//! What a Python thread gets of a request: a copy of its head, its body as nginx
//! stored it, and a response that queues pieces for the event loop. Nothing here
//! touches nginx's memory once the hand-off is taken.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use super::config::Mount;
use super::exchange::{Exchange, Piece};
use super::ffi::*;
use super::runtime::{self, log_line};
use crate::common::cgi::RequestHead;
use crate::common::framing;
use crate::common::log::request_line;
use crate::common::transport::{Header, Outcome, Request, RequestBody, ResponseChannel};
use crate::dispatch::{self, Runner};

/// A request ready for a Python thread.
pub struct Handoff {
    snapshot: Snapshot,
    body: VecDeque<Segment>,
}

impl Handoff {
    /// Copies what the application needs out of `r`.
    ///
    /// # Safety
    /// `r` must be a live request whose body nginx finished reading, on the loop thread.
    pub unsafe fn take(r: *mut ngx_http_request_t) -> io::Result<Handoff> {
        // SAFETY: guaranteed by the caller.
        unsafe {
            Ok(Handoff {
                snapshot: Snapshot::take(r),
                body: body_segments(r)?,
            })
        }
    }

    /// Runs the request (on a module thread, which waits for it) with `runner`
    /// and queues its response, then its end. `waited` is how long it waited for
    /// a thread in this worker, which counts against a daemon group's
    /// queue-timeout: past it, the request gets a 503 at once.
    pub fn run(self, mount: &Mount, runner: Runner<'_>, exchange: Arc<Exchange>, waited: Duration) {
        let Handoff { snapshot, body } = self;
        let head = snapshot.head(mount);
        let outcome = match queue_timeout_passed(&runner, waited) {
            Some(why) => {
                log_line(
                    log::Level::Error,
                    &request_line(head.method, head.request_uri, &why),
                );
                Outcome::Status(503)
            }
            None => {
                let request = Request {
                    head,
                    has_body: !body.is_empty(),
                    body: Box::new(NginxBody {
                        segments: body,
                        offset: 0,
                    }),
                    response: Box::new(NginxResponse {
                        exchange: exchange.clone(),
                    }),
                };
                dispatch::run(runner, &mount.app, request)
            }
        };
        let _ = exchange.push(Piece::End(outcome), runtime::wake);
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

impl Snapshot {
    fn add(bytes: &mut Vec<u8>, s: &[u8]) -> Range<usize> {
        let start = bytes.len();
        bytes.extend_from_slice(s);
        start..bytes.len()
    }

    /// # Safety
    /// `r` must be a live request on the loop thread.
    unsafe fn take(r: *mut ngx_http_request_t) -> Snapshot {
        // SAFETY: the caller guarantees r is live; every pointer read here belongs to r, its connection or its configuration.
        unsafe {
            let c = (*r).connection;
            let hin = &(*r).headers_in;
            let mut bytes = Vec::with_capacity(1024);
            let add = Snapshot::add;
            let method = add(&mut bytes, str_bytes(&(*r).method_name));
            let path = add(&mut bytes, str_bytes(&(*r).uri));
            let query = add(&mut bytes, str_bytes(&(*r).args));
            let request_uri = add(&mut bytes, str_bytes(&(*r).unparsed_uri));
            let protocol = add(&mut bytes, str_bytes(&(*r).http_protocol));
            let host = str_bytes(&hin.server);
            let server_name = if host.is_empty() {
                add(
                    &mut bytes,
                    str_bytes(&(*gateway_ngx_core_srv_conf(r)).server_name),
                )
            } else {
                add(&mut bytes, host)
            };
            let mut text = [0u8; 256];
            let mut local = ngx_str_t {
                len: text.len(),
                data: text.as_mut_ptr(),
            };
            let server_addr =
                if ngx_connection_local_sockaddr(c, &mut local, 0) == NGX_OK as ngx_int_t {
                    add(&mut bytes, str_bytes(&local))
                } else {
                    add(&mut bytes, b"")
                };
            let server_port = if (*c).local_sockaddr.is_null() {
                0
            } else {
                ngx_inet_get_port((*c).local_sockaddr)
            };
            let remote_addr = add(&mut bytes, str_bytes(&(*c).addr_text));
            let remote_port = ngx_inet_get_port((*c).sockaddr);
            let user = (hin.user.len > 0).then(|| add(&mut bytes, str_bytes(&hin.user)));
            let mut headers = Vec::with_capacity(16);
            let mut part: *const ngx_list_part_t = &hin.headers.part;
            while !part.is_null() {
                let elts = std::slice::from_raw_parts(
                    (*part).elts.cast::<ngx_table_elt_t>(),
                    (*part).nelts,
                );
                for h in elts {
                    let name = add(&mut bytes, str_bytes(&h.key));
                    let value = add(&mut bytes, str_bytes(&h.value));
                    headers.push((name, value));
                }
                part = (*part).next;
            }
            Snapshot {
                bytes,
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
                remote_port,
                https: !(*c).ssl.is_null(),
            }
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
        fd: OwnedFd,
        pos: u64,
        end: u64,
    },
}

/// The body nginx read (from memory or its temporary file), in order.
///
/// # Safety
/// `r` must be a live request whose body nginx finished reading.
unsafe fn body_segments(r: *mut ngx_http_request_t) -> io::Result<VecDeque<Segment>> {
    let mut segments = VecDeque::new();
    // SAFETY: the caller guarantees r is live.
    let rb = unsafe { (*r).request_body };
    if rb.is_null() {
        return Ok(segments);
    }
    // SAFETY: rb is the live body record of r.
    let mut cl = unsafe { (*rb).bufs };
    while !cl.is_null() {
        // SAFETY: cl is a link of the body's chain, in r's pool.
        let b = unsafe { (*cl).buf };
        // SAFETY: b is a buffer of the body's chain; its memory or file belongs to r until it is freed.
        unsafe {
            if (*b).in_file() != 0 && !(*b).file.is_null() {
                if (*b).file_last > (*b).file_pos {
                    let fd = libc::fcntl((*(*b).file).fd, libc::F_DUPFD_CLOEXEC, 0);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    segments.push_back(Segment::File {
                        fd: OwnedFd::from_raw_fd(fd),
                        pos: (*b).file_pos as u64,
                        end: (*b).file_last as u64,
                    });
                }
            } else if !(*b).pos.is_null() && (*b).last > (*b).pos {
                let data =
                    std::slice::from_raw_parts((*b).pos, (*b).last.offset_from((*b).pos) as usize);
                match segments.back_mut() {
                    Some(Segment::Memory(v)) => v.extend_from_slice(data),
                    _ => segments.push_back(Segment::Memory(data.to_vec())),
                }
            }
            cl = (*cl).next;
        }
    }
    Ok(segments)
}

/// `wsgi.input`'s source on the Python thread.
struct NginxBody {
    segments: VecDeque<Segment>,
    offset: usize,
}

impl RequestBody for NginxBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
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
                Segment::File { fd, pos, end } => {
                    let want = buf.len().min((*end - *pos) as usize);
                    // SAFETY: buf is valid for want bytes; fd is our duplicate.
                    let n = unsafe {
                        libc::pread(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            want,
                            *pos as libc::off_t,
                        )
                    };
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the spooled request body is shorter than expected",
                        ));
                    }
                    *pos += n as u64;
                    n as usize
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
}

/// The response on the Python thread: pieces queued for the loop.
struct NginxResponse {
    exchange: Arc<Exchange>,
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
        self.exchange.push(piece, runtime::wake)
    }

    fn write(&mut self, data: &[u8], flush: bool) -> io::Result<()> {
        self.exchange.push(
            Piece::Data {
                data: data.to_vec(),
                flush,
            },
            runtime::wake,
        )
    }

    fn send_file(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        // The application closes its file when the request returns; nginx sends later.
        // SAFETY: F_DUPFD_CLOEXEC has no memory arguments; the new fd is ours.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: dup was just created and is owned here only.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        self.exchange
            .push(Piece::File { fd, offset, len }, runtime::wake)
    }

    fn abort(&mut self) {
        // The End(Aborted) that follows cuts the response short.
    }

    fn log(&self, level: log::Level, line: &str) {
        log_line(level, line);
    }
}
