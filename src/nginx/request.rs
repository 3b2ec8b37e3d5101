//! One request on the event loop: start reading the body, hand a snapshot of
//! the request to a module thread (see [`super::handoff`]) as soon as the head
//! is in, pass the body on as it arrives ([`LoopState::pump`]: never spooled,
//! reading paused while the application's queue is full), and send the
//! response pieces the thread queues, waiting for the client when it reads
//! slowly.
//!
//! Every entry from nginx runs behind the panic guard. The steps under the guard
//! never finalize the request: they say what comes next ([`Next`]), and only
//! [`resume`] finalizes, after the guard, so that a panic leaves a live request
//! for the guard to end.

use std::ffi::c_void;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{LocConfig, Mount};
use super::exchange::{Exchange, Piece};
use super::ffi::*;
use super::handoff::Handoff;
use super::records::{self, NoMemory, Output, Request};
use super::runtime::{self, log_line, Job};
use crate::common::framing;
use crate::common::inbound::Broken;
use crate::common::log::request_line;
use crate::common::panic::{catch, fault_point};
use crate::common::transport::{Header, Outcome};
use crate::daemon::Endpoint;
use crate::dispatch::{self, Route, Runner};
use crate::ops::scoreboard::{self, Ticket};
use crate::python::ServerInfo;

/// Response bytes handed to nginx but not yet sent before the loop stops taking
/// more from the application and waits for the client.
const SEND_HIGH_WATER: usize = 256 * 1024;

const INTERNAL_SERVER_ERROR: ngx_int_t = records::status(NGX_HTTP_INTERNAL_SERVER_ERROR);

/// Logs a line about request `r`.
fn log_request(r: &Request<'_>, level: log::Level, msg: &str) {
    log_line(level, &request_line(r.method(), r.unparsed_uri(), msg));
}

/// The content handler: starts reading the body, then continues in
/// [`gateway_body_read`] once the whole body, or the part that came with the
/// head, is in.
#[no_mangle]
pub unsafe extern "C" fn gateway_handle_request(
    r: *mut ngx_http_request_t,
    lcf: *mut c_void,
) -> ngx_int_t {
    // SAFETY: nginx passes the request of its content phase; the shim this
    // location's record of this module (made by gateway_create_loc_conf).
    let (r, lcf) = unsafe { (Request::from_raw(r), lcf.cast::<LocConfig>().as_ref()) };
    catch(|| handle(r, lcf)).unwrap_or_else(|p| {
        log_request(&r, log::Level::Error, &p.to_string());
        INTERNAL_SERVER_ERROR
    })
}

fn handle(r: Request<'_>, lcf: Option<&LocConfig>) -> ngx_int_t {
    let Some(lcf) = lcf else {
        return records::DECLINED;
    };
    let Some(mount) = lcf.mount.clone() else {
        return records::DECLINED;
    };
    fault_point("nginx-handler");
    if let Err(why) = runtime::runtime() {
        let msg = format!("requests cannot run in this worker: {why}");
        log_request(&r, log::Level::Error, &msg);
        return INTERNAL_SERVER_ERROR;
    }
    let daemon = match dispatch::route(lcf.mode.as_ref()) {
        Ok(Route::Embedded) => None,
        Ok(Route::Daemon(endpoint)) => Some(endpoint),
        Err(not_running) => {
            log_request(&r, log::Level::Error, &not_running.to_string());
            return records::status(u32::from(dispatch::NotRunning::STATUS));
        }
    };
    start(r, mount, daemon)
}

/// Puts the loop's state of the request in its pool, then reads the body.
fn start(r: Request<'_>, mount: Arc<Mount>, daemon: Option<Arc<Endpoint>>) -> ngx_int_t {
    let exchange = Arc::new(Exchange::new(r.method(), r.unparsed_uri()));
    // The worker counts its embedded requests; a daemon group counts its own.
    let ticket = daemon
        .is_none()
        .then(|| scoreboard::begin(r.method(), r.unparsed_uri()))
        .flatten();
    let state = LoopState {
        ticket,
        request: Some(r),
        mount,
        daemon,
        exchange: exchange.clone(),
        output: Output::new(&r),
        header_sent: false,
        header_only: false,
        after_body: None,
    };
    let Ok(state) = r.pool().own(state) else {
        return INTERNAL_SERVER_ERROR;
    };
    exchange
        .loop_state
        .store(state.as_ptr().cast(), Ordering::Relaxed);
    r.set_ctx(state.as_ptr().cast());
    let rc = r.read_body(gateway_body_read);
    if rc >= records::status(NGX_HTTP_SPECIAL_RESPONSE) {
        if rc == records::status(NGX_HTTP_REQUEST_ENTITY_TOO_LARGE) {
            log_request(&r, log::Level::Error, TOO_LARGE);
        }
        return rc;
    }
    records::DONE
}

/// Why a body that grew past its limit gets a 413.
const TOO_LARGE: &str = "the request body is larger than client_max_body_size; answering 413";

/// The loop's side of one request. Lives in the request's pool, so the response
/// bytes nginx still points to outlive it; its drop (as the pool goes) tells the
/// thread that the request is over.
struct LoopState<'r> {
    /// The request, until this module finalizes it: nothing goes to nginx after.
    request: Option<Request<'r>>,
    /// Its count on the status page (embedded requests).
    ticket: Option<Ticket>,
    mount: Arc<Mount>,
    /// The daemon group that runs the application, None when it runs embedded.
    daemon: Option<Arc<Endpoint>>,
    exchange: Arc<Exchange>,
    output: Output<'r>,
    header_sent: bool,
    header_only: bool,
    /// The response is complete but the client still sends a body the
    /// application did not read: it is read and dropped, then the request
    /// ends with this code, and the connection stays usable.
    after_body: Option<ngx_int_t>,
}

impl Drop for LoopState<'_> {
    /// The request is over on the nginx side.
    fn drop(&mut self) {
        // Ended by nginx, not by this module: the client went away (or timed out).
        if let Some(ticket) = self.ticket.take() {
            ticket.finish(NGX_HTTP_CLIENT_CLOSED_REQUEST as u16);
        }
        let me = (self as *mut Self).cast::<c_void>();
        let _ = self.exchange.loop_state.compare_exchange(
            me,
            std::ptr::null_mut(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.exchange.set_gone();
        discard(&self.exchange);
    }
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

/// What the loop does with a request after a step.
enum Next {
    /// Nothing until the next event: a wake-up, or the client.
    Wait,
    /// Finalize the request with this code.
    Finish(ngx_int_t),
}

/// The loop's state of `r`, once [`start`] has set it.
fn state_of<'r>(r: &Request<'r>) -> Option<NonNull<LoopState<'r>>> {
    NonNull::new(r.ctx().cast())
}

/// Runs `step` on the loop's state of a request that this module has not
/// finalized yet, behind the panic guard, then finalizes the request if the
/// step says so. A panic ends the request: a 500 if its head was not sent,
/// else the connection is closed.
///
/// # Safety
/// `state` must be the state [`start`] put in a live request's pool (the
/// request's ctx, its exchange's `loop_state`), on the loop thread.
unsafe fn resume<'r>(
    state: NonNull<LoopState<'r>>,
    step: impl FnOnce(Request<'r>, &mut LoopState<'r>) -> Next,
) {
    let next = {
        // SAFETY: live (caller); the reference ends before finish, which may free it.
        let s = unsafe { &mut *state.as_ptr() };
        let Some(r) = s.request else {
            return;
        };
        match catch(|| step(r, &mut *s)) {
            Ok(next) => next,
            Err(p) => {
                log_request(&r, log::Level::Error, &p.to_string());
                Next::Finish(if s.header_sent {
                    records::ERROR
                } else {
                    INTERNAL_SERVER_ERROR
                })
            }
        }
    };
    if let Next::Finish(rc) = next {
        // SAFETY: live (caller), and no reference to it is held; nothing uses it after.
        unsafe { finish(state, rc) };
    }
}

/// Ends the request with `rc`. This may free the state with the request's pool.
///
/// # Safety
/// As for [`resume`]; neither the state nor a view of its request may be used
/// afterwards.
unsafe fn finish(state: NonNull<LoopState<'_>>, rc: ngx_int_t) {
    let r = {
        // SAFETY: live (caller); the reference ends before the request may be freed.
        let s = unsafe { &mut *state.as_ptr() };
        s.exchange.set_gone();
        if let (Some(ticket), Some(r)) = (s.ticket.take(), &s.request) {
            ticket.finish(final_status(r, s.header_sent, rc));
        }
        s.request.take()
    };
    if let Some(r) = r {
        // SAFETY: the state's view is gone, and the caller uses no other after.
        unsafe { r.finalize(rc) };
    }
}

/// The status a request finalized with `rc` answered: the one its head
/// carried once sent, else the one nginx answers for `rc` (500 for an error).
fn final_status(r: &Request<'_>, header_sent: bool, rc: ngx_int_t) -> u16 {
    match u16::try_from(rc) {
        _ if header_sent => r.response_status(),
        Ok(status @ 100..=599) => status,
        _ => 500,
    }
}

/// The body is read, or its first part: snapshot the request and hand it to
/// a module thread.
unsafe extern "C" fn gateway_body_read(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the body handler with the live request.
    let r = unsafe { Request::from_raw(r) };
    match state_of(&r) {
        // SAFETY: the request's ctx is the state start() put in its pool.
        Some(state) => unsafe { resume(state, dispatch) },
        // SAFETY: this module ends the request, and r is not used after.
        None => unsafe { r.finalize(INTERNAL_SERVER_ERROR) },
    }
}

/// Hands the request to a module thread (or the event loop of an application
/// that runs without one); a body still arriving then goes on to it.
fn dispatch<'r>(r: Request<'r>, state: &mut LoopState<'r>) -> Next {
    let streamed = r.reading_body();
    let read = if streamed {
        gateway_body_ready
    } else {
        gateway_client_check
    };
    r.set_handlers(gateway_write_ready, read);
    let handoff = if streamed {
        Handoff::streamed(&r)
    } else {
        match Handoff::take(&r) {
            Ok(handoff) => handoff,
            Err(e) => {
                let msg = format!("cannot pass the request body on: {e}");
                log_request(&r, log::Level::Error, &msg);
                return Next::Finish(INTERNAL_SERVER_ERROR);
            }
        }
    };
    if let Next::Finish(rc) = state.run(&r, handoff) {
        return Next::Finish(rc);
    }
    if streamed {
        return state.pump(r);
    }
    Next::Wait
}

/// The loop was woken for `exchange`: send what its thread queued.
pub fn on_ready(exchange: &Arc<Exchange>) {
    let state = NonNull::new(
        exchange
            .loop_state
            .load(Ordering::Relaxed)
            .cast::<LoopState>(),
    );
    // SAFETY: a non-NULL loop_state is the state in a live request's pool: its drop
    // clears it. Loop thread.
    let r = state.and_then(|s| unsafe { s.as_ref() }.request);
    let (Some(state), Some(r)) = (state, r) else {
        discard(exchange);
        return;
    };
    let c = r.connection();
    // SAFETY: as above.
    unsafe { resume(state, |r, s| s.on_ready(r)) };
    c.run_posted_requests();
}

/// The client sent more of the body (nginx's read event while it arrives), or
/// its client_body_timeout passed.
unsafe extern "C" fn gateway_body_ready(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the read handler with the live request.
    let r = unsafe { Request::from_raw(r) };
    if let Some(state) = state_of(&r) {
        // SAFETY: the request's ctx is the state start() put in its pool.
        unsafe { resume(state, |r, s| s.body_ready(r)) };
    }
}

/// Keeps sending when the client can take more (nginx's write event).
unsafe extern "C" fn gateway_write_ready(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the write handler with the live request.
    let r = unsafe { Request::from_raw(r) };
    if let Some(state) = state_of(&r) {
        // SAFETY: the request's ctx is the state start() put in its pool.
        unsafe { resume(state, |r, s| s.write_ready(r)) };
    }
}

/// Notices a client that closes its connection while the application runs without
/// writing (a long poll, a slow computation): the request ends at once, and the
/// application's next write fails, so that it stops and `close()` runs.
unsafe extern "C" fn gateway_client_check(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls the read handler with the live request.
    let r = unsafe { Request::from_raw(r) };
    if let Some(state) = state_of(&r) {
        // SAFETY: the request's ctx is the state start() put in its pool.
        unsafe { resume(state, |r, _| check_client(r)) };
    }
}

fn check_client(r: Request<'_>) -> Next {
    let c = r.connection();
    // HTTP/2 marks a reset stream's connection; HTTP/1 needs a look at the socket.
    if !(c.error() || (!r.is_http2() && c.peer_closed())) {
        return Next::Wait;
    }
    c.set_error();
    log_request(
        &r,
        log::Level::Info,
        "the client closed the connection while the application was running",
    );
    Next::Finish(records::status(NGX_HTTP_CLIENT_CLOSED_REQUEST))
}

/// Arms the write event (and the send timeout) to resume when the client reads.
fn wait_for_client(r: &Request<'_>) -> Next {
    if r.await_writable() {
        Next::Wait
    } else {
        Next::Finish(records::ERROR)
    }
}

impl<'r> LoopState<'r> {
    /// Starts the application: on the interpreter's event loop when it runs
    /// without a thread, else as a job for the module's threads.
    fn run(&self, r: &Request<'r>, handoff: Handoff) -> Next {
        let Ok(rt) = runtime::runtime() else {
            return Next::Finish(INTERNAL_SERVER_ERROR);
        };
        if self.daemon.is_none() && dispatch::runs_without_thread(&self.mount.app) {
            rt.count_running(r.loop_thread());
            handoff.start(&self.mount, rt.info(), self.exchange.clone());
            return Next::Wait;
        }
        let job = self.job(handoff);
        let group = self.daemon.as_ref().map(|ep| ep.group.as_str());
        match rt.submit(job, group, r.loop_thread()) {
            Ok(()) => Next::Wait,
            Err(why) => {
                let msg = format!("cannot run the application: {why}");
                log_request(r, log::Level::Error, &msg);
                Next::Finish(records::status(NGX_HTTP_SERVICE_UNAVAILABLE))
            }
        }
    }

    /// A wake-up from the request's thread: read on if its body read made
    /// room, and send what it queued.
    fn on_ready(&mut self, r: Request<'r>) -> Next {
        if self.exchange.body.take_resume() {
            if let Next::Finish(rc) = self.pump(r) {
                return Next::Finish(rc);
            }
        }
        self.drain(r)
    }

    /// nginx's read event while the body arrives: read on, unless the
    /// application has not taken what came (then only a broken connection
    /// matters; the rest waits in the socket, or HTTP/2's window, which holds
    /// the client back, and a timeout nginx armed meanwhile is not the client's).
    fn body_ready(&mut self, r: Request<'r>) -> Next {
        if !self.exchange.body.is_paused() {
            return self.pump(r);
        }
        let c = r.connection();
        if c.error() {
            return self.body_failed(r, records::status(NGX_HTTP_BAD_REQUEST));
        }
        c.cancel_read_timer();
        c.forgive_read_timeout();
        Next::Wait
    }

    /// Moves the body nginx read to the application's queue and reads on,
    /// until the client has sent nothing more for now, the body is complete,
    /// or the queue is full: then reading pauses (client_body_timeout too: the
    /// wait is the application's) until the application takes some.
    fn pump(&mut self, r: Request<'r>) -> Next {
        let next = self.read_rounds(r);
        // One wake-up of a waiting reader for all that came.
        self.exchange.body.arrived();
        next
    }

    /// [`LoopState::pump`]'s reads.
    fn read_rounds(&mut self, r: Request<'r>) -> Next {
        let body = &self.exchange.body;
        let mut asked = false;
        loop {
            let mut piece = Vec::new();
            if r.take_body(|data| piece.extend_from_slice(data)).is_err() {
                return self.body_failed(r, INTERNAL_SERVER_ERROR);
            }
            let moved = piece.len();
            body.push(piece);
            if !r.reading_body() {
                body.finish(Ok(()));
                r.set_read_handler(gateway_client_check);
                return self.after_body.take().map_or(Next::Wait, Next::Finish);
            }
            if body.pause_if_full() {
                r.connection().cancel_read_timer();
                return Next::Wait;
            }
            // Nothing more came since the last read: wait for the read event.
            if asked && moved == 0 {
                return Next::Wait;
            }
            let rc = r.read_more_body();
            if rc == records::ERROR || rc >= records::status(NGX_HTTP_SPECIAL_RESPONSE) {
                return self.body_failed(r, rc);
            }
            asked = true;
        }
    }

    /// The body broke with nginx's `rc`: the application's read fails, and
    /// the request ends (with that status when no response head went out).
    fn body_failed(&mut self, r: Request<'r>, rc: ngx_int_t) -> Next {
        let c = r.connection();
        let (broken, level, msg, rc) = if c.error() {
            let msg = "the client closed the connection while sending the request body";
            let rc = records::status(NGX_HTTP_CLIENT_CLOSED_REQUEST);
            (Broken::GONE, log::Level::Info, msg, rc)
        } else if rc == records::status(NGX_HTTP_REQUEST_TIME_OUT) {
            c.set_timed_out();
            let broken = Broken {
                kind: std::io::ErrorKind::TimedOut,
                why: "the client sent nothing of the request body for client_body_timeout",
            };
            (broken, log::Level::Info, broken.why, rc)
        } else if rc == records::status(NGX_HTTP_REQUEST_ENTITY_TOO_LARGE) {
            let broken = Broken {
                kind: std::io::ErrorKind::InvalidData,
                why: "the request body is larger than client_max_body_size",
            };
            let msg = if self.header_sent {
                "the request body is larger than client_max_body_size; the response is cut short"
            } else {
                TOO_LARGE
            };
            (broken, log::Level::Error, msg, rc)
        } else if rc == INTERNAL_SERVER_ERROR {
            let broken = Broken {
                kind: std::io::ErrorKind::Other,
                why: "the request body was spooled to a file",
            };
            (broken, log::Level::Error, broken.why, rc)
        } else {
            let broken = Broken {
                kind: std::io::ErrorKind::InvalidData,
                why: "the client sent an invalid request body",
            };
            (broken, log::Level::Info, broken.why, rc)
        };
        log_request(&r, level, msg);
        self.exchange.body.finish(Err(broken));
        Next::Finish(
            if self.header_sent && rc != records::status(NGX_HTTP_CLIENT_CLOSED_REQUEST) {
                records::ERROR
            } else {
                rc
            },
        )
    }

    /// The job that runs the request on a module thread: embedded, or forwarded
    /// to its daemon group.
    fn job(&self, handoff: Handoff) -> Job {
        let mount = self.mount.clone();
        let exchange = self.exchange.clone();
        match self.daemon.clone() {
            Some(endpoint) => {
                let queued = Instant::now();
                Job::new(self.exchange.clone(), move |_: &ServerInfo| {
                    let runner = Runner::Daemon(&endpoint);
                    handoff.run(&mount, runner, exchange, queued.elapsed())
                })
            }
            None => Job::new(self.exchange.clone(), move |info: &ServerInfo| {
                handoff.run(&mount, Runner::Embedded(info), exchange, Duration::ZERO)
            }),
        }
    }

    /// Sends queued pieces until the queue is empty, the client is slow, or the
    /// request ends.
    fn drain(&mut self, r: Request<'r>) -> Next {
        loop {
            if self.output.pending() > SEND_HIGH_WATER {
                return wait_for_client(&r);
            }
            let Some(piece) = self.exchange.pop() else {
                // Not all sent because the client is slow (not because nginx holds back a
                // small unflushed piece on a writable socket): the send timeout applies.
                if self.output.pending() > 0 && !r.connection().write_ready() {
                    return wait_for_client(&r);
                }
                return Next::Wait;
            };
            if let Some(next) = self.send(&r, piece) {
                return next;
            }
        }
    }

    /// Passes one piece to nginx: None to go on with the next.
    fn send(&mut self, r: &Request<'r>, piece: Piece) -> Option<Next> {
        let rc = match piece {
            Piece::Start {
                status,
                status_line,
                headers,
            } => {
                let rc = self.send_header(r, status, &status_line, &headers);
                fault_point("nginx-event");
                rc
            }
            Piece::Data { data, flush } => self.send_data(r, data, flush),
            Piece::File { fd, offset, len } => self.send_file(r, fd, offset, len),
            Piece::End(outcome) => {
                runtime::job_done();
                let rc = self.end(r, outcome);
                return Some(self.end_after_body(*r, outcome, rc));
            }
        };
        if rc == records::ERROR || rc > records::OK {
            if rc == records::ERROR {
                log_request(
                    r,
                    log::Level::Info,
                    "the client closed the connection before the response was complete",
                );
            }
            return Some(Next::Finish(rc));
        }
        None
    }

    /// The client can take more, or its send timeout passed.
    fn write_ready(&mut self, r: Request<'r>) -> Next {
        let c = r.connection();
        if c.write_timed_out() {
            c.set_timed_out();
            log_request(
                &r,
                log::Level::Info,
                "the client timed out reading the response",
            );
            return Next::Finish(records::status(NGX_HTTP_REQUEST_TIME_OUT));
        }
        if !self.header_sent {
            return Next::Wait;
        }
        c.cancel_write_timer();
        let rc = r.flush();
        if rc == records::ERROR {
            return Next::Finish(rc);
        }
        self.output.release(&r);
        self.drain(r)
    }

    fn send_header(
        &mut self,
        r: &Request<'r>,
        status: u16,
        status_line: &str,
        headers: &[Header],
    ) -> ngx_int_t {
        if set_head(r, status, status_line, headers).is_err() {
            return records::ERROR;
        }
        self.header_sent = true;
        let rc = r.send_header();
        self.header_only = r.header_only();
        if rc == records::AGAIN {
            records::OK
        } else {
            rc
        }
    }

    fn send_data(&mut self, r: &Request<'r>, data: Vec<u8>, flush: bool) -> ngx_int_t {
        if self.header_only || data.is_empty() && !flush {
            return records::OK;
        }
        self.output.send_memory(r, data, flush)
    }

    fn send_file(&mut self, r: &Request<'r>, fd: OwnedFd, offset: u64, len: u64) -> ngx_int_t {
        if self.header_only || len == 0 {
            return records::OK;
        }
        self.output.send_file(r, fd, offset, len)
    }

    /// Ends the request with `rc`, or, for a complete HTTP/1 response whose
    /// body the client still sends, once that body is read and dropped.
    fn end_after_body(&mut self, r: Request<'r>, outcome: Outcome, rc: ngx_int_t) -> Next {
        let sent = rc == records::OK || rc == records::AGAIN;
        if outcome != Outcome::Complete || !sent || !r.reading_body() || r.is_http2() {
            return Next::Finish(rc);
        }
        self.exchange.body.finish(Err(Broken::GONE));
        self.after_body = Some(rc);
        self.pump(r)
    }

    /// The rc to finalize the request with once the application is done.
    fn end(&self, r: &Request<'r>, outcome: Outcome) -> ngx_int_t {
        match outcome {
            Outcome::Complete if self.header_only => records::OK,
            Outcome::Complete => r.send_last(),
            Outcome::Status(status) if !self.header_sent => records::status(u32::from(status)),
            Outcome::Status(_) | Outcome::Aborted => records::ERROR,
            Outcome::ClientGone => records::status(NGX_HTTP_CLIENT_CLOSED_REQUEST),
        }
    }
}

/// Puts the application's response head in `r`'s.
fn set_head(
    r: &Request<'_>,
    status: u16,
    status_line: &str,
    headers: &[Header],
) -> Result<(), NoMemory> {
    r.set_status(status, status_line.as_bytes())?;
    // The head was checked on its way here (ResponseChannel::start).
    if let Ok(Some(len)) = framing::declared_length(headers) {
        r.set_content_length(Some(len));
    }
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-type") {
            // The *_types directives (gzip, charset, sub_filter, ssi) match
            // the media type alone, as for a proxied response.
            let (type_len, charset) = framing::content_type_parts(value);
            r.set_content_type(value, type_len, charset)?;
        } else if !name.eq_ignore_ascii_case("content-length") {
            r.add_header(name, value)?;
        }
    }
    // The status line is the application's, so nginx's header filter does not
    // recognise 204 and 304 itself: without header_only it would frame a body
    // (a chunked terminator) that the client reads as the next response.
    if framing::status_has_no_body(status) {
        r.set_header_only();
        if status == 204 {
            r.set_content_length(None);
        }
    }
    Ok(())
}
