//! The blocking driver: a server thread (an Apache handler, a daemon worker,
//! an nginx pool thread) does a request's I/O while its task runs on the
//! loop. The thread takes operations from a channel and posts their replies
//! back to the loop; it holds no GIL while it waits.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::backend::{Backend, Op, Reply, READ_SIZE};
use super::event_loop::{Event, Shared};
use crate::common::transport::{Outcome, RequestBody, ResponseChannel};

/// How often a thread whose application awaits `http.disconnect` asks the
/// transport whether the client has gone.
const GONE_POLL: Duration = Duration::from_millis(100);

/// A request's operations on their way to its thread. The thread parks on a
/// condition variable, without spinning first: on a small machine a spinning
/// thread per request takes the CPU from the loop that would feed it.
#[derive(Default)]
pub struct Ops {
    queue: Mutex<(VecDeque<Op>, bool)>,
    ready: Condvar,
}

/// What a thread waiting for an operation gets.
enum Next {
    Op(Op),
    Timeout,
    /// The loop dropped the request.
    Closed,
}

impl Ops {
    fn lock(&self) -> MutexGuard<'_, (VecDeque<Op>, bool)> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, op: Op) {
        self.lock().0.push_back(op);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().1 = true;
        self.ready.notify_one();
    }

    /// The next operation, waiting at most `timeout` (None: as long as it takes).
    fn next(&self, timeout: Option<Duration>) -> Next {
        let mut q = self.lock();
        loop {
            if let Some(op) = q.0.pop_front() {
                return Next::Op(op);
            }
            if q.1 {
                return Next::Closed;
            }
            q = match timeout {
                None => self.ready.wait(q).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    let (q, waited) = self
                        .ready
                        .wait_timeout(q, t)
                        .unwrap_or_else(|e| e.into_inner());
                    if waited.timed_out() && q.0.is_empty() && !q.1 {
                        return Next::Timeout;
                    }
                    q
                }
            };
        }
    }
}

/// The loop's end of a request served by a thread.
pub struct Threaded {
    pub ops: Arc<Ops>,
}

impl Backend for Threaded {
    fn submit(&mut self, op: Op) -> Option<Reply> {
        self.ops.push(op);
        None
    }
}

impl Drop for Threaded {
    /// The loop is done with the request: a thread still waiting learns it.
    fn drop(&mut self) {
        self.ops.close();
    }
}

/// Serves request `id`'s operations on this thread until the loop finishes
/// it; a loop that vanishes (its end of the channel dropped) fails the request.
pub fn serve(
    id: u64,
    shared: &Arc<Shared>,
    ops: Arc<Ops>,
    mut body: Box<dyn RequestBody>,
    mut response: Box<dyn ResponseChannel>,
) -> Outcome {
    let mut state = ThreadState::default();
    let reply = |reply: Reply| shared.post(Event::Reply(id, reply));
    loop {
        match ops.next(state.watching.then_some(GONE_POLL)) {
            Next::Op(Op::Finish(outcome)) => return state.finish(outcome, &mut *response),
            Next::Op(op) => state.perform(op, &mut *body, &mut *response, &reply),
            Next::Timeout => {
                if body.client_gone() {
                    state.watching = false;
                    reply(Reply::Gone);
                }
            }
            Next::Closed => return state.vanished(&mut *response),
        }
    }
}

#[derive(Default)]
struct ThreadState {
    watching: bool,
    head_sent: bool,
    /// A write failed: the client went away.
    gone: bool,
    buf: Vec<u8>,
}

impl ThreadState {
    fn perform(
        &mut self,
        op: Op,
        body: &mut dyn RequestBody,
        response: &mut dyn ResponseChannel,
        reply: &dyn Fn(Reply),
    ) {
        match op {
            Op::Read => reply(Reply::Data(self.read(body))),
            Op::Send {
                head,
                data,
                reply: wanted,
            } => {
                let sent = self.send(response, head, &data);
                if wanted {
                    reply(Reply::Sent(sent));
                }
            }
            Op::WatchGone => self.watching = true,
            Op::Log(level, line) => response.log(level, &line),
            Op::Finish(_) => unreachable!("handled by serve"),
        }
    }

    fn read(&mut self, body: &mut dyn RequestBody) -> io::Result<Vec<u8>> {
        self.buf.resize(READ_SIZE, 0);
        let n = body.read(&mut self.buf)?;
        Ok(self.buf[..n].to_vec())
    }

    fn send(
        &mut self,
        response: &mut dyn ResponseChannel,
        head: Option<super::backend::Head>,
        data: &[u8],
    ) -> io::Result<()> {
        let result = (|| {
            if let Some(head) = &head {
                response.start(head.status, &head.status_line, &head.headers)?;
                self.head_sent = true;
            }
            response.write(data, true)
        })();
        if let Err(e) = &result {
            // A refused head sent nothing: the request can still fail with a 500.
            if !(head.is_some() && !self.head_sent && e.kind() == io::ErrorKind::InvalidData) {
                self.gone = true;
            }
        }
        result
    }

    fn finish(&mut self, outcome: Outcome, response: &mut dyn ResponseChannel) -> Outcome {
        if self.gone && outcome != Outcome::FAILED {
            return Outcome::ClientGone;
        }
        if outcome == Outcome::Aborted {
            response.abort();
        }
        outcome
    }

    fn vanished(&mut self, response: &mut dyn ResponseChannel) -> Outcome {
        response.log(
            log::Level::Error,
            "gateway: the ASGI event loop dropped a request before it ended",
        );
        if self.head_sent {
            response.abort();
            Outcome::Aborted
        } else {
            Outcome::FAILED
        }
    }
}
