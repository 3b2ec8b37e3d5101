//! The seam between a server and whatever runs the application: a request's
//! head, its body, the channel its response goes out through, and how it ended.
//!
//! A server implements [`RequestBody`] and [`ResponseChannel`] once over its own
//! records; every runner (the embedded WSGI layer, the daemon client that
//! forwards over the wire, later ASGI) uses only these traits, so no runner is
//! written per server and no server knows which runner serves a request.
//!
//! Both traits are called on the thread that runs the request, without the GIL,
//! and may block: a body read waits for the client's next bytes, a write for the
//! client to take the previous ones (that is the backpressure). A client that
//! went away shows as an error of kind [`io::ErrorKind::ConnectionAborted`] (or
//! any other I/O error) from either side, which is how an application learns of
//! a disconnect.

use std::io;
use std::os::fd::RawFd;
use std::task::{Context, Poll};

use crate::common::cgi::RequestHead;
pub use crate::common::framing::Header;

/// Reads the body of one request from the server.
pub trait RequestBody: Send + Sync {
    /// Fills `buf` with the next bytes of the body as they arrive; `Ok(0)` at its
    /// end. Chunked bodies arrive already decoded.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Once the body has been read to its end: whether the client has gone
    /// away, checked without waiting (ASGI's `http.disconnect`). A transport
    /// that cannot tell answers false.
    fn client_gone(&mut self) -> bool {
        false
    }
}

/// Sends one response to the server's client.
pub trait ResponseChannel: Send + Sync {
    /// Sends the status line and headers.
    fn start(&mut self, status: u16, status_line: &str, headers: &[Header]) -> io::Result<()>;
    /// Sends body bytes; `flush` pushes them to the client now.
    fn write(&mut self, data: &[u8], flush: bool) -> io::Result<()>;
    /// Sends `len` bytes of an open regular file from `offset` through the server's
    /// file path (sendfile where it can).
    fn send_file(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()>;
    /// Ends a response whose headers went out but whose body broke: the client
    /// must see it cut short, not complete.
    fn abort(&mut self);
    /// Writes a finished line to the server's error log for this request.
    fn log(&self, level: log::Level, line: &str);
    /// Whether `start` and a `write` of `len` bytes with `flush` would only queue
    /// them in memory: a runner that holds a lock (the GIL) may then keep it,
    /// since releasing and retaking it costs more than the copy.
    fn only_buffers(&self, _len: usize, _flush: bool) -> bool {
        false
    }
}

/// What a runner that serves many requests from one thread (an event loop)
/// needs besides the two traits: wake-ups instead of waits. A server offers it
/// for requests whose response channel only queues (so `start` and `write`
/// never wait) and whose body `read` waits only when [`Flow::poll_body`] did
/// not say it was ready.
pub trait Flow: Send + Sync {
    /// Ready when a body read would not wait (bytes arrived, or the body ended
    /// or broke); otherwise `cx`'s waker is woken once it would not. A body the
    /// server read whole before the request started is always ready.
    fn poll_body(&self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }
    /// Ready when the response queue has room for another write, or the client
    /// is gone (the write then fails); otherwise `cx`'s waker is woken once it is.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()>;
    /// Ready once the client has gone away; otherwise `cx`'s waker is woken
    /// when it does.
    fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()>;
}

/// Called once with how a request started by a runner without a thread ended.
pub type Done = Box<dyn FnOnce(Outcome) + Send>;

/// One request as the server hands it to a runner.
pub struct Request<'a> {
    pub head: RequestHead<'a>,
    /// Whether the request has a body at all (a length or chunked framing): a
    /// runner that forwards it need not wait for an empty one.
    pub has_body: bool,
    pub body: Box<dyn RequestBody>,
    pub response: Box<dyn ResponseChannel>,
}

/// How a request ended, for the server to finish it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response was sent.
    Complete,
    /// Nothing of the response was sent: the server answers with this status
    /// (500 when the application failed, 503 when nothing could run it, ...).
    Status(u16),
    /// The response was cut short after its headers went out (already logged).
    Aborted,
    /// The client went away before the response was complete.
    ClientGone,
}

impl Outcome {
    /// The application failed before any of its response was sent.
    pub const FAILED: Outcome = Outcome::Status(500);
}
