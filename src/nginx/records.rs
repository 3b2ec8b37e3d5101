//! Safe views of the nginx records this module works with: a request
//! ([`Request`]) with its connection ([`Connection`]), pool ([`Pool`]) and the
//! response buffers handed to nginx ([`Output`]); the configuration pass
//! ([`Conf`], [`Location`]); the cycle ([`Cycle`]) and the loop's own events
//! ([`Watcher`], [`Timer`]).
//!
//! Each raw pointer from nginx enters through one `unsafe fn from_raw` whose
//! `# Safety` section says what its caller vouches for: that the record is live
//! for the view's lifetime, on the event loop's thread. The methods are safe, and
//! every read and write of nginx's memory is here. Like nginx, the views stay on
//! the loop's thread: they are neither `Send` nor `Sync`. The two that live in
//! statics ([`Watcher`], [`Timer`]) are, and their methods say "loop thread only".

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CString};
use std::io;
use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, Ordering};

use super::ffi::*;
use crate::common::panic::guard;

/// nginx's return codes, as its functions return them.
pub const OK: ngx_int_t = NGX_OK as ngx_int_t;
pub const ERROR: ngx_int_t = NGX_ERROR as ngx_int_t;
pub const AGAIN: ngx_int_t = NGX_AGAIN as ngx_int_t;
pub const DONE: ngx_int_t = NGX_DONE as ngx_int_t;
pub const DECLINED: ngx_int_t = NGX_DECLINED as ngx_int_t;

/// An HTTP status (`NGX_HTTP_*`) as a return code.
pub const fn status(code: u32) -> ngx_int_t {
    code as ngx_int_t
}

/// A pool allocation failed.
#[derive(Debug)]
pub struct NoMemory;

/// A part of a request body that nginx wrote to a file instead of memory.
#[derive(Debug)]
pub struct InFile;

/// Bytes of an `ngx_str_t`, empty when unset.
///
/// # Safety
/// As for [`str_bytes`]: `s.data` is NULL or valid for `s.len` bytes during `'a`.
unsafe fn bytes<'a>(s: &ngx_str_t) -> &'a [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { str_bytes(s) }
}

/// Logs `msg` (a NUL in it written as `\0`) to `log` at nginx's `level`.
///
/// # Safety
/// `log` must be NULL or a live log.
unsafe fn write_log(log: *mut ngx_log_t, level: u32, msg: &str) {
    if log.is_null() {
        return;
    }
    let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // SAFETY: log is live (caller); the message is NUL-terminated.
    unsafe { gateway_ngx_log(log, level as ngx_uint_t, msg.as_ptr()) };
}

/// A memory pool: of the configuration (the cycle's) or of a request.
#[derive(Clone, Copy)]
pub struct Pool<'p> {
    raw: NonNull<ngx_pool_t>,
    _life: PhantomData<&'p ngx_pool_t>,
}

impl<'p> Pool<'p> {
    /// # Safety
    /// `pool` must be NULL or live for `'p`.
    unsafe fn from_raw(pool: *mut ngx_pool_t) -> Option<Pool<'p>> {
        NonNull::new(pool).map(|raw| Pool {
            raw,
            _life: PhantomData,
        })
    }

    /// Moves `value` into memory the pool owns: it is dropped with the pool.
    pub fn own<T: 'p>(self, value: T) -> Result<NonNull<T>, NoMemory> {
        /// The pool's cleanup: an entry from nginx, so a panic in a `Drop` stops here.
        unsafe extern "C" fn drop_box<T>(data: *mut c_void) {
            guard("a pool cleanup", (), || {
                // SAFETY: data came from the Box leaked below; the pool runs this once.
                drop(unsafe { Box::from_raw(data.cast::<T>()) })
            })
        }
        // SAFETY: the pool is live for 'p.
        let cln = unsafe { ngx_pool_cleanup_add(self.raw.as_ptr(), 0) };
        if cln.is_null() {
            return Err(NoMemory);
        }
        let value = NonNull::from(Box::leak(Box::new(value)));
        // SAFETY: cln is a fresh cleanup record of the pool, which frees the box with it.
        unsafe {
            (*cln).handler = Some(drop_box::<T>);
            (*cln).data = value.as_ptr().cast();
        }
        Ok(value)
    }

    /// A copy of `s` in the pool.
    pub fn str(self, s: &[u8]) -> Result<ngx_str_t, NoMemory> {
        // SAFETY: the pool is live for 'p.
        let p = unsafe { ngx_pnalloc(self.raw.as_ptr(), s.len().max(1)) }.cast::<u8>();
        if p.is_null() {
            return Err(NoMemory);
        }
        // SAFETY: p is a fresh allocation of at least s.len() bytes.
        unsafe { ptr::copy_nonoverlapping(s.as_ptr(), p, s.len()) };
        Ok(ngx_str_t {
            len: s.len(),
            data: p,
        })
    }

    /// A NUL-terminated copy of `s` in the pool (a NUL in it written as `\0`).
    pub fn c_str(self, s: &str) -> Result<*mut c_char, NoMemory> {
        let s = CString::new(s.replace('\0', "\\0")).unwrap_or_default();
        Ok(self.str(s.as_bytes_with_nul())?.data.cast())
    }

    /// A file record whose descriptor, `fd`, the pool closes when it goes.
    fn file(self, fd: OwnedFd, log: *mut ngx_log_t) -> Result<NonNull<ngx_file_t>, NoMemory> {
        let raw = self.raw.as_ptr();
        // SAFETY: the pool is live for 'p.
        let file = unsafe { ngx_pcalloc(raw, std::mem::size_of::<ngx_file_t>()) };
        // SAFETY: as above.
        let cln =
            unsafe { ngx_pool_cleanup_add(raw, std::mem::size_of::<ngx_pool_cleanup_file_t>()) };
        let name = self.str(b"wsgi.file_wrapper")?;
        let (Some(file), false) = (NonNull::new(file.cast::<ngx_file_t>()), cln.is_null()) else {
            return Err(NoMemory);
        };
        // From here the pool closes the descriptor.
        let fd = fd.into_raw_fd();
        // SAFETY: cln is a fresh cleanup record with room for an ngx_pool_cleanup_file_t, and
        // file a zeroed ngx_file_t, both in the pool.
        unsafe {
            (*cln).handler = Some(ngx_pool_cleanup_file);
            let clnf = (*cln).data.cast::<ngx_pool_cleanup_file_t>();
            (*clnf).fd = fd;
            (*clnf).name = name.data;
            (*clnf).log = log;
            let f = file.as_ptr();
            (*f).fd = fd;
            (*f).name = name;
            (*f).log = log;
        }
        Ok(file)
    }
}

/// The configuration pass: nginx's `ngx_conf_t` while it calls this module.
#[derive(Clone, Copy)]
pub struct Conf<'c> {
    raw: NonNull<ngx_conf_t>,
    _life: PhantomData<&'c ngx_conf_t>,
}

impl<'c> Conf<'c> {
    /// # Safety
    /// `cf` must be nginx's live configuration context, as it passes it to a
    /// directive handler or a configuration hook, used during that call (`'c`).
    pub unsafe fn from_raw(cf: *mut ngx_conf_t) -> Conf<'c> {
        Conf {
            // SAFETY: nginx's context is never NULL (caller).
            raw: unsafe { NonNull::new_unchecked(cf) },
            _life: PhantomData,
        }
    }

    fn get(&self) -> &'c ngx_conf_t {
        // SAFETY: live for 'c (from_raw), and nginx changes it only between our calls.
        unsafe { self.raw.as_ref() }
    }

    /// The configuration's pool: values in it live as long as the configuration.
    pub fn pool(&self) -> Pool<'c> {
        // SAFETY: the configuration's pool outlives the pass.
        unsafe { Pool::from_raw(self.get().pool) }.expect("the configuration has a pool")
    }

    /// The directive being parsed, its name first.
    pub fn args(&self) -> impl Iterator<Item = &'c [u8]> {
        let args = self.get().args;
        let all: &'c [ngx_str_t] = if args.is_null() {
            &[]
        } else {
            // SAFETY: cf->args is the array of ngx_str_t nginx parsed for the directive,
            // alive for the handler's call.
            unsafe { std::slice::from_raw_parts((*args).elts.cast::<ngx_str_t>(), (*args).nelts) }
        };
        // SAFETY: each string of the array points into the configuration buffer.
        all.iter().map(|s| unsafe { bytes(s) })
    }

    /// `FILE:LINE` of the directive being parsed.
    pub fn position(&self) -> String {
        let file = self.get().conf_file;
        if file.is_null() {
            return String::new();
        }
        // SAFETY: cf->conf_file is the file being parsed; its name lives in the cycle's pool.
        let (name, line) = unsafe { (bytes(&(*file).file.name), (*file).line) };
        format!("{}:{line}", String::from_utf8_lossy(name))
    }

    /// nginx's prefix (`-p`), against which relative paths of directives resolve.
    pub fn prefix(&self) -> &'c [u8] {
        // SAFETY: cf->cycle is the cycle being configured, its prefix set for the whole pass.
        unsafe { bytes(&(*self.get().cycle).prefix) }
    }

    /// Logs `msg` at nginx's `level` (`NGX_LOG_*`), with the file and line being parsed.
    pub fn log(&self, level: u32, msg: &str) {
        // SAFETY: cf->log is the configuration's live log.
        unsafe { write_log(self.get().log, level, msg) };
    }

    /// What a directive handler returns for `msg`: nginx prints it after the
    /// directive's name, then the file and line.
    pub fn message(&self, msg: &str) -> *mut c_char {
        self.pool().c_str(msg).unwrap_or(NGX_CONF_ERROR)
    }
}

/// A location's record of nginx's core module, as the configuration pass has it.
pub struct Location<'c> {
    raw: NonNull<ngx_http_core_loc_conf_t>,
    _life: PhantomData<&'c ngx_http_core_loc_conf_t>,
}

impl<'c> Location<'c> {
    /// # Safety
    /// `clcf` must be the live core record of the location being configured, for `'c`.
    pub unsafe fn from_raw(clcf: *mut ngx_http_core_loc_conf_t) -> Location<'c> {
        Location {
            // SAFETY: a location's core record is never NULL (caller).
            raw: unsafe { NonNull::new_unchecked(clcf) },
            _life: PhantomData,
        }
    }

    fn get(&self) -> &'c ngx_http_core_loc_conf_t {
        // SAFETY: live for 'c (from_raw).
        unsafe { self.raw.as_ref() }
    }

    /// The location's name: its prefix, regex or `@name`.
    pub fn name(&self) -> &'c [u8] {
        // SAFETY: the name lives in the configuration pool.
        unsafe { bytes(&self.get().name) }
    }

    /// Whether the name is a literal path (a prefix or exact location, neither a
    /// regex nor a named one).
    pub fn is_literal(&self) -> bool {
        self.get().regex.is_null() && self.get().named() == 0
    }
}

/// A cycle: the configuration nginx runs, with its logs, sockets and connections.
#[derive(Clone, Copy)]
pub struct Cycle<'c> {
    raw: NonNull<ngx_cycle_t>,
    _life: PhantomData<&'c ngx_cycle_t>,
}

impl<'c> Cycle<'c> {
    /// # Safety
    /// `cycle` must be a live cycle nginx passed to this module, for `'c`, and
    /// the view used on the thread nginx passed it on (its loop thread).
    pub unsafe fn from_raw(cycle: *mut ngx_cycle_t) -> Cycle<'c> {
        Cycle {
            // SAFETY: nginx never passes a NULL cycle (caller).
            raw: unsafe { NonNull::new_unchecked(cycle) },
            _life: PhantomData,
        }
    }

    /// Runs `f` with this process's current cycle; None before nginx made one.
    pub fn with_current<T>(_: LoopThread, f: impl FnOnce(Cycle<'_>) -> T) -> Option<T> {
        // SAFETY: nginx sets ngx_cycle before it loads modules and keeps a cycle alive
        // while it is the current one; the view does not outlive f.
        let cycle = unsafe { ngx_cycle };
        NonNull::new(cycle).map(|raw| {
            f(Cycle {
                raw,
                _life: PhantomData,
            })
        })
    }

    /// The loop thread this view is used on (see [`Cycle::from_raw`]).
    pub fn loop_thread(&self) -> LoopThread {
        LoopThread(PhantomData)
    }

    fn get(&self) -> &'c ngx_cycle_t {
        // SAFETY: live for 'c (from_raw, with_current).
        unsafe { self.raw.as_ref() }
    }

    /// Logs `msg` at nginx's `level` (`NGX_LOG_*`) to the cycle's error log. From
    /// any thread: the log has no request context to read, and writes with a stack
    /// buffer.
    pub fn log(&self, level: u32, msg: &str) {
        // SAFETY: the cycle's log is set before modules run, and writes with a stack buffer.
        unsafe { write_log(self.get().log, level, msg) };
    }

    /// The level of the cycle's error log.
    pub fn log_level(&self) -> Option<usize> {
        // SAFETY: the cycle's log is NULL or live.
        unsafe { self.get().log.as_ref() }.map(|l| l.log_level)
    }

    /// The descriptor of the cycle's error log, once it is open.
    pub fn log_fd(&self) -> Option<RawFd> {
        // SAFETY: the cycle's log and its open file are NULL or live.
        let file = unsafe { self.get().log.as_ref() }.and_then(|l| unsafe { l.file.as_ref() });
        file.map(|f| f.fd).filter(|&fd| fd >= 0)
    }

    /// The environment nginx gives its workers: `TZ` and what its `env`
    /// directives keep. None if nginx is out of memory.
    pub fn worker_environment(&self) -> Option<Environment> {
        let mut last: ngx_uint_t = 0;
        // SAFETY: the cycle is live; with `last` given nginx only builds a new array
        // (which Environment frees) and leaves `environ` alone.
        let env = unsafe { ngx_set_environment(self.raw.as_ptr(), &mut last) };
        NonNull::new(env).map(Environment)
    }

    /// The listening sockets: the first, and how many.
    fn listening(&self) -> (*mut ngx_listening_t, usize) {
        let array = &self.get().listening;
        let first = array.elts.cast::<ngx_listening_t>();
        (first, if first.is_null() { 0 } else { array.nelts })
    }

    /// The descriptors of the listening sockets and of the connections in use.
    /// Allocates nothing (a fork handler uses it) and holds no reference into the
    /// arrays.
    pub fn socket_fds(&self) -> impl Iterator<Item = RawFd> + 'c {
        let (listening, n) = self.listening();
        let c = self.get();
        let (slots, m) = (
            c.connections,
            if c.connections.is_null() {
                0
            } else {
                c.connection_n
            },
        );
        // SAFETY: i indexes the cycle's listening array, which holds n elements.
        let listening = (0..n).map(move |i| unsafe { (*listening.add(i)).fd });
        // SAFETY: i indexes the cycle's connections array, which holds m slots.
        let connections = (0..m).map(move |i| unsafe { (*slots.add(i)).fd });
        listening.chain(connections).filter(|&fd| fd != -1)
    }

    /// Makes `wrapper` the handler of every listening socket, and returns each
    /// one's (as [`Connection::listener`] names it) handler it replaced.
    /// Loop thread, before it accepts connections.
    pub fn wrap_listeners(
        &self,
        wrapper: ngx_connection_handler_pt,
    ) -> Vec<(usize, ngx_connection_handler_pt)> {
        let (first, n) = self.listening();
        (0..n)
            .map(|i| {
                // SAFETY: i indexes the cycle's listening array; nothing holds a
                // reference into it (see socket_fds).
                unsafe {
                    let ls = first.add(i);
                    let replaced = (*ls).handler;
                    (*ls).handler = wrapper;
                    (ls as usize, replaced)
                }
            })
            .collect()
    }

    /// Watches `fd` for reading, level-triggered, as a connection of its own whose
    /// read handler is `handler`; None (and `fd` closed) if nginx has no connection
    /// or event left.
    pub fn watch(
        &self,
        fd: OwnedFd,
        handler: unsafe extern "C" fn(*mut ngx_event_t),
    ) -> Option<Watcher> {
        let fd = fd.into_raw_fd();
        // SAFETY: the cycle is live; the connection owns fd from here when it is made.
        let c = unsafe { gateway_ngx_watch_fd(self.raw.as_ptr(), fd, Some(handler)) };
        if c.is_null() {
            // SAFETY: fd is ours again: nginx did not take it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            return None;
        }
        Some(Watcher(AtomicPtr::new(c)))
    }
}

/// An environment array nginx allocated (NULL-terminated `NAME=value` strings),
/// freed on drop.
pub struct Environment(NonNull<*mut c_char>);

impl Environment {
    /// The array, for `environ`; valid while `self` lives.
    pub fn as_ptr(&self) -> *mut *mut c_char {
        self.0.as_ptr()
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        // SAFETY: nginx allocated the array with malloc and left it to us.
        unsafe { libc::free(self.0.as_ptr().cast()) };
    }
}

/// Proof that the caller runs on nginx's event-loop thread (or the one thread of
/// a process nginx or an application forks), which alone may touch nginx's
/// state: what needs that takes one. Not Send: it stays on the thread it was made on.
#[derive(Clone, Copy)]
pub struct LoopThread(PhantomData<*const ()>);

impl LoopThread {
    /// # Safety
    /// The caller runs on nginx's loop thread: in an entry nginx called (a hook,
    /// a handler, an event, a fork handler in the child).
    pub unsafe fn assume() -> LoopThread {
        LoopThread(PhantomData)
    }
}

/// Writes `msg` to the current cycle's error log, from any thread: the cycle's
/// log has no request context to read, and nginx's log write is one write(2).
pub fn log_current(level: u32, msg: &str) {
    // SAFETY: nginx sets ngx_cycle before it loads modules and keeps the current
    // cycle (and its log) alive for the process's life; only its log is used.
    let cycle = unsafe { ngx_cycle };
    if let Some(raw) = NonNull::new(cycle) {
        let cycle = Cycle {
            raw,
            _life: PhantomData,
        };
        cycle.log(level, msg);
    }
}

/// A descriptor the event loop watches ([`Cycle::watch`]) until [`Watcher::close`].
pub struct Watcher(AtomicPtr<ngx_connection_t>);

impl Watcher {
    /// Stops watching and closes the descriptor; later calls do nothing.
    pub fn close(&self, _: LoopThread) {
        let c = self.0.swap(ptr::null_mut(), Ordering::Relaxed);
        if !c.is_null() {
            // SAFETY: c is the live connection Cycle::watch made; closing removes its event.
            unsafe { ngx_close_connection(c) };
        }
    }
}

/// A timer of the event loop, in a static (nginx keeps its address while armed).
pub struct Timer(UnsafeCell<ngx_event_t>);

// SAFETY: only nginx's loop thread touches the event: its handler runs there, and
// arming it takes a LoopThread.
unsafe impl Sync for Timer {}

impl Timer {
    pub const fn new() -> Timer {
        // SAFETY: ngx_event_t is plain C data whose all-zero state is nginx's initial one.
        Timer(UnsafeCell::new(unsafe { std::mem::zeroed() }))
    }

    /// Arms the timer to run `handler` in `ms` milliseconds, unless it is armed.
    pub fn arm(
        &'static self,
        _: LoopThread,
        handler: unsafe extern "C" fn(*mut ngx_event_t),
        ms: ngx_msec_t,
    ) {
        let ev = self.0.get();
        // SAFETY: only the loop thread touches the event (see Sync above); the current
        // cycle's log is set for the process's life.
        unsafe {
            if (*ev).timer_set() != 0 {
                return;
            }
            (*ev).handler = Some(handler);
            (*ev).log = (*ngx_cycle).log;
            (*ev).set_cancelable(0);
            gateway_ngx_add_timer(ev, ms);
        }
    }
}

/// Which kind of nginx process this is (`NGX_PROCESS_*`).
pub fn process_kind(_: LoopThread) -> u32 {
    // SAFETY: nginx sets ngx_process before it runs modules' process hooks; loop thread.
    (unsafe { ngx_process }) as u32
}

/// Whether this worker was told to quit gracefully (`nginx -s quit`, a reload).
pub fn exiting(_: LoopThread) -> bool {
    // SAFETY: written by the loop thread only (nginx copies signal flags there).
    unsafe { ngx_exiting != 0 }
}

/// Whether this worker was told to stop at once (`nginx -s stop`).
pub fn terminating(_: LoopThread) -> bool {
    // SAFETY: a flag nginx's signal handler sets; a plain read on the loop thread.
    unsafe { ngx_terminate != 0 }
}

/// An HTTP request of nginx, as its handlers get it.
#[derive(Clone, Copy)]
pub struct Request<'r> {
    raw: NonNull<ngx_http_request_t>,
    _life: PhantomData<&'r ngx_http_request_t>,
}

impl<'r> Request<'r> {
    /// # Safety
    /// `r` must be a live request nginx passed to this module (a handler's argument)
    /// and the view (and its copies) used on the loop thread while nginx keeps it:
    /// until [`Request::finalize`] or nginx's own end of it, which runs the pool's
    /// cleanups before freeing it.
    pub unsafe fn from_raw(r: *mut ngx_http_request_t) -> Request<'r> {
        Request {
            // SAFETY: nginx never passes a NULL request (caller).
            raw: unsafe { NonNull::new_unchecked(r) },
            _life: PhantomData,
        }
    }

    /// The loop thread this view is used on (see [`Request::from_raw`]).
    pub fn loop_thread(&self) -> LoopThread {
        LoopThread(PhantomData)
    }

    fn get(&self) -> &ngx_http_request_t {
        // SAFETY: live (from_raw); callers read through it and let it go before nginx runs.
        unsafe { self.raw.as_ref() }
    }

    /// Changes the request in `f`, which must not call nginx.
    fn change<T>(&self, f: impl FnOnce(&mut ngx_http_request_t) -> T) -> T {
        // SAFETY: live (from_raw), on the loop thread; no other reference to it is held
        // while f runs, and f does not call nginx.
        f(unsafe { &mut *self.raw.as_ptr() })
    }

    fn text(&self, s: impl FnOnce(&ngx_http_request_t) -> &ngx_str_t) -> &[u8] {
        // SAFETY: the request's strings live in its pool or its connection's buffers.
        unsafe { bytes(s(self.get())) }
    }

    pub fn method(&self) -> &[u8] {
        self.text(|r| &r.method_name)
    }

    /// The path, decoded and normalised.
    pub fn uri(&self) -> &[u8] {
        self.text(|r| &r.uri)
    }

    /// The query string.
    pub fn args(&self) -> &[u8] {
        self.text(|r| &r.args)
    }

    /// The request target as the client sent it.
    pub fn unparsed_uri(&self) -> &[u8] {
        self.text(|r| &r.unparsed_uri)
    }

    pub fn protocol(&self) -> &[u8] {
        self.text(|r| &r.http_protocol)
    }

    /// The host the client named (the Host header, or the request line's).
    pub fn host(&self) -> &[u8] {
        self.text(|r| &r.headers_in.server)
    }

    /// The user of Basic authentication, once nginx has parsed it.
    pub fn user(&self) -> &[u8] {
        self.text(|r| &r.headers_in.user)
    }

    /// The server's `server_name` (its first).
    pub fn server_name(&self) -> &[u8] {
        // SAFETY: the request is live; its server's core record lives in the configuration.
        unsafe { bytes(&(*gateway_ngx_core_srv_conf(self.raw.as_ptr())).server_name) }
    }

    /// The request headers, in order.
    pub fn headers(&self) -> Headers<'_> {
        Headers {
            part: &self.get().headers_in.headers.part,
            index: 0,
            _life: PhantomData,
        }
    }

    /// Whether the request came over HTTP/2.
    pub fn is_http2(&self) -> bool {
        !self.get().stream.is_null()
    }

    pub fn connection(&self) -> Connection<'r> {
        // SAFETY: a live request has its live connection, which outlives it.
        unsafe { Connection::from_raw(self.get().connection) }
    }

    pub fn pool(&self) -> Pool<'r> {
        // SAFETY: a live request has its pool, which lives as long as it does.
        unsafe { Pool::from_raw(self.get().pool) }.expect("a request has a pool")
    }

    /// This module's context of the request (NULL until set).
    pub fn ctx(&self) -> *mut c_void {
        // SAFETY: the request is live.
        unsafe { gateway_ngx_get_ctx(self.raw.as_ptr()) }
    }

    pub fn set_ctx(&self, ctx: *mut c_void) {
        // SAFETY: the request is live; its ctx array has this module's slot.
        unsafe { gateway_ngx_set_ctx(self.raw.as_ptr(), ctx) };
    }

    /// Makes `write` and `read` the request's event handlers.
    pub fn set_handlers(
        &self,
        write: unsafe extern "C" fn(*mut ngx_http_request_t),
        read: unsafe extern "C" fn(*mut ngx_http_request_t),
    ) {
        self.change(|r| {
            r.write_event_handler = Some(write);
            r.read_event_handler = Some(read);
        });
    }

    /// Makes `read` the request's read event handler.
    pub fn set_read_handler(&self, read: unsafe extern "C" fn(*mut ngx_http_request_t)) {
        self.change(|r| r.read_event_handler = Some(read));
    }

    /// Starts reading the request body without buffering it (never to a file),
    /// then calls `then` (maybe before this returns): with the whole body when
    /// it came with the head, else with what came so far and
    /// [`Request::reading_body`] set, the rest for [`Request::read_more_body`].
    pub fn read_body(&self, then: unsafe extern "C" fn(*mut ngx_http_request_t)) -> ngx_int_t {
        self.change(|r| r.set_request_body_no_buffering(1));
        // SAFETY: the request is live, in its content phase.
        unsafe { ngx_http_read_client_request_body(self.raw.as_ptr(), Some(then)) }
    }

    /// Whether the body is still arriving (after [`Request::read_body`]).
    pub fn reading_body(&self) -> bool {
        self.get().reading_body() != 0
    }

    /// Reads what the client sent of the body since, into the body's chain:
    /// `AGAIN` while more is to come (the read event and client_body_timeout
    /// armed), `OK` at its end, or an HTTP status for a body that failed
    /// (408, 413, 400; the connection's error flag says the client left).
    pub fn read_more_body(&self) -> ngx_int_t {
        // SAFETY: the request is live and reading its body unbuffered.
        unsafe { ngx_http_read_unbuffered_request_body(self.raw.as_ptr()) }
    }

    /// Passes the bytes of the body's chain to `sink` and empties the chain,
    /// marking its buffers consumed so that nginx reads into them again.
    /// Fails for a part nginx put in a file (which it never does for a body
    /// read unbuffered).
    pub fn take_body(&self, mut sink: impl FnMut(&[u8])) -> Result<(), InFile> {
        let rb = self.get().request_body;
        if rb.is_null() {
            return Ok(());
        }
        // SAFETY: the body record lives in the request's pool; its chain's links and
        // buffers too, the memory they point to in the body's buffer or the header's.
        unsafe {
            let chain = std::mem::replace(&mut (*rb).bufs, ptr::null_mut());
            let mut link = chain;
            let mut in_file = false;
            while let Some(l) = link.as_ref() {
                let b = &mut *l.buf;
                if b.in_file() != 0 && b.file_last > b.file_pos {
                    in_file = true;
                } else if !b.pos.is_null() && b.last > b.pos {
                    let len = b.last.offset_from(b.pos) as usize;
                    sink(std::slice::from_raw_parts(b.pos, len));
                    b.pos = b.last;
                }
                link = l.next;
            }
            gateway_ngx_free_chain(self.get().pool, chain);
            if in_file {
                return Err(InFile);
            }
            Ok(())
        }
    }

    /// The body nginx read, in order: memory and ranges of its temporary file.
    pub fn body(&self) -> BodyParts<'_> {
        let rb = self.get().request_body;
        BodyParts {
            // SAFETY: the body record is NULL or lives in the request's pool.
            link: unsafe { rb.as_ref() }.map_or(ptr::null(), |rb| rb.bufs),
            _life: PhantomData,
        }
    }

    /// Sets the response status and its status line (copied to the pool).
    pub fn set_status(&self, status: u16, line: &[u8]) -> Result<(), NoMemory> {
        let line = self.pool().str(line)?;
        self.change(|r| {
            r.headers_out.status = status as ngx_uint_t;
            r.headers_out.status_line = line;
        });
        Ok(())
    }

    /// Sets the Content-Length of the response; None: not known.
    pub fn set_content_length(&self, len: Option<u64>) {
        let len = len.map_or(-1, |n| n as off_t);
        self.change(|r| r.headers_out.content_length_n = len);
    }

    /// Sets the Content-Type (copied to the pool): its media type is the first
    /// `type_len` bytes of `value`, its charset parameter's value `charset`.
    pub fn set_content_type(
        &self,
        value: &[u8],
        type_len: usize,
        charset: Option<Range<usize>>,
    ) -> Result<(), NoMemory> {
        let v = self.pool().str(value)?;
        let charset = charset.filter(|c| c.end <= value.len()).map(|c| ngx_str_t {
            len: c.len(),
            // SAFETY: the range lies within the copy (checked above).
            data: unsafe { v.data.add(c.start) },
        });
        self.change(|r| {
            let out = &mut r.headers_out;
            out.content_type = v;
            out.content_type_len = type_len;
            out.content_type_lowcase = ptr::null_mut();
            if let Some(charset) = charset {
                out.charset = charset;
            }
        });
        Ok(())
    }

    /// Adds a response header (copied to the pool). nginx adds its own Date and
    /// Server unless it knows that the response has them.
    pub fn add_header(&self, name: &str, value: &[u8]) -> Result<(), NoMemory> {
        // SAFETY: the request is live; the list lives in its pool.
        let h = unsafe { ngx_list_push(&mut (*self.raw.as_ptr()).headers_out.headers) };
        let (key, value) = (self.pool().str(name.as_bytes())?, self.pool().str(value)?);
        let Some(h) = NonNull::new(h.cast::<ngx_table_elt_t>()) else {
            return Err(NoMemory);
        };
        // nginx 1.23+ links same-named headers through a `next` field that
        // 1.22 lacks: the rest of the element is zero in both.
        #[allow(clippy::needless_update)]
        let elt = ngx_table_elt_t {
            hash: 1,
            key,
            value,
            lowcase_key: ptr::null_mut(),
            ..Default::default()
        };
        // SAFETY: h is the list's fresh element, in the pool.
        unsafe { h.as_ptr().write(elt) };
        self.change(|r| {
            if name.eq_ignore_ascii_case("date") {
                r.headers_out.date = h.as_ptr();
            } else if name.eq_ignore_ascii_case("server") {
                r.headers_out.server = h.as_ptr();
            }
        });
        Ok(())
    }

    /// The response has a head only (no body is sent).
    pub fn set_header_only(&self) {
        self.change(|r| r.set_header_only(1));
    }

    pub fn header_only(&self) -> bool {
        self.get().header_only() != 0
    }

    /// The response's status as set so far.
    pub fn response_status(&self) -> u16 {
        u16::try_from(self.get().headers_out.status).unwrap_or(500)
    }

    /// Sends a whole response, `body` copied to the pool; what the content
    /// handler returns.
    pub fn send_whole(&self, status: u16, content_type: &[u8], body: &[u8]) -> ngx_int_t {
        // SAFETY: the request is live; the shim copies both buffers before it returns.
        unsafe {
            gateway_ngx_send_whole(
                self.raw.as_ptr(),
                status as ngx_uint_t,
                content_type.as_ptr(),
                content_type.len(),
                body.as_ptr(),
                body.len(),
            )
        }
    }

    /// Sends the response head through nginx's header filters.
    pub fn send_header(&self) -> ngx_int_t {
        // SAFETY: the request is live and its headers_out set.
        unsafe { ngx_http_send_header(self.raw.as_ptr()) }
    }

    /// Ends the response body (the last buffer through the body filters).
    pub fn send_last(&self) -> ngx_int_t {
        // SAFETY: the request is live.
        unsafe { ngx_http_send_special(self.raw.as_ptr(), NGX_HTTP_LAST as ngx_uint_t) }
    }

    /// Sends what nginx's filters still hold.
    pub fn flush(&self) -> ngx_int_t {
        // SAFETY: the request is live; no new buffers.
        unsafe { ngx_http_output_filter(self.raw.as_ptr(), ptr::null_mut()) }
    }

    /// Arms the write event to resume when the client can take more, with the
    /// location's send_timeout unless armed or delayed; false if nginx cannot.
    pub fn await_writable(&self) -> bool {
        let r = self.raw.as_ptr();
        // SAFETY: the request, its connection and its location's core record are live.
        unsafe {
            let wev = (*(*r).connection).write;
            let clcf = gateway_ngx_core_loc_conf(r);
            if (*wev).delayed() == 0 && (*wev).timer_set() == 0 {
                gateway_ngx_add_timer(wev, (*clcf).send_timeout);
            }
            ngx_handle_write_event(wev, (*clcf).send_lowat) == OK
        }
    }

    /// Ends this module's part in the request with `rc`; nginx may free it now.
    ///
    /// # Safety
    /// Neither this view nor a copy of it may be used afterwards.
    pub unsafe fn finalize(self, rc: ngx_int_t) {
        // SAFETY: the request is live until this call (caller).
        unsafe { ngx_http_finalize_request(self.raw.as_ptr(), rc) };
    }
}

/// The request headers ([`Request::headers`]): names and values.
pub struct Headers<'a> {
    part: *const ngx_list_part_t,
    index: usize,
    _life: PhantomData<&'a ngx_list_part_t>,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        // SAFETY: the parts of the request's header list, and the strings of their
        // elements, live in the request's pool for 'a.
        unsafe {
            while let Some(part) = self.part.as_ref() {
                if self.index < part.nelts {
                    let h = &*part.elts.cast::<ngx_table_elt_t>().add(self.index);
                    self.index += 1;
                    return Some((bytes(&h.key), bytes(&h.value)));
                }
                self.part = part.next;
                self.index = 0;
            }
        }
        None
    }
}

/// A part of the request body as nginx stored it.
pub enum BodyPart<'a> {
    Memory(&'a [u8]),
    /// Bytes `pos..end` of the temporary file nginx spooled the body to.
    File {
        fd: BorrowedFd<'a>,
        pos: u64,
        end: u64,
    },
}

/// The parts of the request body ([`Request::body`]), empty ones left out.
pub struct BodyParts<'a> {
    link: *const ngx_chain_t,
    _life: PhantomData<&'a ngx_chain_t>,
}

impl<'a> Iterator for BodyParts<'a> {
    type Item = BodyPart<'a>;

    fn next(&mut self) -> Option<BodyPart<'a>> {
        // SAFETY: the body's chain, its buffers and their memory or file live in the
        // request's pool for 'a, the file's descriptor open as long.
        unsafe {
            while let Some(link) = self.link.as_ref() {
                self.link = link.next;
                let b = &*link.buf;
                if b.in_file() != 0 && !b.file.is_null() {
                    if b.file_last > b.file_pos {
                        return Some(BodyPart::File {
                            fd: BorrowedFd::borrow_raw((*b.file).fd),
                            pos: b.file_pos as u64,
                            end: b.file_last as u64,
                        });
                    }
                } else if !b.pos.is_null() && b.last > b.pos {
                    let len = b.last.offset_from(b.pos) as usize;
                    return Some(BodyPart::Memory(std::slice::from_raw_parts(b.pos, len)));
                }
            }
        }
        None
    }
}

/// A client connection (or one of this module's own, see [`Cycle::watch`]).
#[derive(Clone, Copy)]
pub struct Connection<'c> {
    raw: NonNull<ngx_connection_t>,
    _life: PhantomData<&'c ngx_connection_t>,
}

impl<'c> Connection<'c> {
    /// # Safety
    /// `c` must be a connection slot of the live cycle, used on the loop thread
    /// (nginx never frees a slot, it reuses it).
    pub unsafe fn from_raw(c: *mut ngx_connection_t) -> Connection<'c> {
        Connection {
            // SAFETY: never NULL (caller).
            raw: unsafe { NonNull::new_unchecked(c) },
            _life: PhantomData,
        }
    }

    fn get(&self) -> &ngx_connection_t {
        // SAFETY: a slot of the live cycle (from_raw); read and let go before nginx runs.
        unsafe { self.raw.as_ref() }
    }

    fn change<T>(&self, f: impl FnOnce(&mut ngx_connection_t) -> T) -> T {
        // SAFETY: as for get(); no other reference to the slot is held while f runs.
        f(unsafe { &mut *self.raw.as_ptr() })
    }

    pub fn fd(&self) -> RawFd {
        self.get().fd
    }

    /// Which listening socket accepted it (an identity, see [`Cycle::wrap_listeners`]).
    pub fn listener(&self) -> usize {
        self.get().listening as usize
    }

    /// Whether the connection failed (for HTTP/2 also: the stream was reset).
    pub fn error(&self) -> bool {
        self.get().error() != 0
    }

    pub fn set_error(&self) {
        self.change(|c| c.set_error(1));
    }

    /// Whether its write event timed out (the send timeout).
    pub fn write_timed_out(&self) -> bool {
        // SAFETY: a connection in use has its write event.
        unsafe { (*self.get().write).timedout() != 0 }
    }

    /// Marks the connection as timed out (nginx then closes without lingering).
    pub fn set_timed_out(&self) {
        self.change(|c| c.set_timedout(1));
    }

    /// Whether the socket takes more bytes now.
    pub fn write_ready(&self) -> bool {
        // SAFETY: a connection in use has its write event.
        unsafe { (*self.get().write).ready() != 0 }
    }

    /// Disarms the send timeout.
    pub fn cancel_write_timer(&self) {
        // SAFETY: a connection in use has its write event; loop thread.
        unsafe { gateway_ngx_del_timer(self.get().write) };
    }

    /// Disarms the read timeout (client_body_timeout while a body arrives).
    pub fn cancel_read_timer(&self) {
        // SAFETY: a connection in use has its read event; loop thread.
        unsafe { gateway_ngx_del_timer(self.get().read) };
    }

    /// Forgets that the read timeout passed: the wait was not the client's.
    pub fn forgive_read_timeout(&self) {
        // SAFETY: a connection in use has its read event; loop thread.
        unsafe { (*self.get().read).set_timedout(0) };
    }

    /// Whether the peer has closed the socket (pipelined bytes are left unread).
    pub fn peer_closed(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: peeks at most one byte into a local.
        let n = unsafe {
            libc::recv(
                self.fd(),
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

    /// The client's address as text.
    pub fn remote_addr(&self) -> &[u8] {
        // SAFETY: the text lives in the connection's pool.
        unsafe { bytes(&self.get().addr_text) }
    }

    pub fn remote_port(&self) -> u16 {
        // SAFETY: an accepted connection has its peer's address.
        unsafe { ngx_inet_get_port(self.get().sockaddr) }
    }

    /// The server's address as text, written into `buf`; empty if unknown.
    pub fn local_addr<'b>(&self, buf: &'b mut [u8]) -> &'b [u8] {
        let mut text = ngx_str_t {
            len: buf.len(),
            data: buf.as_mut_ptr(),
        };
        // SAFETY: the connection is live; nginx writes at most text.len bytes into buf.
        let rc = unsafe { ngx_connection_local_sockaddr(self.raw.as_ptr(), &mut text, 0) };
        if rc == OK {
            &buf[..text.len.min(buf.len())]
        } else {
            &[]
        }
    }

    /// The server's port; 0 if unknown (ask after [`Connection::local_addr`]).
    pub fn local_port(&self) -> u16 {
        let local = self.get().local_sockaddr;
        if local.is_null() {
            0
        } else {
            // SAFETY: the connection's local address, once known, lives with it.
            unsafe { ngx_inet_get_port(local) }
        }
    }

    pub fn is_ssl(&self) -> bool {
        !self.get().ssl.is_null()
    }

    /// Runs the requests nginx posted on this connection (subrequests, a
    /// finalized request's last steps).
    pub fn run_posted_requests(self) {
        // SAFETY: connection slots are never freed, only reused; nginx checks
        // c->destroyed itself.
        unsafe { ngx_http_run_posted_requests(self.raw.as_ptr()) };
    }
}

/// Marks the buffers this module gives nginx, so they can be recycled.
static BUF_TAG: u8 = 0;

fn tag() -> ngx_buf_tag_t {
    (&BUF_TAG as *const u8).cast_mut().cast()
}

/// The response body this module handed to one request's output filters: the
/// buffers, and the memory they point to until nginx has sent it. It belongs
/// in the request's pool (see [`Pool::own`]), since nginx may still send after
/// the request is finalized.
pub struct Output<'r> {
    /// The request whose pool the buffers are in.
    owner: NonNull<ngx_http_request_t>,
    free: *mut ngx_chain_t,
    busy: *mut ngx_chain_t,
    /// Buffers given to nginx, in order, with the memory they point to.
    in_flight: VecDeque<(NonNull<ngx_buf_t>, Option<Vec<u8>>)>,
    _life: PhantomData<&'r ngx_http_request_t>,
}

impl<'r> Output<'r> {
    pub fn new(r: &Request<'r>) -> Output<'r> {
        Output {
            owner: r.raw,
            free: ptr::null_mut(),
            busy: ptr::null_mut(),
            in_flight: VecDeque::new(),
            _life: PhantomData,
        }
    }

    fn check(&self, r: &Request<'r>) {
        assert!(r.raw == self.owner, "response buffers of another request");
    }

    /// Bytes of a buffer nginx has not sent yet.
    fn unsent(b: NonNull<ngx_buf_t>) -> usize {
        // SAFETY: buffers in in_flight live in the owner's pool, as long as this Output.
        let b = unsafe { b.as_ref() };
        if b.in_file() != 0 && b.memory() == 0 {
            (b.file_last - b.file_pos) as usize
        } else {
            // SAFETY: pos and last point into the same memory (of in_flight).
            (unsafe { b.last.offset_from(b.pos) }) as usize
        }
    }

    /// Bytes given to nginx and not sent yet.
    pub fn pending(&self) -> usize {
        self.in_flight.iter().map(|(b, _)| Self::unsent(*b)).sum()
    }

    /// Frees the memory of sent buffers and recycles them.
    pub fn release(&mut self, r: &Request<'r>) {
        self.update(r, ptr::null_mut());
    }

    fn update(&mut self, r: &Request<'r>, mut out: *mut ngx_chain_t) {
        self.check(r);
        while let Some((b, _)) = self.in_flight.front() {
            if Self::unsent(*b) != 0 {
                break;
            }
            self.in_flight.pop_front();
        }
        // SAFETY: the chains hold links and buffers of the request's pool (checked above).
        unsafe {
            ngx_chain_update_chains(
                r.pool().raw.as_ptr(),
                &mut self.free,
                &mut self.busy,
                &mut out,
                tag(),
            )
        };
    }

    /// A cleared buffer in a chain link of its own.
    fn link(&mut self, r: &Request<'r>) -> Option<NonNull<ngx_chain_t>> {
        self.check(r);
        // SAFETY: the free list holds links of the request's pool (checked above).
        let cl =
            NonNull::new(unsafe { ngx_chain_get_free_buf(r.pool().raw.as_ptr(), &mut self.free) })?;
        // SAFETY: cl is a link with a buffer from the request's pool, ours to fill.
        unsafe {
            let cl = cl.as_ptr();
            *(*cl).buf = ngx_buf_t::default();
            (*(*cl).buf).tag = tag();
            (*cl).next = ptr::null_mut();
        }
        Some(cl)
    }

    /// Passes the buffer of `cl` to the body filters; `data`, which it may point
    /// to, stays until it is sent.
    fn output(
        &mut self,
        r: &Request<'r>,
        cl: NonNull<ngx_chain_t>,
        data: Option<Vec<u8>>,
    ) -> ngx_int_t {
        // SAFETY: cl is a link from link(), whose buffer is set.
        let b = unsafe { NonNull::new_unchecked((*cl.as_ptr()).buf) };
        self.in_flight.push_back((b, data));
        // SAFETY: the request is live; what the buffer points to stays in in_flight.
        let rc = unsafe { ngx_http_output_filter(r.raw.as_ptr(), cl.as_ptr()) };
        self.update(r, cl.as_ptr());
        if rc == AGAIN {
            OK
        } else {
            rc
        }
    }

    /// Sends `data` (may be empty: a flush).
    pub fn send_memory(&mut self, r: &Request<'r>, data: Vec<u8>, flush: bool) -> ngx_int_t {
        let Some(cl) = self.link(r) else {
            return ERROR;
        };
        // SAFETY: the buffer points into data, whose heap memory does not move when the
        // Vec moves into in_flight, where it stays until nginx has sent it.
        unsafe {
            let b = (*cl.as_ptr()).buf;
            let p = data.as_ptr().cast_mut();
            (*b).start = p;
            (*b).pos = p;
            (*b).last = p.add(data.len());
            (*b).end = (*b).last;
            (*b).set_memory(u32::from(!data.is_empty()));
            (*b).set_flush(u32::from(flush));
        }
        self.output(r, cl, Some(data))
    }

    /// Sends `len` bytes of the file `fd` from `offset`; the request's pool closes it.
    pub fn send_file(&mut self, r: &Request<'r>, fd: OwnedFd, offset: u64, len: u64) -> ngx_int_t {
        self.check(r);
        let Ok(file) = r.pool().file(fd, r.connection().get().log) else {
            return ERROR;
        };
        let Some(cl) = self.link(r) else {
            return ERROR;
        };
        // SAFETY: cl's buffer is ours to fill; file lives in the request's pool.
        unsafe {
            let b = (*cl.as_ptr()).buf;
            (*b).file = file.as_ptr();
            (*b).file_pos = offset as off_t;
            (*b).file_last = (offset + len) as off_t;
            (*b).set_in_file(1);
            (*b).set_flush(1);
        }
        self.output(r, cl, None)
    }
}
