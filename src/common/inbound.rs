//! A request body on its way from a server's event loop to the application,
//! while the client still sends it: a bounded queue of bytes (nginx's, see
//! `nginx::request`). The loop stops reading
//! from the client when the queue is full ([`Inbound::pause_if_full`]) and the
//! reader that makes room again says so, for its caller to wake the loop. A
//! thread's read waits on a condition variable; a runner without a thread
//! polls ([`Inbound::poll_ready`]) and is woken through its waker.

use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// Body bytes the loop reads ahead of the application before it stops reading
/// from the client.
const LIMIT: usize = 256 * 1024;

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
    bytes: VecDeque<u8>,
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
    fn notify(&self, mut s: MutexGuard<'_, State>) {
        if std::mem::take(&mut s.waiting) {
            self.arrived.notify_all();
        }
        let reader = s.reader.take();
        drop(s);
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    /// Queues bytes the client sent. Loop thread.
    pub fn push(&self, data: &[u8]) {
        let mut s = self.lock();
        if s.end.is_some() {
            return;
        }
        s.bytes.extend(data);
        self.notify(s);
    }

    /// Ends the body (complete, or broken: queued bytes are dropped and reads
    /// fail); a body that already ended stays as it ended.
    pub fn finish(&self, end: Result<(), Broken>) {
        let mut s = self.lock();
        if s.end.is_some() {
            return;
        }
        if end.is_err() {
            s.bytes = VecDeque::new();
        }
        s.end = Some(end);
        self.notify(s);
    }

    /// Whether the loop must stop reading from the client now (the queue is
    /// full): [`Inbound::take_resume`] says when to read on. Loop thread.
    pub fn pause_if_full(&self) -> bool {
        let mut s = self.lock();
        s.paused = s.bytes.len() >= LIMIT && s.end.is_none();
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
        let mut s = self.lock();
        loop {
            if buf.is_empty() {
                return (Ok(0), false);
            }
            if !s.bytes.is_empty() {
                let n = copy_out(&mut s.bytes, buf);
                let resume = s.paused && s.bytes.len() <= LIMIT / 2;
                if resume {
                    s.paused = false;
                    s.resume = true;
                }
                return (Ok(n), resume);
            }
            match s.end {
                Some(Ok(())) => return (Ok(0), false),
                Some(Err(broken)) => return (Err(io::Error::new(broken.kind, broken.why)), false),
                None => {
                    s.waiting = true;
                    s = self.arrived.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Ready when a read would not wait (bytes are queued, or the body ended);
    /// otherwise `cx`'s waker is woken when it would not.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if !s.bytes.is_empty() || s.end.is_some() {
            return Poll::Ready(());
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Moves the first bytes of `queue` into `buf`: as many as fit.
fn copy_out(queue: &mut VecDeque<u8>, buf: &mut [u8]) -> usize {
    let n = buf.len().min(queue.len());
    let (front, back) = queue.as_slices();
    let first = n.min(front.len());
    buf[..first].copy_from_slice(&front[..first]);
    buf[first..n].copy_from_slice(&back[..n - first]);
    queue.drain(..n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bytes_arrive_in_order_then_the_end() {
        let q = Inbound::default();
        q.push(b"hello ");
        q.push(b"world");
        let mut buf = [0u8; 8];
        assert_eq!(q.read(&mut buf).0.unwrap(), 8);
        assert_eq!(&buf, b"hello wo");
        q.finish(Ok(()));
        assert_eq!(q.read(&mut buf).0.unwrap(), 3);
        assert_eq!(&buf[..3], b"rld");
        assert_eq!(q.read(&mut buf).0.unwrap(), 0);
    }

    #[test]
    fn a_broken_body_fails_the_read_at_once() {
        let q = Inbound::default();
        q.push(b"partial");
        q.finish(Err(Broken::GONE));
        q.finish(Ok(()));
        let err = q.read(&mut [0u8; 4]).0.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[test]
    fn a_full_queue_pauses_the_loop_until_the_reader_takes_half() {
        let q = Inbound::default();
        assert!(!q.pause_if_full());
        q.push(&vec![7u8; LIMIT]);
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
        q.push(b"late");
        assert_eq!(reader.join().unwrap(), b"late");
    }
}
