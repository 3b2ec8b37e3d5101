//! One embedded request on the event loop: read the body, hand a snapshot of the
//! request to a Python thread (see [`super::handoff`]), and send the response pieces
//! the thread queues, waiting for the client when it reads slowly.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{LocConfig, Mount};
use super::exchange::{Exchange, Piece};
use super::ffi::*;
use super::handoff::Handoff;
use super::runtime::{self, log_line};
use crate::common::framing;
use crate::common::log::request_line;
use crate::common::transport::{Header, Outcome};
use crate::daemon::Endpoint;
use crate::dispatch::{self, Route, Runner};
use crate::python::ServerInfo;

/// Response bytes handed to nginx but not yet sent before the loop stops taking
/// more from the application and waits for the client.
const SEND_HIGH_WATER: usize = 256 * 1024;

/// Marks the buffers this module gives nginx, so they can be recycled.
static BUF_TAG: u8 = 0;

fn tag() -> ngx_buf_tag_t {
    (&BUF_TAG as *const u8).cast_mut().cast()
}

fn ngx_int(v: i32) -> ngx_int_t {
    v as ngx_int_t
}

/// Logs a line about request `r` (loop thread).
unsafe fn log_request(r: *mut ngx_http_request_t, level: log::Level, msg: &str) {
    // SAFETY: r is live; its method and URI are pool strings.
    let line = unsafe {
        request_line(
            str_bytes(&(*r).method_name),
            str_bytes(&(*r).unparsed_uri),
            msg,
        )
    };
    log_line(level, &line);
}

/// The content handler: reads the body, then continues in [`gateway_body_read`].
#[no_mangle]
pub unsafe extern "C" fn gateway_handle_request(
    r: *mut ngx_http_request_t,
    lcf: *mut c_void,
) -> ngx_int_t {
    // SAFETY: r and lcf come from nginx's content phase (see handle).
    match catch_unwind(AssertUnwindSafe(|| unsafe { handle(r, lcf) })) {
        Ok(rc) => rc,
        Err(_) => {
            // SAFETY: r is the live request of this content handler.
            unsafe {
                log_request(
                    r,
                    log::Level::Error,
                    "internal error (panic) while serving this request",
                )
            };
            ngx_int(NGX_HTTP_INTERNAL_SERVER_ERROR as i32)
        }
    }
}

unsafe fn handle(r: *mut ngx_http_request_t, lcf: *mut c_void) -> ngx_int_t {
    // SAFETY: the shim passes this location's record.
    let Some(lcf) = (unsafe { lcf.cast::<LocConfig>().as_ref() }) else {
        return ngx_int(NGX_DECLINED);
    };
    let Some(mount) = lcf.mount.clone() else {
        return ngx_int(NGX_DECLINED);
    };
    if let Err(why) = runtime::runtime() {
        // SAFETY: r is the live request of this content handler.
        unsafe {
            log_request(
                r,
                log::Level::Error,
                &format!("requests cannot run in this worker: {why}"),
            )
        };
        return ngx_int(NGX_HTTP_INTERNAL_SERVER_ERROR as i32);
    }
    let daemon = match dispatch::route(lcf.mode.as_ref()) {
        Ok(Route::Embedded) => None,
        Ok(Route::Daemon(endpoint)) => Some(endpoint),
        Err(not_running) => {
            // SAFETY: r is the live request of this content handler.
            unsafe { log_request(r, log::Level::Error, &not_running.to_string()) };
            return ngx_int(i32::from(dispatch::NotRunning::STATUS));
        }
    };
    let exchange = Arc::new(Exchange::default());
    let state = Box::new(LoopState {
        r,
        mount,
        daemon,
        exchange: exchange.clone(),
        free: std::ptr::null_mut(),
        busy: std::ptr::null_mut(),
        in_flight: VecDeque::new(),
        header_sent: false,
        header_only: false,
        detached: false,
    });
    // SAFETY: r is live; the cleanup owns the state until the request's pool goes.
    unsafe {
        let cln = ngx_pool_cleanup_add((*r).pool, 0);
        if cln.is_null() {
            return ngx_int(NGX_HTTP_INTERNAL_SERVER_ERROR as i32);
        }
        let state = Box::into_raw(state);
        (*cln).handler = Some(request_gone);
        (*cln).data = state.cast();
        exchange.loop_state.store(state.cast(), Ordering::Relaxed);
        gateway_ngx_set_ctx(r, state.cast());
        let rc = ngx_http_read_client_request_body(r, Some(gateway_body_read));
        if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
            return rc;
        }
    }
    ngx_int(NGX_DONE)
}

/// The loop's side of one request. Lives in the request's pool (see
/// [`request_gone`]), so the response bytes nginx still points to outlive it.
struct LoopState {
    r: *mut ngx_http_request_t,
    mount: Arc<Mount>,
    /// The daemon group that runs the application, None when it runs embedded.
    daemon: Option<Arc<Endpoint>>,
    exchange: Arc<Exchange>,
    free: *mut ngx_chain_t,
    busy: *mut ngx_chain_t,
    /// Buffers given to nginx, in order, with the memory they point to.
    in_flight: VecDeque<(*mut ngx_buf_t, Option<Vec<u8>>)>,
    header_sent: bool,
    header_only: bool,
    /// The request was finalized: nothing more goes to nginx.
    detached: bool,
}

/// Bytes of a buffer nginx has not sent yet.
unsafe fn unsent(b: *const ngx_buf_t) -> usize {
    // SAFETY: b is a live buffer of the request's pool.
    unsafe {
        if (*b).in_file() != 0 && (*b).memory() == 0 {
            ((*b).file_last - (*b).file_pos) as usize
        } else {
            (*b).last.offset_from((*b).pos) as usize
        }
    }
}

/// Pool cleanup: the request is over on the nginx side.
unsafe extern "C" fn request_gone(data: *mut c_void) {
    // SAFETY: data is the state boxed in handle(); the pool runs this once.
    let state = unsafe { Box::from_raw(data.cast::<LoopState>()) };
    let _ = state.exchange.loop_state.compare_exchange(
        data,
        std::ptr::null_mut(),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    state.exchange.set_gone();
    discard(&state.exchange);
}

/// Drops what a thread queued for a request that is over on the nginx side; only
/// its End matters (the worker counts running applications). Loop thread only.
fn discard(exchange: &Exchange) {
    while let Some(piece) = exchange.pop() {
        if matches!(piece, Piece::End(_)) {
            runtime::job_done();
        }
    }
}

/// The body is read: snapshot the request and hand it to a Python thread.
unsafe extern "C" fn gateway_body_read(r: *mut ngx_http_request_t) {
    // SAFETY: r is live and its ctx is the state set in handle().
    let state = unsafe { gateway_ngx_get_ctx(r).cast::<LoopState>() };
    if state.is_null() {
        // SAFETY: r is live: nginx is calling the body handler with it, and we own its reference.
        unsafe { ngx_http_finalize_request(r, ngx_int(NGX_HTTP_INTERNAL_SERVER_ERROR as i32)) };
        return;
    }
    // SAFETY: r is live and a non-NULL ctx is its state, alive as long as the request's pool.
    let started = catch_unwind(AssertUnwindSafe(|| unsafe { dispatch(r, &mut *state) }));
    let rc = match started {
        Ok(Ok(())) => return,
        Ok(Err(rc)) => rc,
        Err(_) => {
            // SAFETY: r is live (body handler).
            unsafe {
                log_request(
                    r,
                    log::Level::Error,
                    "internal error (panic) while starting this request",
                )
            };
            ngx_int(NGX_HTTP_INTERNAL_SERVER_ERROR as i32)
        }
    };
    // SAFETY: r is live and state is its own; nothing touches state after this.
    unsafe { finish(state, rc) };
}

unsafe fn dispatch(r: *mut ngx_http_request_t, state: &mut LoopState) -> Result<(), ngx_int_t> {
    // SAFETY: r is live on the loop thread for the whole call.
    unsafe {
        (*r).write_event_handler = Some(gateway_write_ready);
        (*r).read_event_handler = Some(gateway_client_check);
    }
    // SAFETY: r is live and nginx has finished reading its body (this is the body handler).
    let handoff = unsafe { Handoff::take(r) }.map_err(|e| {
        // SAFETY: r is live (body handler).
        unsafe {
            log_request(
                r,
                log::Level::Error,
                &format!("cannot pass the request body on: {e}"),
            )
        };
        ngx_int(NGX_HTTP_INTERNAL_SERVER_ERROR as i32)
    })?;
    let mount = state.mount.clone();
    let exchange = state.exchange.clone();
    let job: runtime::Job = match state.daemon.clone() {
        Some(endpoint) => {
            let queued = Instant::now();
            Box::new(move |_: &ServerInfo| {
                let runner = Runner::Daemon(&endpoint);
                handoff.run(&mount, runner, exchange, queued.elapsed())
            })
        }
        None => Box::new(move |info: &ServerInfo| {
            handoff.run(&mount, Runner::Embedded(info), exchange, Duration::ZERO)
        }),
    };
    let rt = runtime::runtime().map_err(|_| ngx_int(NGX_HTTP_INTERNAL_SERVER_ERROR as i32))?;
    let group = state.daemon.as_ref().map(|ep| ep.group.as_str());
    rt.submit(job, group).map_err(|why| {
        // SAFETY: r is live (body handler).
        unsafe {
            log_request(
                r,
                log::Level::Error,
                &format!("cannot run the application: {why}"),
            )
        };
        ngx_int(NGX_HTTP_SERVICE_UNAVAILABLE as i32)
    })
}

/// The loop was woken for `exchange`: send what its thread queued.
pub fn on_ready(exchange: &Arc<Exchange>) {
    let state = exchange
        .loop_state
        .load(Ordering::Relaxed)
        .cast::<LoopState>();
    // SAFETY: a non-NULL loop_state is alive: the pool cleanup clears it before freeing it.
    if state.is_null() || unsafe { (*state).detached } {
        discard(exchange);
        return;
    }
    // SAFETY: a non-NULL loop_state is the live state of a live request (loop thread).
    let c = unsafe { (*(*state).r).connection };
    // SAFETY: a non-NULL loop_state is the live state of a live request (loop thread only).
    unsafe { drain(state) };
    // SAFETY: connections are never freed, only recycled; nginx checks c->destroyed.
    unsafe { ngx_http_run_posted_requests(c) };
}

/// Sends queued pieces until the queue is empty, the client is slow, or the
/// request ends. It may finalize the request, which frees `state` with its pool:
/// callers must not use `state` afterwards.
///
/// # Safety
/// `state` must be the live state of a live request, on the loop thread.
unsafe fn drain(raw: *mut LoopState) {
    loop {
        // SAFETY: guaranteed by the caller until finish() below, after which we return.
        let state = unsafe { &mut *raw };
        if state.detached {
            return;
        }
        // SAFETY: state.r is live while the state is not detached.
        if unsafe { state.pending() } > SEND_HIGH_WATER {
            // SAFETY: state.r is live while the state is not detached; we return right after.
            unsafe { wait_for_client(raw) };
            return;
        }
        let Some(piece) = state.exchange.pop() else {
            // Not all sent because the client is slow (not because nginx holds back a small
            // unflushed piece on a writable socket): the send timeout applies.
            // SAFETY: state.r is live while the state is not detached.
            if unsafe { state.pending() > 0 && (*(*(*state.r).connection).write).ready() == 0 } {
                // SAFETY: state.r is live; we return right after.
                unsafe { wait_for_client(raw) };
            }
            return;
        };
        let r = state.r;
        let rc = match piece {
            Piece::Start {
                status,
                status_line,
                headers,
            } => {
                // SAFETY: state.r is live while the state is not detached.
                unsafe { state.send_header(status, &status_line, &headers) }
            }
            // SAFETY: state.r is live while the state is not detached.
            Piece::Data { data, flush } => unsafe { state.send_data(data, flush) },
            // SAFETY: state.r is live while the state is not detached.
            Piece::File { fd, offset, len } => unsafe { state.send_file(fd, offset, len) },
            Piece::End(outcome) => {
                runtime::job_done();
                // SAFETY: state.r is live while the state is not detached.
                let rc = unsafe { state.end(outcome) };
                // SAFETY: state.r is live; we return right after.
                unsafe { finish(raw, rc) };
                return;
            }
        };
        if rc == ngx_int(NGX_ERROR) || rc > ngx_int(NGX_OK as i32) {
            if rc == ngx_int(NGX_ERROR) {
                // SAFETY: r is still live: nothing finalized it yet.
                unsafe {
                    log_request(
                        r,
                        log::Level::Info,
                        "the client closed the connection before the response was complete",
                    )
                };
            }
            // SAFETY: state.r is live; we return right after.
            unsafe { finish(raw, rc) };
            return;
        }
    }
}

/// Ends the request with `rc`. This may free `state` with the request's pool:
/// callers must not use it afterwards.
///
/// # Safety
/// `state` must be the live state of a live request, on the loop thread.
unsafe fn finish(state: *mut LoopState, rc: ngx_int_t) {
    // SAFETY: guaranteed by the caller; the reference ends before the request may be freed.
    let r = unsafe {
        let state = &mut *state;
        state.detached = true;
        state.exchange.set_gone();
        state.r
    };
    // SAFETY: r is live until this call, which may free it (and state with its pool).
    unsafe { ngx_http_finalize_request(r, rc) };
}

/// Keeps sending when the client can take more (nginx's write event).
unsafe extern "C" fn gateway_write_ready(r: *mut ngx_http_request_t) {
    // SAFETY: r is live; its ctx is our state while the pool lives.
    let state = unsafe { gateway_ngx_get_ctx(r).cast::<LoopState>() };
    if state.is_null() {
        return;
    }
    let raw = state;
    // SAFETY: a non-NULL ctx is our state, alive as long as the request's pool.
    let state = unsafe { &mut *raw };
    if state.detached {
        return;
    }
    // SAFETY: nginx calls the write handler with a live request; we return right after finish/drain.
    unsafe {
        let c = (*r).connection;
        let wev = (*c).write;
        if (*wev).timedout() != 0 {
            (*c).set_timedout(1);
            log_request(
                r,
                log::Level::Info,
                "the client timed out reading the response",
            );
            finish(raw, ngx_int(NGX_HTTP_REQUEST_TIME_OUT as i32));
            return;
        }
        if !state.header_sent {
            return;
        }
        gateway_ngx_del_timer(wev);
        let rc = ngx_http_output_filter(r, std::ptr::null_mut());
        if rc == ngx_int(NGX_ERROR) {
            finish(raw, rc);
            return;
        }
        state.release(std::ptr::null_mut());
        drain(raw);
    }
}

/// Notices a client that closes its connection while the application runs without
/// writing (a long poll, a slow computation): the request ends at once, and the
/// application's next write fails, so that it stops and `close()` runs.
unsafe extern "C" fn gateway_client_check(r: *mut ngx_http_request_t) {
    // SAFETY: r is live; its ctx is our state while the pool lives.
    let state = unsafe { gateway_ngx_get_ctx(r).cast::<LoopState>() };
    // SAFETY: a non-NULL ctx is our state, alive as long as the request's pool.
    if state.is_null() || unsafe { (*state).detached } {
        return;
    }
    // SAFETY: nginx calls the read handler with a live request; we return right after finish.
    unsafe {
        let c = (*r).connection;
        // HTTP/2 marks a reset stream's connection; HTTP/1 needs a look at the socket.
        let gone = (*c).error() != 0 || ((*r).stream.is_null() && peer_closed((*c).fd));
        if gone {
            (*c).set_error(1);
            log_request(
                r,
                log::Level::Info,
                "the client closed the connection while the application was running",
            );
            finish(state, ngx_int(NGX_HTTP_CLIENT_CLOSED_REQUEST as i32));
        }
    }
}

/// Whether the peer of a connected socket has closed it (pipelined bytes are left unread).
fn peer_closed(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: peeks at most one byte into a local.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            io::Error::last_os_error().kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

/// Arms the write event (and the send timeout) to resume when the client reads.
///
/// # Safety
/// As for [`finish`], which it may call.
unsafe fn wait_for_client(state: *mut LoopState) {
    // SAFETY: guaranteed by the caller; finish is the last use of state.
    unsafe {
        let r = (*state).r;
        let wev = (*(*r).connection).write;
        let clcf = gateway_ngx_core_loc_conf(r);
        if (*wev).delayed() == 0 && (*wev).timer_set() == 0 {
            gateway_ngx_add_timer(wev, (*clcf).send_timeout);
        }
        if ngx_handle_write_event(wev, (*clcf).send_lowat) != NGX_OK as ngx_int_t {
            finish(state, ngx_int(NGX_ERROR));
        }
    }
}

impl LoopState {
    /// Bytes given to nginx and not sent yet.
    unsafe fn pending(&self) -> usize {
        self.in_flight
            .iter()
            // SAFETY: buffers in in_flight belong to the request's pool, alive while the state is.
            .map(|(b, _)| unsafe { unsent(*b) })
            .sum()
    }

    /// Frees the memory of sent buffers and recycles them.
    unsafe fn release(&mut self, mut out: *mut ngx_chain_t) {
        while let Some((b, _)) = self.in_flight.front() {
            // SAFETY: buffers in in_flight belong to the request's pool, alive while the state is.
            if unsafe { unsent(*b) } != 0 {
                break;
            }
            self.in_flight.pop_front();
        }
        // SAFETY: the chains hold buffers of this request's pool.
        unsafe {
            ngx_chain_update_chains(
                (*self.r).pool,
                &mut self.free,
                &mut self.busy,
                &mut out,
                tag(),
            )
        };
    }

    /// A cleared buffer in a chain link of its own.
    unsafe fn buffer(&mut self) -> Option<*mut ngx_chain_t> {
        // SAFETY: the free list holds links of this request's pool.
        let cl = unsafe { ngx_chain_get_free_buf((*self.r).pool, &mut self.free) };
        if cl.is_null() {
            return None;
        }
        // SAFETY: cl is a fresh link with a buffer from the request's pool.
        unsafe {
            *(*cl).buf = ngx_buf_t::default();
            (*(*cl).buf).tag = tag();
            (*cl).next = std::ptr::null_mut();
        }
        Some(cl)
    }

    unsafe fn output(&mut self, cl: *mut ngx_chain_t, data: Option<Vec<u8>>) -> ngx_int_t {
        // SAFETY: cl is a link from buffer(), in the request's pool.
        self.in_flight.push_back((unsafe { (*cl).buf }, data));
        // SAFETY: self.r is live while the state is not detached; the data cl points to stays in in_flight.
        let rc = unsafe { ngx_http_output_filter(self.r, cl) };
        // SAFETY: self.r is live; out is the chain just passed to nginx.
        unsafe { self.release(cl) };
        if rc == ngx_int(NGX_AGAIN) {
            ngx_int(NGX_OK as i32)
        } else {
            rc
        }
    }

    /// A copy of `s` in the request's pool.
    unsafe fn pool_str(&self, s: &[u8]) -> Option<ngx_str_t> {
        // SAFETY: the pool is live; the copy fits the allocation.
        unsafe {
            let p = ngx_pnalloc((*self.r).pool, s.len().max(1)).cast::<u8>();
            if p.is_null() {
                return None;
            }
            std::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
            Some(ngx_str_t {
                len: s.len(),
                data: p,
            })
        }
    }

    unsafe fn send_header(
        &mut self,
        status: u16,
        status_line: &str,
        headers: &[Header],
    ) -> ngx_int_t {
        let error = ngx_int(NGX_ERROR);
        let r = self.r;
        // SAFETY: self.r is live; every string stored in headers_out is copied into its pool first.
        unsafe {
            let out = &mut (*r).headers_out;
            out.status = status as ngx_uint_t;
            let Some(line) = self.pool_str(status_line.as_bytes()) else {
                return error;
            };
            out.status_line = line;
            // The head was checked on its way here (ResponseChannel::start).
            if let Ok(Some(len)) = framing::declared_length(headers) {
                out.content_length_n = len as off_t;
            }
            for (name, value) in headers {
                if name.eq_ignore_ascii_case("content-type") {
                    let Some(v) = self.pool_str(value) else {
                        return error;
                    };
                    // The *_types directives (gzip, charset, sub_filter, ssi) match
                    // the media type alone, as for a proxied response.
                    let (type_len, charset) = framing::content_type_parts(value);
                    out.content_type = v;
                    out.content_type_len = type_len;
                    out.content_type_lowcase = std::ptr::null_mut();
                    if let Some(range) = charset {
                        out.charset = ngx_str_t {
                            len: range.len(),
                            data: v.data.add(range.start),
                        };
                    }
                    continue;
                }
                if name.eq_ignore_ascii_case("content-length") {
                    continue;
                }
                let h = ngx_list_push(&mut out.headers).cast::<ngx_table_elt_t>();
                let (Some(k), Some(v)) = (self.pool_str(name.as_bytes()), self.pool_str(value))
                else {
                    return error;
                };
                if h.is_null() {
                    return error;
                }
                *h = ngx_table_elt_t {
                    hash: 1,
                    key: k,
                    value: v,
                    lowcase_key: std::ptr::null_mut(),
                };
                // nginx adds its own Date and Server unless it knows the application sent them.
                if name.eq_ignore_ascii_case("date") {
                    out.date = h;
                } else if name.eq_ignore_ascii_case("server") {
                    out.server = h;
                }
            }
            // The status line is the application's, so nginx's header filter does not
            // recognise 204 and 304 itself: without header_only it would frame a body
            // (a chunked terminator) that the client reads as the next response.
            if framing::status_has_no_body(status) {
                (*r).set_header_only(1);
                if status == 204 {
                    out.content_length_n = -1;
                }
            }
            self.header_sent = true;
            let rc = ngx_http_send_header(r);
            self.header_only = (*r).header_only() != 0;
            if rc == ngx_int(NGX_AGAIN) {
                ngx_int(NGX_OK as i32)
            } else {
                rc
            }
        }
    }

    unsafe fn send_data(&mut self, data: Vec<u8>, flush: bool) -> ngx_int_t {
        if self.header_only || data.is_empty() && !flush {
            return ngx_int(NGX_OK as i32);
        }
        // SAFETY: self.r is live while the state is not detached.
        let Some(cl) = (unsafe { self.buffer() }) else {
            return ngx_int(NGX_ERROR);
        };
        // SAFETY: b points into data, which in_flight keeps until nginx has sent it.
        unsafe {
            let b = (*cl).buf;
            let p = data.as_ptr().cast_mut();
            (*b).start = p;
            (*b).pos = p;
            (*b).last = p.add(data.len());
            (*b).end = (*b).last;
            (*b).set_memory(u32::from(!data.is_empty()));
            (*b).set_flush(u32::from(flush));
            self.output(cl, Some(data))
        }
    }

    unsafe fn send_file(&mut self, fd: OwnedFd, offset: u64, len: u64) -> ngx_int_t {
        if self.header_only || len == 0 {
            return ngx_int(NGX_OK as i32);
        }
        let error = ngx_int(NGX_ERROR);
        // SAFETY: self.r is live; once the pool's cleanup has the descriptor, nothing else closes it.
        unsafe {
            let r = self.r;
            let pool = (*r).pool;
            let file = ngx_pcalloc(pool, std::mem::size_of::<ngx_file_t>()).cast::<ngx_file_t>();
            let cln = ngx_pool_cleanup_add(pool, std::mem::size_of::<ngx_pool_cleanup_file_t>());
            let Some(name) = self.pool_str(b"wsgi.file_wrapper") else {
                return error;
            };
            if file.is_null() || cln.is_null() {
                return error;
            }
            // From here the request's pool closes the descriptor.
            let fd = fd.into_raw_fd();
            (*cln).handler = Some(ngx_pool_cleanup_file);
            let clnf = (*cln).data.cast::<ngx_pool_cleanup_file_t>();
            (*clnf).fd = fd;
            (*clnf).name = name.data;
            (*clnf).log = (*(*r).connection).log;
            (*file).fd = fd;
            (*file).name = name;
            (*file).log = (*(*r).connection).log;
            let Some(cl) = self.buffer() else {
                return error;
            };
            let b = (*cl).buf;
            (*b).file = file;
            (*b).file_pos = offset as off_t;
            (*b).file_last = (offset + len) as off_t;
            (*b).set_in_file(1);
            (*b).set_flush(1);
            self.output(cl, None)
        }
    }

    /// The rc to finalize the request with once the application is done.
    unsafe fn end(&mut self, outcome: Outcome) -> ngx_int_t {
        match outcome {
            Outcome::Complete if self.header_only => ngx_int(NGX_OK as i32),
            // SAFETY: self.r is live while the state is not detached.
            Outcome::Complete => unsafe {
                ngx_http_send_special(self.r, NGX_HTTP_LAST as ngx_uint_t)
            },
            Outcome::Status(status) if !self.header_sent => ngx_int(i32::from(status)),
            Outcome::Status(_) | Outcome::Aborted => ngx_int(NGX_ERROR),
            Outcome::ClientGone => ngx_int(NGX_HTTP_CLIENT_CLOSED_REQUEST as i32),
        }
    }
}
