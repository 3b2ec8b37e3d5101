//! One embedded request: the CGI view of a `request_rec`, its body, and its response.

use std::ffi::{c_char, c_int, CStr};
use std::io;
use std::os::fd::RawFd;

use super::config::Mount;
use super::ffi::*;
use super::hooks::aplog_level;
use crate::common::cgi::RequestHead;
use crate::common::framing;
use crate::common::log::request_line;
use crate::common::transport::{Header, Outcome, Request, RequestBody, ResponseChannel};
use crate::dispatch::{self, Runner};

/// Bytes of a C string owned by the request, empty for NULL.
///
/// # Safety
/// `s` must be NULL or a NUL-terminated string that outlives `'a`.
unsafe fn bytes<'a>(s: *const c_char) -> &'a [u8] {
    if s.is_null() {
        b""
    } else {
        // SAFETY: s is non-NULL and NUL-terminated (guaranteed by the caller).
        unsafe { CStr::from_ptr(s) }.to_bytes()
    }
}

/// # Safety
/// `s` must be NULL or a NUL-terminated string that outlives `'a`.
unsafe fn opt_bytes<'a>(s: *const c_char) -> Option<&'a [u8]> {
    // SAFETY: guaranteed by the caller.
    (!s.is_null()).then(|| unsafe { bytes(s) })
}

/// The entries of an APR table, in order.
///
/// # Safety
/// `t` must be NULL or a live APR table whose strings outlive `'a`.
unsafe fn table<'a>(t: *const apr_table_t) -> Vec<(&'a [u8], &'a [u8])> {
    if t.is_null() {
        return Vec::new();
    }
    // SAFETY: t is a live table (guaranteed by the caller).
    let elts = unsafe { &*apr_table_elts(t) };
    if elts.nelts <= 0 || elts.elts.is_null() {
        return Vec::new();
    }
    // SAFETY: the table's array holds nelts entries of apr_table_entry_t.
    let entries = unsafe {
        std::slice::from_raw_parts(elts.elts.cast::<apr_table_entry_t>(), elts.nelts as usize)
    };
    entries
        .iter()
        .filter(|e| !e.key.is_null())
        // SAFETY: keys and values of a live table are NUL-terminated strings.
        .map(|e| unsafe { (bytes(e.key), bytes(e.val)) })
        .collect()
}

/// Logs a line about request `r` to its server's error log.
pub fn log(r: *const request_rec, level: log::Level, msg: &str) {
    // SAFETY: r is a live request; method and unparsed_uri are NUL-terminated or NULL.
    let line = unsafe { request_line(bytes((*r).method), bytes((*r).unparsed_uri), msg) };
    log_line(r, level, &line);
}

fn log_line(r: *const request_rec, level: log::Level, line: &str) {
    let line = crate::common::log::c_line(line);
    // SAFETY: r is a live request and line is NUL-terminated.
    unsafe { gateway_ap_log(std::ptr::null(), r, aplog_level(level), line.as_ptr()) };
}

/// A `request_rec` handed to Python objects that may move between threads.
#[derive(Clone, Copy)]
struct RequestPtr(*mut request_rec);

// SAFETY: the request is used only while its handler runs (the WSGI layer detaches its objects
// before the handler returns), and only by one thread at a time (the objects' borrow flags).
unsafe impl Send for RequestPtr {}
// SAFETY: as above; shared references never touch the request without the borrow flag.
unsafe impl Sync for RequestPtr {}

/// The request body, read through httpd's input filters (which decode chunked bodies).
struct ApacheBody {
    r: RequestPtr,
    started: bool,
    expected: bool,
}

impl RequestBody for ApacheBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.r.0;
        if !self.started {
            self.started = true;
            // SAFETY: r is live (see RequestPtr); this sends "100 Continue" when the client waits.
            self.expected = unsafe { ap_should_client_block(r) } != 0;
        }
        if !self.expected || buf.is_empty() {
            return Ok(0);
        }
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { ap_get_client_block(r, buf.as_mut_ptr().cast(), buf.len() as apr_size_t) };
        if n < 0 {
            self.expected = false;
            return Err(io::Error::other(
                "the client sent a broken body or went away",
            ));
        }
        Ok(n as usize)
    }
}

/// The response, written through httpd's output filters.
struct ApacheResponse {
    r: RequestPtr,
    brigade: *mut apr_bucket_brigade,
    /// Bytes passed down since the last flush: httpd's core output filter only
    /// blocks on a flush or once about 64 KiB are pending (so does mod_http2).
    unflushed: usize,
}

/// Below this much pending output a write cannot block, so the GIL is kept.
const BUFFERED_WRITE_LIMIT: usize = 16 * 1024;

// SAFETY: see RequestPtr; the brigade belongs to the same request.
unsafe impl Send for ApacheResponse {}
// SAFETY: see RequestPtr.
unsafe impl Sync for ApacheResponse {}

impl ApacheResponse {
    fn pstr(&self, s: &[u8]) -> *mut c_char {
        // SAFETY: copies s into the request pool with a terminating NUL.
        unsafe { apr_pstrmemdup((*self.r.0).pool, s.as_ptr().cast(), s.len() as apr_size_t) }
    }

    fn check(&self, rv: apr_status_t) -> io::Result<()> {
        if rv == APR_SUCCESS as apr_status_t {
            Ok(())
        } else {
            Err(io::Error::other(format!("APR error {rv}")))
        }
    }
}

impl ResponseChannel for ApacheResponse {
    fn start(&mut self, status: u16, status_line: &str, headers: &[Header]) -> io::Result<()> {
        let r = self.r.0;
        let declared = framing::declared_length(headers)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // SAFETY: r is live; every string stored in it is copied into its pool.
        unsafe {
            (*r).status = c_int::from(status);
            (*r).status_line = self.pstr(status_line.as_bytes());
            for (name, value) in headers {
                if name.eq_ignore_ascii_case("content-type") {
                    ap_set_content_type(r, self.pstr(value));
                } else if name.eq_ignore_ascii_case("content-length") {
                    ap_set_content_length(r, declared.unwrap_or(0) as apr_off_t);
                } else {
                    apr_table_add(
                        (*r).headers_out,
                        self.pstr(name.as_bytes()),
                        self.pstr(value),
                    );
                }
            }
        }
        Ok(())
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
        // SAFETY: r is live; data stays valid during the call (transient bucket, passed at once).
        let rv = unsafe {
            gateway_ap_write(
                self.r.0,
                &mut self.brigade,
                data.as_ptr().cast(),
                data.len() as apr_size_t,
                c_int::from(flush),
            )
        };
        self.check(rv)
    }

    fn send_file(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        let r = self.r.0;
        let mut file: *mut apr_file_t = std::ptr::null_mut();
        let mut osfd = fd;
        // SAFETY: wraps the application's open fd without taking ownership (no cleanup closes it);
        // the shim sends the data with a flush before returning, while the fd is still open.
        let rv = unsafe {
            let rv = apr_os_file_put(
                &mut file,
                &mut osfd,
                (APR_FOPEN_READ | APR_FOPEN_SENDFILE_ENABLED) as i32,
                (*r).pool,
            );
            if rv != APR_SUCCESS as apr_status_t {
                rv
            } else {
                gateway_ap_send_file(
                    r,
                    &mut self.brigade,
                    file,
                    offset as apr_off_t,
                    len as apr_size_t,
                )
            }
        };
        self.check(rv)
    }

    fn abort(&mut self) {
        // SAFETY: r is live.
        unsafe { gateway_ap_abort_response(self.r.0) };
    }

    fn log(&self, level: log::Level, line: &str) {
        log_line(self.r.0, level, line);
    }
}

/// The CGI view of request `r` for the application at `mount`.
///
/// # Safety
/// `r` must be the live request of the running handler; the head borrows from it.
unsafe fn head<'a>(r: *mut request_rec, mount: &'a Mount) -> RequestHead<'a> {
    // SAFETY: every pointer read here belongs to r (or its connection) and outlives the handler.
    unsafe {
        let c = (*r).connection;
        let (script_name, path_info) = mount.prefix.split_or_root(bytes((*r).uri));
        let scheme = bytes(ap_run_http_scheme(r));
        RequestHead {
            method: bytes((*r).method),
            script_name,
            path_info,
            query_string: bytes((*r).args),
            request_uri: bytes((*r).unparsed_uri),
            protocol: bytes((*r).protocol),
            server_name: bytes(ap_get_server_name(r)),
            server_port: ap_get_server_port(r),
            server_addr: bytes((*c).local_ip),
            remote_addr: bytes((*r).useragent_ip),
            remote_port: if (*r).useragent_addr.is_null() {
                0
            } else {
                (*(*r).useragent_addr).port
            },
            https: scheme == b"https",
            remote_user: opt_bytes((*r).user),
            auth_type: opt_bytes((*r).ap_auth_type),
            headers: table((*r).headers_in),
            server_vars: table((*r).subprocess_env),
        }
    }
}

fn body(r: *mut request_rec) -> ApacheBody {
    ApacheBody {
        r: RequestPtr(r),
        started: false,
        expected: false,
    }
}

fn response(r: *mut request_rec) -> ApacheResponse {
    ApacheResponse {
        r: RequestPtr(r),
        brigade: std::ptr::null_mut(),
        unflushed: 0,
    }
}

/// Ends request `r` after its whole response was passed down the filters. What
/// the application left unread of the body is skipped by httpd after the handler
/// (ap_finalize_request_protocol), which keeps the connection usable.
///
/// # Safety
/// `r` must be the live request of the running handler.
unsafe fn finish(r: *mut request_rec) -> c_int {
    // SAFETY: r is live; a client that went away shows in its connection, not here.
    unsafe { gateway_ap_finish(r) };
    OK as c_int
}

/// Serves request `r` with the application mounted at `mount`, run by `runner`.
///
/// # Safety
/// `r` must be the live request of the running handler.
pub unsafe fn serve(r: *mut request_rec, mount: &Mount, runner: Runner<'_>) -> c_int {
    // SAFETY: r is live (guaranteed by the caller).
    let rc = unsafe { ap_setup_client_block(r, REQUEST_CHUNKED_DECHUNK as c_int) };
    if rc != OK as c_int {
        return rc;
    }
    let request = Request {
        // SAFETY: r is live (guaranteed by the caller).
        head: unsafe { head(r, mount) },
        // SAFETY: r is live; ap_setup_client_block has set how the body is framed.
        has_body: unsafe { (*r).read_chunked != 0 || (*r).remaining > 0 },
        body: Box::new(body(r)),
        response: Box::new(response(r)),
    };
    match dispatch::run(runner, &mount.app, request) {
        // SAFETY: r is live; the response is complete.
        Outcome::Complete => unsafe { finish(r) },
        Outcome::Status(status) => c_int::from(status),
        Outcome::Aborted | Outcome::ClientGone => OK as c_int,
    }
}
