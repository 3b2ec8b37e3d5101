//! A request body on its way from a server's event loop to the application,
//! while the client still sends it: a bounded queue of bytes (nginx's, see
//! `nginx::request`). The loop stops reading
//! from the client when the queue is full ([`Inbound::pause_if_full`]) and the
//! reader that makes room again says so, for its caller to wake the loop. A
//! thread's read waits on a condition variable; a runner without a thread
//! polls ([`Inbound::poll_ready`]) and is woken through its waker.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Body bytes the loop reads ahead of the application before it stops reading
/// from the client.
const LIMIT: usize = 256 * 1024;

/// How often a thread waiting for body bytes looks whether the process
/// abandoned the bodies still arriving ([`abandon_all`]).
const ABANDON_CHECK: Duration = Duration::from_millis(100);

/// Set once no event loop fills this process's body queues any more.
static ABANDONED: AtomicBool = AtomicBool::new(false);

/// The process exits and its event loop fills no body queue any more: each
/// read that waits for bytes fails now, so that its thread can finish.
pub fn abandon_all() {
    ABANDONED.store(true, Ordering::Relaxed);
}

/// Why a read fails once the bodies were abandoned.
const ABANDONED_BODY: Broken = Broken {
    kind: io::ErrorKind::ConnectionAborted,
    why: "the server stopped before the request body was complete",
};

/// Why a body ended before its end, for the application's read to fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken {
    pub kind: io::ErrorKind,
    pub why: &'static str,
}

impl Broken {
    /// The client went away (or the request ended) before the body was complete.
    pub const GONE: Broken = Broken {
        kind: io::ErrorKind::ConnectionAborted,
        why: "the client closed the connection while sending the request body",
    };
}

#[derive(Default)]
struct State {
    /// The pieces as the server read them; `offset` bytes of the first are read.
    pieces: VecDeque<Vec<u8>>,
    offset: usize,
    /// Bytes queued and not read yet.
    bytes: usize,
    /// How the body ended: None while it still arrives.
    end: Option<Result<(), Broken>>,
    /// The loop stopped reading from the client until the reader makes room.
    paused: bool,
    /// The reader made room since the loop paused: the loop reads on.
    resume: bool,
    /// A thread waits for bytes.
    waiting: bool,
    /// Woken when bytes arrive or the body ends (a runner without a thread).
    reader: Option<Waker>,
}

impl State {
    /// Takes the first bytes of the queue, as many as fit in `buf`: parts of
    /// pieces are copied here, whole pieces go to `whole` with where in `buf`
    /// they belong, to be copied once the lock is released. Returns how many
    /// bytes were taken.
    fn take(&mut self, buf: &mut [u8], whole: &mut Vec<(usize, Vec<u8>)>) -> usize {
        let mut at = 0;
        while let Some(front) = self.pieces.front() {
            let left = front.len() - self.offset;
            let room = buf.len() - at;
            if room == 0 {
                break;
            }
            if self.offset == 0 && left <= room {
                whole.extend(self.pieces.pop_front().map(|piece| (at, piece)));
                at += left;
                continue;
            }
            let n = left.min(room);
            buf[at..at + n].copy_from_slice(&front[self.offset..self.offset + n]);
            at += n;
            self.offset += n;
            if self.offset == front.len() {
                self.pieces.pop_front();
                self.offset = 0;
            }
        }
        self.bytes -= at;
        at
    }
}

/// The body queue of one request, shared by the loop and the application.
#[derive(Default)]
pub struct Inbound {
    state: Mutex<State>,
    arrived: Condvar,
}

impl Inbound {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes whoever waits for bytes; takes the lock's guard to drop it first.
    fn wake_reader(&self, mut s: MutexGuard<'_, State>) {
        if std::mem::take(&mut s.waiting) {
            self.arrived.notify_one();
        }
        let reader = s.reader.take();
        drop(s);
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    /// Queues a piece the client sent, without waking the reader: the loop
    /// calls [`Inbound::arrived`] once it has queued what it read. Loop thread.
    pub fn push(&self, piece: Vec<u8>) {
        if piece.is_empty() {
            return;
        }
        let mut s = self.lock();
        if s.end.is_some() {
            return;
        }
        s.bytes += piece.len();
        s.pieces.push_back(piece);
    }

    /// Wakes the reader if it waits for what was pushed.
    pub fn arrived(&self) {
        let s = self.lock();
        if s.bytes > 0 {
            self.wake_reader(s);
        }
    }

    /// Ends the body (complete, or broken: queued bytes are dropped and reads
    /// fail); a body that already ended stays as it ended.
    pub fn finish(&self, end: Result<(), Broken>) {
        let mut s = self.lock();
        if s.end.is_some() {
            return;
        }
        if end.is_err() {
            s.pieces = VecDeque::new();
            s.offset = 0;
            s.bytes = 0;
        }
        s.end = Some(end);
        self.wake_reader(s);
    }

    /// Whether the loop must stop reading from the client now (the queue is
    /// full): [`Inbound::take_resume`] says when to read on. Loop thread.
    pub fn pause_if_full(&self) -> bool {
        let mut s = self.lock();
        s.paused = s.bytes >= LIMIT && s.end.is_none();
        s.paused
    }

    /// Whether the loop paused and waits for the reader.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Whether the reader made room since the loop paused (once).
    pub fn take_resume(&self) -> bool {
        std::mem::take(&mut self.lock().resume)
    }

    /// Reads the next bytes of the body into `buf`, waiting for them; `Ok(0)`
    /// at its end. The bool is true when the loop must be woken to read on.
    pub fn read(&self, buf: &mut [u8]) -> (io::Result<usize>, bool) {
        if buf.is_empty() {
            return (Ok(0), false);
        }
        let mut whole = Vec::new();
        let mut s = self.lock();
        loop {
            if s.bytes > 0 {
                let taken = s.take(buf, &mut whole);
                let resume = s.paused && s.bytes <= LIMIT / 2;
                if resume {
                    s.paused = false;
                    s.resume = true;
                }
                drop(s);
                for (at, piece) in whole {
                    buf[at..at + piece.len()].copy_from_slice(&piece);
                }
                return (Ok(taken), resume);
            }
            match s.end {
                Some(Ok(())) => return (Ok(0), false),
                Some(Err(broken)) => return (Err(io::Error::new(broken.kind, broken.why)), false),
                None if ABANDONED.load(Ordering::Relaxed) => {
                    let broken = ABANDONED_BODY;
                    return (Err(io::Error::new(broken.kind, broken.why)), false);
                }
                None => {
                    s.waiting = true;
                    s = match self.arrived.wait_timeout(s, ABANDON_CHECK) {
                        Ok((s, _)) => s,
                        Err(e) => e.into_inner().0,
                    };
                }
            }
        }
    }

    /// Ready when a read would not wait (bytes are queued, or the body ended);
    /// otherwise `cx`'s waker is woken when it would not.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.bytes > 0 || s.end.is_some() {
            return Poll::Ready(());
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bytes_arrive_in_order_then_the_end() {
        let q = Inbound::default();
        q.push(b"hello ".to_vec());
        q.push(b"world".to_vec());
        let mut buf = [0u8; 8];
        assert_eq!(q.read(&mut buf).0.unwrap(), 8);
        assert_eq!(&buf, b"hello wo");
        q.finish(Ok(()));
        assert_eq!(q.read(&mut buf).0.unwrap(), 3);
        assert_eq!(&buf[..3], b"rld");
        assert_eq!(q.read(&mut buf).0.unwrap(), 0);
    }

    #[test]
    fn reads_of_any_size_keep_the_order_across_pieces() {
        let q = Inbound::default();
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        for piece in data.chunks(777) {
            q.push(piece.to_vec());
        }
        q.finish(Ok(()));
        let mut out = Vec::new();
        for size in [1, 5, 777, 2000, 3, 4096].into_iter().cycle() {
            let mut buf = vec![0u8; size];
            let n = q.read(&mut buf).0.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, data);
    }

    #[test]
    fn a_broken_body_fails_the_read_at_once() {
        let q = Inbound::default();
        q.push(b"partial".to_vec());
        q.finish(Err(Broken::GONE));
        q.finish(Ok(()));
        let err = q.read(&mut [0u8; 4]).0.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[test]
    fn a_full_queue_pauses_the_loop_until_the_reader_takes_half() {
        let q = Inbound::default();
        assert!(!q.pause_if_full());
        q.push(vec![7u8; LIMIT]);
        assert!(q.pause_if_full());
        let mut buf = vec![0u8; LIMIT / 4];
        let (n, resume) = q.read(&mut buf);
        assert_eq!((n.unwrap(), resume), (LIMIT / 4, false));
        let (n, resume) = q.read(&mut buf);
        assert_eq!((n.unwrap(), resume), (LIMIT / 4, true));
        assert!(q.take_resume());
        assert!(!q.take_resume());
        assert!(!q.is_paused());
    }

    #[test]
    fn a_waiting_thread_gets_the_bytes_that_arrive() {
        let q = Arc::new(Inbound::default());
        let reader = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                let n = q.read(&mut buf).0.unwrap();
                buf[..n].to_vec()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        q.push(b"late".to_vec());
        q.arrived();
        assert_eq!(reader.join().unwrap(), b"late");
    }
}
