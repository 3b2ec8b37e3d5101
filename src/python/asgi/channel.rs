//! One request's protocol state on the event loop thread: `receive()` and
//! `send()` as the application calls them, checked and turned into
//! operations on its transport ([`Backend`]), and how the request ends.
//!
//! A call whose answer is known at once returns a finished future (awaiting
//! it does not suspend the task); otherwise the future is kept and resolved
//! when the transport's reply comes back as an event.

use std::cell::RefCell;
use std::collections::HashMap;

use pyo3::exceptions::{PyConnectionResetError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict};

use super::backend::{Backend, Head, Op, Reply};
use super::event_loop::NewRequest;
use super::lifespan;
use super::response::{self, Response};
use super::scope;
use crate::common::log::request_line;
use crate::common::transport::Outcome;
use crate::python::app;
use crate::python::wsgi::response::format_exception;

thread_local! {
    /// The loop thread's asyncio loop and a future that is already done.
    static LOOP: RefCell<Option<(Py<PyAny>, Py<PyAny>)>> = const { RefCell::new(None) };
    /// The requests running on this loop, by id.
    static REQUESTS: RefCell<HashMap<u64, Py<Channel>>> = RefCell::new(HashMap::new());
}

/// Remembers the loop this thread runs (called once on the loop thread).
pub fn set_loop(py: Python<'_>, event_loop: &Bound<'_, PyAny>) -> PyResult<()> {
    let done = event_loop.call_method0(intern!(py, "create_future"))?;
    done.call_method1(intern!(py, "set_result"), (py.None(),))?;
    LOOP.with(|l| *l.borrow_mut() = Some((event_loop.clone().unbind(), done.unbind())));
    Ok(())
}

fn event_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    LOOP.with(|l| match &*l.borrow() {
        Some((event_loop, _)) => Ok(event_loop.bind(py).clone()),
        None => Err(PyRuntimeError::new_err("not on the ASGI event loop thread")),
    })
}

/// A future that is already done with None: what `send()` returns when the
/// transport took the message at once.
fn done_future(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    LOOP.with(|l| match &*l.borrow() {
        Some((_, done)) => Ok(done.bind(py).clone()),
        None => Err(PyRuntimeError::new_err("not on the ASGI event loop thread")),
    })
}

fn new_future(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    event_loop(py)?.call_method0(intern!(py, "create_future"))
}

/// A future already done with `value`.
fn ready(value: Bound<'_, PyAny>) -> PyResult<Bound<'_, PyAny>> {
    let py = value.py();
    let future = new_future(py)?;
    future.call_method1(intern!(py, "set_result"), (value,))?;
    Ok(future)
}

/// The Python side: the task that runs an application (see `glue.py`).
static SERVE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Starts a request that just arrived: loads its application, waits for its
/// lifespan startup (in the task), and creates its task.
pub fn begin(py: Python<'_>, request: NewRequest) {
    let NewRequest {
        id,
        spec,
        info,
        head,
        has_body,
        mut backend,
    } = request;
    let log = |backend: &mut Box<dyn Backend>, level, msg: &str| {
        let line = request_line(&head.method, &head.request_uri, msg);
        backend.submit(Op::Log(level, line));
    };
    let app = match app::get(py, &spec, &info) {
        Ok(app) => app,
        Err(e) => {
            let context = format!(
                "loading the ASGI application {}:{} failed",
                spec.file.display(),
                spec.callable
            );
            log(&mut backend, log::Level::Error, &context);
            for line in format_exception(py, &e).lines() {
                log(&mut backend, log::Level::Error, line);
            }
            backend.submit(Op::Finish(Outcome::FAILED));
            return;
        }
    };
    let channel = Channel::new(id, backend, &head, has_body);
    if let Err(e) = start_task(py, &spec, &app, &head, channel) {
        // The channel was dropped with its backend: build the log line anew.
        log::error!(
            "{}",
            request_line(
                &head.method,
                &head.request_uri,
                &format!("starting the ASGI task failed: {e}")
            )
            .trim_start_matches("gateway: ")
        );
    }
}

fn start_task(
    py: Python<'_>,
    spec: &crate::common::config::AppSpec,
    app: &Bound<'_, PyAny>,
    head: &scope::OwnedHead,
    channel: Channel,
) -> PyResult<()> {
    let lifespan = lifespan::get(py, spec, app)?;
    let scope = scope::build(py, head)?;
    let serve = SERVE.get_or_try_init(py, || super::glue(py, "serve"))?;
    let id = channel.id;
    let channel = Bound::new(py, channel)?;
    let receive = channel.getattr(intern!(py, "receive"))?;
    let send = channel.getattr(intern!(py, "send"))?;
    let coroutine = serve
        .bind(py)
        .call1((app, scope, receive, send, &channel, lifespan))?;
    let task = event_loop(py)?.call_method1(intern!(py, "create_task"), (coroutine,))?;
    // asyncio keeps only weak references to tasks: the channel holds it until it ends.
    channel.borrow_mut().task = Some(task.unbind());
    REQUESTS.with(|r| r.borrow_mut().insert(id, channel.unbind()));
    Ok(())
}

fn lookup(py: Python<'_>, id: u64) -> Option<Py<Channel>> {
    REQUESTS.with(|r| r.borrow().get(&id).map(|c| c.clone_ref(py)))
}

/// Request `id`'s task, while it runs.
pub fn task_of(py: Python<'_>, id: u64) -> Option<Py<PyAny>> {
    let channel = lookup(py, id)?;
    let channel = channel.bind(py).borrow();
    channel.task.as_ref().map(|t| t.clone_ref(py))
}

/// A reply from request `id`'s transport.
pub fn on_reply(py: Python<'_>, id: u64, reply: Reply) {
    if let Some(channel) = lookup(py, id) {
        channel.bind(py).borrow_mut().deliver(py, reply);
    }
}

/// Request `id`'s transport may go on.
pub fn on_wake(py: Python<'_>, id: u64) {
    let Some(channel) = lookup(py, id) else {
        return;
    };
    let mut replies = Vec::new();
    let mut channel = channel.bind(py).borrow_mut();
    channel.backend.resume(&mut replies);
    for reply in replies {
        channel.deliver(py, reply);
    }
    channel.forget_when_over();
}

/// Ends every request still open (the loop is stopping): their server
/// threads must not wait for them.
pub fn end_all(py: Python<'_>) {
    let open: Vec<Py<Channel>> =
        REQUESTS.with(|r| r.borrow_mut().drain().map(|(_, c)| c).collect());
    for channel in open {
        let mut channel = channel.bind(py).borrow_mut();
        channel.log(
            log::Level::Error,
            "the ASGI event loop stopped before the request ended",
        );
        let outcome = channel.response.failure_outcome();
        channel.finish(outcome);
    }
    LOOP.with(|l| l.borrow_mut().take());
}

/// Where the request body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// More to read; how much, when the request declared its length.
    Open(Option<u64>),
    /// Read to its end.
    Ended,
}

/// The `receive` and `send` of one request, and its state.
#[pyclass(module = "gateway")]
pub struct Channel {
    id: u64,
    backend: Box<dyn Backend>,
    method: Vec<u8>,
    uri: Vec<u8>,
    body: Body,
    response: Response,
    /// The client went away.
    gone: bool,
    /// The transport watches for the client leaving.
    watching: bool,
    /// `receive()` and `send()` calls waiting for their reply.
    receiving: Option<Py<PyAny>>,
    sending: Option<Py<PyAny>>,
    /// A body read was asked of the transport and its reply has not come.
    reading: bool,
    /// A body piece whose `receive()` was cancelled before it came: the next
    /// `receive()` gets it (a timeout around `receive()` loses nothing).
    unclaimed: Option<Py<PyAny>>,
    /// The application's task, until the request ends.
    task: Option<Py<PyAny>>,
    finished: bool,
}

impl Channel {
    fn new(id: u64, backend: Box<dyn Backend>, head: &scope::OwnedHead, has_body: bool) -> Channel {
        let body = match (has_body, head.content_length()) {
            (false, _) | (true, Some(0)) => Body::Open(Some(0)),
            (true, declared) => Body::Open(declared),
        };
        Channel {
            id,
            backend,
            method: head.method.clone(),
            uri: head.request_uri.clone(),
            body,
            response: Response::new(head.method == b"HEAD"),
            gone: false,
            watching: false,
            receiving: None,
            sending: None,
            reading: false,
            unclaimed: None,
            task: None,
            finished: false,
        }
    }

    /// Logs a line about this request.
    fn log(&mut self, level: log::Level, msg: &str) {
        let line = request_line(&self.method, &self.uri, msg);
        self.backend.submit(Op::Log(level, line));
    }

    fn log_exception(&mut self, py: Python<'_>, context: &str, err: &PyErr) {
        self.log(log::Level::Error, context);
        for line in format_exception(py, err).lines() {
            self.log(log::Level::Error, line);
        }
    }

    /// Ends the request: the transport finishes it, the loop forgets it.
    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.backend.submit(Op::Finish(outcome));
        self.task = None;
        self.forget_when_over();
    }

    /// The loop forgets the request once its transport is done with it too.
    fn forget_when_over(&self) {
        if !self.finished || !self.backend.finished() {
            return;
        }
        let id = self.id;
        // The map may be borrowed already (end_all drains it).
        REQUESTS.with(|r| {
            if let Ok(mut r) = r.try_borrow_mut() {
                r.remove(&id);
            }
        });
    }

    /// Applies a reply from the transport, resolving the call that waits for it.
    fn deliver(&mut self, py: Python<'_>, reply: Reply) {
        let result = match reply {
            Reply::Data(Ok(data)) => {
                self.reading = false;
                let message = self.body_message(py, &data);
                match message {
                    Ok(message) => self.hand_over(py, message),
                    Err(e) => fail(py, self.receiving.take(), e),
                }
            }
            Reply::Data(Err(_)) | Reply::Gone => {
                self.reading = false;
                self.gone = true;
                let message = disconnect(py);
                let woke = settle(py, self.receiving.take(), message);
                let e = client_gone();
                woke.and(fail(py, self.sending.take(), e))
            }
            Reply::Sent(Ok(())) => settle(py, self.sending.take(), Ok(py.None().into_bound(py))),
            Reply::Sent(Err(e)) => {
                let e = self.send_error(e);
                fail(py, self.sending.take(), e)
            }
        };
        if let Err(e) = result {
            self.log_exception(py, "resuming the ASGI task failed", &e);
        }
    }

    /// Resolves the waiting `receive()` with `message`, or keeps it for the
    /// next one when that call was cancelled meanwhile.
    fn hand_over(&mut self, py: Python<'_>, message: Bound<'_, PyAny>) -> PyResult<()> {
        let waiting = self.receiving.take().filter(|f| !is_done(f.bind(py)));
        match waiting {
            Some(future) => settle(py, Some(future), Ok(message)),
            None => {
                self.unclaimed = Some(message.unbind());
                Ok(())
            }
        }
    }

    /// An `http.request` message with the body bytes just read.
    fn body_message<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
        let more = match self.body {
            _ if data.is_empty() => false,
            Body::Open(Some(left)) => {
                let left = left.saturating_sub(data.len() as u64);
                self.body = Body::Open(Some(left));
                left > 0
            }
            Body::Open(None) => true,
            Body::Ended => false,
        };
        if !more {
            self.body = Body::Ended;
        }
        request_message(py, data, more)
    }

    /// The exception `send()` raises for a failed write: the head was refused
    /// (nothing went out), or the client went away.
    fn send_error(&mut self, e: std::io::Error) -> PyErr {
        if e.kind() == std::io::ErrorKind::InvalidData && !self.response.head_sent() {
            return PyValueError::new_err(format!("the response head was refused: {e}"));
        }
        self.gone = true;
        client_gone()
    }

    /// The response ended: a pending `receive()` now learns that nothing more
    /// will come (`http.disconnect`, as the spec says once the response is sent).
    fn response_ended(&mut self, py: Python<'_>) -> PyResult<()> {
        settle(py, self.receiving.take(), disconnect(py))
    }

    /// Sends what a `send()` produced: at once, or with a future to await.
    fn submit_send<'py>(
        &mut self,
        py: Python<'py>,
        head: Option<Head>,
        data: Vec<u8>,
        last: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        if last {
            self.backend.submit(Op::Send {
                head,
                data,
                reply: false,
            });
            self.response_ended(py)?;
            return done_future(py);
        }
        match self.backend.submit(Op::Send {
            head,
            data,
            reply: true,
        }) {
            Some(Reply::Sent(Ok(()))) => done_future(py),
            Some(Reply::Sent(Err(e))) => Err(self.send_error(e)),
            Some(_) => Err(PyRuntimeError::new_err(
                "the transport answered a write with a read",
            )),
            None => {
                let future = new_future(py)?;
                self.sending = Some(future.clone().unbind());
                Ok(future)
            }
        }
    }
}

/// Resolves a waiting call's future with `value` (unless it was cancelled).
fn settle(
    py: Python<'_>,
    future: Option<Py<PyAny>>,
    value: PyResult<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let Some(future) = future else {
        return Ok(());
    };
    let future = future.bind(py);
    if future.call_method0(intern!(py, "done"))?.is_truthy()? {
        return Ok(());
    }
    match value {
        Ok(value) => future
            .call_method1(intern!(py, "set_result"), (value,))
            .map(drop),
        Err(e) => future
            .call_method1(intern!(py, "set_exception"), (e.into_value(py),))
            .map(drop),
    }
}

/// Whether a future is done (resolved or cancelled).
fn is_done(future: &Bound<'_, PyAny>) -> bool {
    future
        .call_method0(intern!(future.py(), "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(true)
}

fn fail(py: Python<'_>, future: Option<Py<PyAny>>, e: PyErr) -> PyResult<()> {
    settle(py, future, Err(e))
}

/// The exception `send()` raises once the client has gone: an `OSError`, as
/// the spec asks, so that a streaming application stops.
fn client_gone() -> PyErr {
    PyConnectionResetError::new_err("the client closed the connection")
}

fn disconnect(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let message = PyDict::new(py);
    message.set_item(intern!(py, "type"), intern!(py, "http.disconnect"))?;
    Ok(message.into_any())
}

fn request_message<'py>(py: Python<'py>, data: &[u8], more: bool) -> PyResult<Bound<'py, PyAny>> {
    let message = PyDict::new(py);
    message.set_item(intern!(py, "type"), intern!(py, "http.request"))?;
    message.set_item(intern!(py, "body"), PyBytes::new(py, data))?;
    message.set_item(intern!(py, "more_body"), more)?;
    Ok(message.into_any())
}

/// A key of a message: dicts directly, other mappings through `get`.
fn field<'py>(
    message: &Bound<'py, PyAny>,
    key: &Bound<'py, pyo3::types::PyString>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    match message.cast::<PyDict>() {
        Ok(dict) => dict.get_item(key),
        Err(_) => {
            let value = message.call_method1(intern!(message.py(), "get"), (key,))?;
            Ok((!value.is_none()).then_some(value))
        }
    }
}

#[pymethods]
impl Channel {
    /// ASGI's `receive()`: the next `http.request` piece, then, once the body
    /// has ended, `http.disconnect` when the client leaves or the response is over.
    fn receive<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        // A call cancelled while it waited (a timeout, Starlette's
        // is_disconnected()) no longer waits.
        if self
            .receiving
            .as_ref()
            .is_some_and(|f| !is_done(f.bind(py)))
        {
            return Err(PyRuntimeError::new_err(
                "receive() was called while another receive() was still waiting",
            ));
        }
        self.receiving = None;
        if let Some(message) = self.unclaimed.take() {
            return ready(message.into_bound(py));
        }
        if self.gone || self.response.ended() || self.finished {
            return ready(disconnect(py)?);
        }
        let reply = match self.body {
            Body::Open(Some(0)) => {
                self.body = Body::Ended;
                return ready(request_message(py, b"", false)?);
            }
            Body::Open(_) if self.reading => None,
            Body::Open(_) => {
                self.reading = true;
                self.backend.submit(Op::Read)
            }
            Body::Ended if self.watching => None,
            Body::Ended => {
                self.watching = true;
                self.backend.submit(Op::WatchGone)
            }
        };
        let future = new_future(py)?;
        self.receiving = Some(future.clone().unbind());
        if let Some(reply) = reply {
            self.deliver(py, reply);
        }
        Ok(future)
    }

    /// ASGI's `send(message)` for `http.response.start` and `http.response.body`.
    fn send<'py>(
        &mut self,
        py: Python<'py>,
        message: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.gone {
            return Err(client_gone());
        }
        if self.sending.as_ref().is_some_and(|f| !is_done(f.bind(py))) {
            return Err(PyRuntimeError::new_err(
                "send() was called while another send() was still waiting",
            ));
        }
        self.sending = None;
        let kind = field(message, intern!(py, "type"))?
            .ok_or_else(|| PyValueError::new_err("an ASGI message needs a 'type'"))?;
        let kind = kind
            .extract::<String>()
            .map_err(|_| PyTypeError::new_err("an ASGI message's 'type' must be a str"))?;
        match kind.as_str() {
            "http.response.start" => {
                let (status, headers) = (
                    field(message, intern!(py, "status"))?,
                    field(message, intern!(py, "headers"))?,
                );
                let dropped = self.response.start(status.as_ref(), headers.as_ref())?;
                for name in dropped {
                    self.log(log::Level::Warn, &format!("dropped hop-by-hop response header '{name}'"));
                }
                done_future(py)
            }
            "http.response.body" => {
                let body = field(message, intern!(py, "body"))?;
                let more = match field(message, intern!(py, "more_body"))? {
                    Some(more) => more.is_truthy()?,
                    None => false,
                };
                let piece = self.response.body(body.as_ref(), more)?;
                if let Some(limit) = piece.excess_from {
                    self.log(log::Level::Error, &format!("the application sent more than its Content-Length of {limit} bytes; the excess was dropped"));
                }
                if piece.head.is_none() && piece.data.is_empty() && more {
                    return done_future(py);
                }
                self.submit_send(py, piece.head, piece.data, !more)
            }
            other => Err(PyValueError::new_err(format!(
                "unexpected ASGI message type {other:?} for an http request (expected 'http.response.start' or 'http.response.body')"
            ))),
        }
    }

    /// The application returned.
    fn returned(&mut self, py: Python<'_>) {
        let outcome = if self.gone && !self.response.ended() {
            Outcome::ClientGone
        } else {
            match self.response.finish() {
                response::End::NeverStarted => {
                    self.log(
                        log::Level::Error,
                        "the application returned without sending a response",
                    );
                    Outcome::FAILED
                }
                response::End::Flush(head) => {
                    self.backend.submit(Op::Send {
                        head,
                        data: Vec::new(),
                        reply: false,
                    });
                    self.end_outcome()
                }
                response::End::Done => self.end_outcome(),
            }
        };
        let _ = self.response_ended(py);
        self.finish(outcome);
    }

    /// The application raised `error`.
    fn raised(&mut self, py: Python<'_>, error: Bound<'_, PyAny>) {
        let err = PyErr::from_value(error);
        let outcome = if self.gone && !self.response.ended() {
            self.log(
                log::Level::Info,
                "the client closed the connection before the response was complete",
            );
            Outcome::ClientGone
        } else if self.response.ended() {
            self.log_exception(
                py,
                "the application raised an exception after its response was complete",
                &err,
            );
            self.end_outcome()
        } else if self.response.head_sent() {
            self.log_exception(py, "the application raised an exception", &err);
            self.log(
                log::Level::Error,
                "the response was cut short: its headers had already been sent",
            );
            Outcome::Aborted
        } else {
            self.log_exception(py, "the application raised an exception", &err);
            Outcome::FAILED
        };
        let _ = self.response_ended(py);
        self.finish(outcome);
    }

    /// The application's lifespan startup failed: its requests are refused.
    fn unavailable(&mut self, py: Python<'_>) {
        self.log(
            log::Level::Error,
            "the application's lifespan startup failed (see above); answering 503",
        );
        let _ = self.response_ended(py);
        self.finish(Outcome::Status(503));
    }
}

impl Channel {
    /// How a response that reached its end ends: complete, unless it is
    /// shorter than its Content-Length said (then it is cut short, which
    /// closes the connection).
    fn end_outcome(&mut self) -> Outcome {
        match self.response.shortfall() {
            None => Outcome::Complete,
            Some((declared, sent)) => {
                self.log(log::Level::Error, &format!("the response ended after {sent} of the {declared} bytes its Content-Length declared; closing the connection"));
                Outcome::Aborted
            }
        }
    }
}
