//! What a request's protocol state (on the event loop thread) asks of the
//! transport, and what comes back: the same for a request whose I/O is done by
//! a server thread ([`super::threaded`]) and one served entirely on the loop
//! over a transport that never blocks ([`super::flow`]).

use std::io;

use crate::common::transport::{Header, Outcome};

/// A response head the application sent, kept until its first body bytes so
/// that both go out together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub status_line: String,
    pub headers: Vec<Header>,
}

/// One operation on the request's transport, in the order the application
/// asked for them.
#[derive(Debug)]
pub enum Op {
    /// Read the next piece of the body (up to [`READ_SIZE`] bytes).
    Read,
    /// Send the head (when given) and these body bytes, flushed. `reply`: the
    /// application awaits the write (the last piece needs no answer).
    Send {
        head: Option<Head>,
        data: Vec<u8>,
        reply: bool,
    },
    /// The body has ended and the application awaits `receive()`: answer
    /// [`Reply::Gone`] once the client leaves.
    WatchGone,
    /// A finished line for the server's error log (already naming the request).
    Log(log::Level, String),
    /// The request is over (cut the response short first when `Aborted`).
    Finish(Outcome),
}

/// The answer to an [`Op`].
#[derive(Debug)]
pub enum Reply {
    /// Body bytes; empty at the end of the body.
    Data(io::Result<Vec<u8>>),
    /// The write of a [`Op::Send`] with `reply` set.
    Sent(io::Result<()>),
    /// The client went away.
    Gone,
}

/// The most body bytes one `http.request` message carries.
pub const READ_SIZE: usize = 64 * 1024;

/// A request's transport as its protocol state sees it, on the loop thread.
pub trait Backend: Send + Sync {
    /// Starts `op`: its reply now, or None when the reply comes later, as an
    /// event for this request on the loop (or when `op` has none).
    fn submit(&mut self, op: Op) -> Option<Reply>;
    /// After a wake-up for this request: the replies of the operations that
    /// could now go on.
    fn resume(&mut self, _replies: &mut Vec<Reply>) {}
    /// Whether the request is over for the transport too (after
    /// [`Op::Finish`], a write may still wait for room).
    fn finished(&self) -> bool {
        true
    }
}
