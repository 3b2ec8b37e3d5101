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

use std::os::fd::RawFd;
use std::sync::OnceLock;

use super::ffi::*;
use super::records::{Connection, Cycle, LoopThread};
use crate::common::panic::guard;

/// Each wrapped listener (its address) and nginx's handler for it.
static HANDLERS: OnceLock<Vec<(usize, ngx_connection_handler_pt)>> = OnceLock::new();

/// Protects the sockets of `cycle`, the worker's cycle, from then on. Call it
/// before the loop accepts connections (init_process).
pub fn protect(cycle: Cycle<'_>) {
    for fd in cycle.socket_fds() {
        set_cloexec(fd);
    }
    if HANDLERS.get().is_some() {
        return;
    }
    let handlers = cycle.wrap_listeners(Some(accepted));
    if HANDLERS.set(handlers).is_ok() {
        // SAFETY: registers a handler that only reads memory and closes descriptors.
        unsafe { libc::pthread_atfork(None, None, Some(close_in_child)) };
    }
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: F_SETFD on a descriptor nginx owns changes only its flag.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// A listener's handler: marks the accepted connection close-on-exec, then
/// hands it to nginx's handler for that listener.
unsafe extern "C" fn accepted(c: *mut ngx_connection_t) {
    // SAFETY: nginx passes the connection it just accepted, with its listener set.
    let conn = unsafe { Connection::from_raw(c) };
    let handler = guard("accepting a connection", None, || {
        set_cloexec(conn.fd());
        HANDLERS
            .get()
            .and_then(|all| all.iter().find(|(at, _)| *at == conn.listener()))
            .and_then(|(_, handler)| *handler)
    });
    match handler {
        // SAFETY: nginx's own handler for this listener and connection.
        Some(handler) => unsafe { handler(c) },
        // SAFETY: c is a live connection nobody else will handle.
        None => unsafe { ngx_close_connection(c) },
    }
}

/// Fork handler, in the child: closes nginx's sockets. Runs in the only thread
/// of the new process and calls nothing but close.
extern "C" fn close_in_child() {
    // SAFETY: a fork handler in the child runs on the child's only thread.
    let lt = unsafe { LoopThread::assume() };
    guard("closing nginx's sockets in a child process", (), || {
        // ngx_cycle and its arrays are the parent's, copied by fork: they stay valid.
        Cycle::with_current(lt, |cycle| {
            for fd in cycle.socket_fds() {
                // SAFETY: the child holds a copy of each of nginx's descriptors; closing
                // them leaves the parent's open.
                unsafe { libc::close(fd) };
            }
        });
    })
}
