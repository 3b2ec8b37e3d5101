//! What a Python thread hands to the event loop for one request: a bounded queue
//! of response pieces. The thread blocks while the queue is full (backpressure from
//! a slow client reaches the application); the loop is woken once per batch.
//! A request served without a thread (an ASGI application on its event loop)
//! queues without blocking and is woken through a [`Waker`] instead. The
//! request body goes the other way, in an [`Inbound`] queue, while it arrives.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicPtr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::common::inbound::{Broken, Inbound};
use crate::common::log::request_line;
use crate::common::transport::{Header, Outcome};

/// Bytes a request may have queued for the loop before its thread waits.
const QUEUE_LIMIT: usize = 256 * 1024;

/// One piece of a response, in the order the application produced them.
pub enum Piece {
    Start {
        status: u16,
        status_line: String,
        headers: Vec<Header>,
    },
    Data {
        data: Vec<u8>,
        flush: bool,
    },
    /// A duplicate of the application's file descriptor: the request owns it.
    File {
        fd: OwnedFd,
        offset: u64,
        len: u64,
    },
    /// The application (or the daemon group) is done, and how; always the last
    /// piece, even when the client left.
    End(Outcome),
}

impl Piece {
    fn size(&self) -> usize {
        match self {
            Piece::Data { data, .. } => data.len(),
            _ => 0,
        }
    }
}

#[derive(Default)]
struct Queue {
    pieces: VecDeque<Piece>,
    bytes: usize,
    /// The loop will look at this queue again without being woken.
    scheduled: bool,
    /// The request is over on the nginx side: writes fail from now on.
    gone: bool,
    /// The thread waits for room (saves a wake-up syscall when it does not).
    waiting: bool,
    /// A response head was queued: the client may have it.
    started: bool,
    /// The `End` was queued.
    ended: bool,
    /// Woken when the queue has room again (a runner without a thread).
    room: Option<Waker>,
    /// Woken when the request is over on the nginx side.
    gone_waker: Option<Waker>,
}

impl Queue {
    /// Whether a piece of `size` bytes may be queued now.
    fn has_room(&self, size: usize) -> bool {
        self.bytes == 0 || self.bytes + size <= QUEUE_LIMIT
    }
}

/// The shared state of one request between its Python thread and the loop.
pub struct Exchange {
    queue: Mutex<Queue>,
    space: Condvar,
    /// The loop's state of this request while nginx still has it; touched by the
    /// loop thread only.
    pub loop_state: AtomicPtr<c_void>,
    /// The body while it arrives (a body read whole with the head is in the
    /// hand-off instead).
    pub body: Inbound,
    /// The request's method and URI, for log lines about it from any thread.
    method: Box<[u8]>,
    uri: Box<[u8]>,
}

impl Exchange {
    pub fn new(method: &[u8], uri: &[u8]) -> Exchange {
        Exchange {
            queue: Mutex::default(),
            space: Condvar::new(),
            loop_state: AtomicPtr::default(),
            body: Inbound::default(),
            method: method.into(),
            uri: uri.into(),
        }
    }

    /// A log line about the request: `gateway: METHOD URI: message`.
    pub fn request_line(&self, message: &str) -> String {
        request_line(&self.method, &self.uri, message)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a piece for the loop, waiting while the queue is full. Fails once
    /// the request is gone, except for `End`, which always reaches the loop.
    pub fn push(
        self: &Arc<Self>,
        piece: Piece,
        wake: impl FnOnce(Arc<Exchange>),
    ) -> io::Result<()> {
        let size = piece.size();
        let end = matches!(piece, Piece::End(_));
        let mut q = self.lock();
        if !end {
            loop {
                if q.gone {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the client closed the connection",
                    ));
                }
                if q.has_room(size) {
                    break;
                }
                q.waiting = true;
                q = self.space.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        }
        self.queue(q, piece, wake);
        Ok(())
    }

    /// Queues a piece without waiting for room: for a runner that first saw
    /// [`Exchange::poll_room`] ready. Fails once the request is gone, except
    /// for `End`.
    pub fn push_now(
        self: &Arc<Self>,
        piece: Piece,
        wake: impl FnOnce(Arc<Exchange>),
    ) -> io::Result<()> {
        let q = self.lock();
        if q.gone && !matches!(piece, Piece::End(_)) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client closed the connection",
            ));
        }
        self.queue(q, piece, wake);
        Ok(())
    }

    fn queue(
        self: &Arc<Self>,
        mut q: MutexGuard<'_, Queue>,
        piece: Piece,
        wake: impl FnOnce(Arc<Exchange>),
    ) {
        q.started |= matches!(piece, Piece::Start { .. });
        q.ended |= matches!(piece, Piece::End(_));
        q.bytes += piece.size();
        q.pieces.push_back(piece);
        let schedule = !q.scheduled;
        q.scheduled = true;
        drop(q);
        if schedule {
            wake(self.clone());
        }
    }

    /// Ready when a write may be queued now, or the request is gone (the
    /// write then fails); otherwise `cx`'s waker is woken when it may.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut q = self.lock();
        if q.gone || q.bytes < QUEUE_LIMIT {
            return Poll::Ready(());
        }
        q.waiting = true;
        q.room = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready once the request is over on the nginx side (the client left, or
    /// its response ended); otherwise `cx`'s waker is woken when it is.
    pub fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut q = self.lock();
        if q.gone {
            return Poll::Ready(());
        }
        q.gone_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ends the response of a job that failed (panicked) before it queued its
    /// `End`: a 500 if no head was queued, else the response is cut short.
    pub fn end_failed(self: &Arc<Self>, wake: impl FnOnce(Arc<Exchange>)) {
        let outcome = {
            let q = self.lock();
            if q.ended {
                return;
            }
            if q.started {
                Outcome::Aborted
            } else {
                Outcome::FAILED
            }
        };
        let _ = self.push(Piece::End(outcome), wake);
    }

    /// The next piece for the loop. An empty queue is no longer scheduled: the
    /// next push wakes the loop.
    pub fn pop(&self) -> Option<Piece> {
        let mut q = self.lock();
        let piece = q.pieces.pop_front();
        match &piece {
            Some(p) => {
                q.bytes -= p.size();
                if q.waiting && q.bytes <= QUEUE_LIMIT / 2 {
                    q.waiting = false;
                    self.space.notify_all();
                    if let Some(room) = q.room.take() {
                        drop(q);
                        room.wake();
                    }
                }
            }
            None => q.scheduled = false,
        }
        piece
    }

    /// Whether the request is over on the nginx side (the client left).
    pub fn is_gone(&self) -> bool {
        self.lock().gone
    }

    /// Marks the request as over on the nginx side: the thread's writes fail, a
    /// thread waiting for room wakes up, and its `End` wakes the loop. A body
    /// still arriving breaks: its reader fails rather than waits forever.
    pub fn set_gone(&self) {
        self.body.finish(Err(Broken::GONE));
        let mut q = self.lock();
        q.gone = true;
        q.scheduled = false;
        self.space.notify_all();
        let wakers = [q.room.take(), q.gone_waker.take()];
        drop(q);
        wakers.into_iter().flatten().for_each(Waker::wake);
    }
}
