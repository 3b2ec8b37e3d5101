//! Keeps nginx's sockets out of the processes an embedded application starts.
//!
//! nginx opens its listening sockets and accepts connections without
//! close-on-exec, so a child started by `subprocess` (`close_fds=False`) or
//! `os.fork()` held them: the client of the request that started it saw the end
//! of its response only when the child exited, and a stopped server's port kept
//! taking connections that nobody answered.
//!
//! Two halves. Every listening socket and connection is close-on-exec (new ones
//! as they are accepted, through a wrapper of the listeners' handlers): that
//! covers children that exec, including those started by `vfork` or
//! `posix_spawn`, which run no fork handlers. And a fork handler closes them all
//! in a child that does not exec.

use std::sync::OnceLock;

use super::ffi::*;

/// Each wrapped listener (its address) and nginx's handler for it.
static HANDLERS: OnceLock<Vec<(usize, ngx_connection_handler_pt)>> = OnceLock::new();

/// Protects the sockets of `cycle`, the worker's cycle, from then on.
///
/// # Safety
/// `cycle` must be the live cycle of this process, on the loop thread, before
/// the loop accepts connections (init_process).
pub unsafe fn protect(cycle: *mut ngx_cycle_t) {
    // SAFETY: guaranteed by the caller.
    let listening = unsafe { listening(cycle) };
    for ls in listening.iter() {
        set_cloexec(ls.fd);
    }
    // SAFETY: guaranteed by the caller.
    for c in unsafe { connections(cycle) } {
        set_cloexec(c.fd);
    }
    let handlers = listening
        .iter()
        .map(|ls| (ls as *const ngx_listening_t as usize, ls.handler))
        .collect();
    if HANDLERS.set(handlers).is_ok() {
        for ls in listening.iter_mut() {
            ls.handler = Some(accepted);
        }
        // SAFETY: registers a handler that only reads memory and closes descriptors.
        unsafe { libc::pthread_atfork(None, None, Some(close_in_child)) };
    }
}

/// The listening sockets of `cycle`.
///
/// # Safety
/// `cycle` must be a live cycle.
unsafe fn listening<'a>(cycle: *mut ngx_cycle_t) -> &'a mut [ngx_listening_t] {
    // SAFETY: the cycle's listening array holds nelts ngx_listening_t.
    unsafe {
        let array = &(*cycle).listening;
        if array.elts.is_null() {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(array.elts.cast(), array.nelts)
    }
}

/// The connection slots of `cycle` (a slot in use has an fd other than -1).
///
/// # Safety
/// `cycle` must be a live cycle.
unsafe fn connections<'a>(cycle: *mut ngx_cycle_t) -> &'a [ngx_connection_t] {
    // SAFETY: the cycle's connections array holds connection_n slots.
    unsafe {
        if (*cycle).connections.is_null() {
            return &[];
        }
        std::slice::from_raw_parts((*cycle).connections, (*cycle).connection_n)
    }
}

fn set_cloexec(fd: ngx_socket_t) {
    if fd != -1 {
        // SAFETY: F_SETFD on a descriptor nginx owns changes only its flag.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// A listener's handler: marks the accepted connection close-on-exec, then
/// hands it to nginx's handler for that listener.
unsafe extern "C" fn accepted(c: *mut ngx_connection_t) {
    // SAFETY: nginx passes the connection it just accepted, with its listener set.
    let (fd, ls) = unsafe { ((*c).fd, (*c).listening as usize) };
    set_cloexec(fd);
    let handler = HANDLERS
        .get()
        .and_then(|all| all.iter().find(|(at, _)| *at == ls))
        .and_then(|(_, handler)| *handler);
    match handler {
        // SAFETY: nginx's own handler for this listener and connection.
        Some(handler) => unsafe { handler(c) },
        // SAFETY: c is a live connection nobody else will handle.
        None => unsafe { ngx_close_connection(c) },
    }
}

/// Fork handler, in the child: closes nginx's sockets. Runs in the only thread
/// of the new process and calls nothing but close.
unsafe extern "C" fn close_in_child() {
    // SAFETY: ngx_cycle and its arrays are the parent's, copied by fork; they stay valid.
    unsafe {
        let cycle = ngx_cycle;
        if cycle.is_null() {
            return;
        }
        for c in connections(cycle) {
            if c.fd != -1 {
                libc::close(c.fd);
            }
        }
        for ls in listening(cycle).iter() {
            if ls.fd != -1 {
                libc::close(ls.fd);
            }
        }
    }
}
