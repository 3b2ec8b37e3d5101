//! The driver without a thread: a request whose response only queues, served
//! on the loop thread itself. Body reads wait for the transport's bytes
//! ([`Flow::poll_body`]), writes for its room ([`Flow::poll_room`]); a waiting
//! `receive()` after the body learns of the client leaving from
//! [`Flow::poll_gone`]. Each wakes the request through the loop's queue.

use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use super::backend::{Backend, Head, Op, Reply, READ_SIZE};
use super::event_loop::{RequestWaker, Shared};
use crate::common::transport::{Done, Flow, Outcome, RequestBody, ResponseChannel};

/// A write waiting for room, and whether the application awaits its reply.
struct PendingSend {
    head: Option<Head>,
    data: Vec<u8>,
    reply: bool,
}

pub struct FlowBackend {
    body: Box<dyn RequestBody>,
    response: Box<dyn ResponseChannel>,
    flow: Box<dyn Flow>,
    /// Behind a mutex only to be `Sync`: it is called once, on the loop.
    done: Mutex<Option<Done>>,
    waker: Waker,
    pending: Option<PendingSend>,
    /// A body read waits for bytes.
    reading: bool,
    watching: bool,
    /// Deferred until the pending write has gone.
    finish: Option<Outcome>,
    head_sent: bool,
    gone: bool,
}

impl FlowBackend {
    pub fn new(
        id: u64,
        shared: Arc<Shared>,
        body: Box<dyn RequestBody>,
        response: Box<dyn ResponseChannel>,
        flow: Box<dyn Flow>,
        done: Done,
    ) -> FlowBackend {
        FlowBackend {
            body,
            response,
            flow,
            done: Mutex::new(Some(done)),
            waker: Waker::from(Arc::new(RequestWaker { id, shared })),
            pending: None,
            reading: false,
            watching: false,
            finish: None,
            head_sent: false,
            gone: false,
        }
    }

    /// Writes the pending piece if there is room now; its reply, if wanted.
    fn try_send(&mut self) -> Option<Reply> {
        let mut cx = Context::from_waker(&self.waker);
        self.flow.poll_room(&mut cx).is_ready().then_some(())?;
        let PendingSend { head, data, reply } = self.pending.take()?;
        let result = self.write(head, &data);
        if let Some(outcome) = self.finish.take() {
            self.end(outcome);
        }
        reply.then_some(Reply::Sent(result))
    }

    /// Reads the next piece of the body if that does not wait now.
    fn try_read(&mut self) -> Option<Reply> {
        let mut cx = Context::from_waker(&self.waker);
        self.flow.poll_body(&mut cx).is_ready().then_some(())?;
        self.reading = false;
        let mut buf = vec![0; READ_SIZE];
        let read = self.body.read(&mut buf).map(|n| {
            buf.truncate(n);
            buf
        });
        Some(Reply::Data(read))
    }

    fn write(&mut self, head: Option<Head>, data: &[u8]) -> io::Result<()> {
        let result = (|| {
            if let Some(head) = &head {
                self.response
                    .start(head.status, &head.status_line, &head.headers)?;
                self.head_sent = true;
            }
            self.response.write(data, true)
        })();
        if let Err(e) = &result {
            if !(head.is_some() && !self.head_sent && e.kind() == io::ErrorKind::InvalidData) {
                self.gone = true;
            }
        }
        result
    }

    fn poll_gone(&mut self) -> Option<Reply> {
        let mut cx = Context::from_waker(&self.waker);
        match self.flow.poll_gone(&mut cx) {
            Poll::Ready(()) => {
                self.watching = false;
                Some(Reply::Gone)
            }
            Poll::Pending => None,
        }
    }

    fn end(&mut self, outcome: Outcome) {
        let outcome = if self.gone && outcome != Outcome::FAILED {
            Outcome::ClientGone
        } else {
            outcome
        };
        if outcome == Outcome::Aborted {
            self.response.abort();
        }
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(done) = done {
            done(outcome);
        }
    }
}

impl Drop for FlowBackend {
    /// A request the loop dropped unfinished (its task could not start, or
    /// the loop stopped while a write waited for room) still ends for the
    /// server, which would otherwise wait for it forever.
    fn drop(&mut self) {
        if self
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return;
        }
        let outcome = match self.finish {
            Some(outcome) if self.pending.is_none() => outcome,
            _ if self.head_sent => Outcome::Aborted,
            _ => Outcome::FAILED,
        };
        self.end(outcome);
    }
}

impl Backend for FlowBackend {
    fn submit(&mut self, op: Op) -> Option<Reply> {
        match op {
            Op::Read => {
                self.reading = true;
                self.try_read()
            }
            Op::Send { head, data, reply } => {
                self.pending = Some(PendingSend { head, data, reply });
                self.try_send()
            }
            Op::WatchGone => {
                self.watching = true;
                self.poll_gone()
            }
            Op::Log(level, line) => {
                self.response.log(level, &line);
                None
            }
            Op::Finish(outcome) if self.pending.is_some() => {
                self.finish = Some(outcome);
                None
            }
            Op::Finish(outcome) => {
                self.end(outcome);
                None
            }
        }
    }

    fn resume(&mut self, replies: &mut Vec<Reply>) {
        if self.reading {
            replies.extend(self.try_read());
        }
        if self.pending.is_some() {
            replies.extend(self.try_send());
        }
        if self.watching {
            replies.extend(self.poll_gone());
        }
    }

    fn finished(&self) -> bool {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }
}
