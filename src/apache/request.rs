//! One request served by Gateway: the CGI view of a `request_rec`, its body, and
//! its response, over the safe [`Request`] of `records`.

use std::ffi::c_int;
use std::io;
use std::os::fd::RawFd;

use super::config::Mount;
use super::ffi::OK;
use super::records::{Brigade, Request, SharedRequest};
use crate::common::cgi::RequestHead;
use crate::common::framing;
use crate::common::log::request_line;
use crate::common::socket;
use crate::common::transport::{self, Header, Outcome, RequestBody, ResponseChannel};
use crate::dispatch::{self, Runner};

/// Logs a line about request `r` to its server's error log.
pub fn log(r: &Request<'_>, level: log::Level, msg: &str) {
    r.log_line(level, &request_line(r.method(), r.unparsed_uri(), msg));
}

/// What a body or response finds once the handler took its request back.
fn request_gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the request has already ended",
    )
}

/// The request body, read through httpd's input filters (which decode chunked bodies).
struct ApacheBody {
    r: SharedRequest,
    started: bool,
    expected: bool,
    /// The client's socket, to tell a client that left (None over HTTP/2).
    client_fd: Option<RawFd>,
}

impl RequestBody for ApacheBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let ApacheBody {
            r,
            started,
            expected,
            ..
        } = self;
        r.with(|r, _| {
            if !*started {
                *started = true;
                *expected = r.should_read_body();
            }
            if !*expected || buf.is_empty() {
                return Ok(0);
            }
            r.read_body(buf).ok_or_else(|| {
                *expected = false;
                io::Error::other("the client sent a broken body or went away")
            })
        })
        .unwrap_or_else(|| Err(request_gone()))
    }

    fn client_gone(&mut self) -> bool {
        // Over HTTP/2 there is no socket of the request's own: mod_http2 marks
        // the stream's connection aborted when the client resets the stream.
        match self.client_fd {
            Some(fd) => socket::peer_closed(fd),
            None => self.r.with(|r, _| r.connection_aborted()).unwrap_or(true),
        }
    }
}

/// The response, written through httpd's output filters.
struct ApacheResponse {
    r: SharedRequest,
    /// Bytes passed down since the last flush: httpd's core output filter only
    /// blocks on a flush or once about 64 KiB are pending (so does mod_http2).
    unflushed: usize,
}

/// Below this much pending output a write cannot block, so the GIL is kept.
const BUFFERED_WRITE_LIMIT: usize = 16 * 1024;

impl ApacheResponse {
    /// Runs `f` with the request and the output brigade.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Request<'_>, &mut Brigade) -> io::Result<T>,
    ) -> io::Result<T> {
        self.r.with(f).unwrap_or_else(|| Err(request_gone()))
    }
}

impl ResponseChannel for ApacheResponse {
    fn start(&mut self, status: u16, status_line: &str, headers: &[Header]) -> io::Result<()> {
        let declared = framing::declared_length(headers)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.with(|r, _| {
            r.set_status(status, status_line.as_bytes());
            for (name, value) in headers {
                if name.eq_ignore_ascii_case("content-type") {
                    r.set_content_type(value);
                } else if name.eq_ignore_ascii_case("content-length") {
                    r.set_content_length(declared.unwrap_or(0));
                } else {
                    r.add_header_out(name.as_bytes(), value);
                }
            }
            Ok(())
        })
    }

    fn only_buffers(&self, len: usize, flush: bool) -> bool {
        !flush && self.unflushed + len <= BUFFERED_WRITE_LIMIT
    }

    fn write(&mut self, data: &[u8], flush: bool) -> io::Result<()> {
        self.unflushed = if flush {
            0
        } else {
            self.unflushed + data.len()
        };
        self.with(|r, brigade| r.write(brigade, data, flush))
    }

    fn send_file(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.with(|r, brigade| r.send_file(brigade, fd, offset, len))
    }

    fn abort(&mut self) {
        self.r.with(|r, _| r.abort_response());
    }

    fn log(&self, level: log::Level, line: &str) {
        self.r.with(|r, _| r.log_line(level, line));
    }
}

/// Answers `r` with the status page (`SetHandler gateway-status`).
pub fn serve_status(r: &mut Request<'_>) -> c_int {
    let query = r.args().to_vec();
    let accept = r
        .headers_in()
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(b"accept"))
        .map(|(_, value)| value.to_vec());
    let outcome = r.lend(|shared| {
        let mut response = ApacheResponse {
            r: shared,
            unflushed: 0,
        };
        dispatch::status("apache", &query, accept.as_deref(), &mut response)
    });
    if outcome == Outcome::Complete {
        r.finish();
    }
    OK as c_int
}

/// The CGI view of request `r` for the application at `mount`.
fn head<'a>(r: &Request<'a>, mount: &'a Mount) -> RequestHead<'a> {
    let (script_name, path_info) = mount.prefix.split_or_root(r.uri());
    RequestHead {
        method: r.method(),
        script_name,
        path_info,
        query_string: r.args(),
        request_uri: r.unparsed_uri(),
        protocol: r.protocol(),
        server_name: r.server_name(),
        server_port: r.server_port(),
        server_addr: r.local_ip(),
        remote_addr: r.useragent_ip(),
        remote_port: r.useragent_port(),
        https: r.scheme() == b"https",
        remote_user: r.user(),
        auth_type: r.auth_type(),
        headers: r.headers_in(),
        server_vars: r.subprocess_env(),
    }
}

/// Serves request `r` with the application mounted at `mount`, run by `runner`.
pub fn serve(r: &mut Request<'_>, mount: &Mount, runner: Runner<'_>) -> c_int {
    if let Err(rc) = r.setup_body() {
        return rc;
    }
    let head = head(r, mount);
    let has_body = r.has_body();
    let client_fd = r.client_fd();
    let outcome = r.lend(|shared| {
        let request = transport::Request {
            head,
            has_body,
            body: Box::new(ApacheBody {
                r: shared.clone(),
                started: false,
                expected: false,
                client_fd,
            }),
            response: Box::new(ApacheResponse {
                r: shared,
                unflushed: 0,
            }),
        };
        dispatch::run(runner, &mount.app, request)
    });
    match outcome {
        // What the application left unread of the body is skipped by httpd
        // after the handler (ap_finalize_request_protocol), which keeps the
        // connection usable.
        Outcome::Complete => {
            r.finish();
            OK as c_int
        }
        Outcome::Status(status) => c_int::from(status),
        Outcome::Aborted | Outcome::ClientGone => OK as c_int,
    }
}
