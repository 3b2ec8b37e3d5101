//! Running requests through ASGI 3 applications (HTTP and lifespan, spec
//! version 2.4) on one event loop per process.
//!
//! - [`event_loop`]: the loop thread and the queue other threads reach it by;
//! - [`channel`]: one request's `receive`/`send` and how it ends;
//! - [`response`]: the checks on what the application sends;
//! - [`scope`]: the connection scope; [`lifespan`]: startup and shutdown;
//! - [`threaded`] and [`flow`]: a request's I/O done by a server thread
//!   ([`run`]), or on the loop over a transport that never blocks ([`start`]).

mod backend;
mod channel;
mod event_loop;
mod flow;
mod lifespan;
mod response;
mod scope;
pub mod tasks;
mod threaded;

use std::ffi::CStr;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::common::cgi::RequestHead;
use crate::common::config::AppSpec;
use crate::common::log::request_line;
use crate::common::transport::{Done, Flow, Outcome, Request, ResponseChannel};
use crate::python::ServerInfo;
use event_loop::{Event, NewRequest};

/// The Python side (see `glue.py`).
const GLUE: &CStr =
    match CStr::from_bytes_with_nul(concat!(include_str!("glue.py"), "\0").as_bytes()) {
        Ok(glue) => glue,
        Err(_) => panic!("glue.py contains a NUL byte"),
    };

/// A name `glue.py` defines.
fn glue(py: Python<'_>, name: &str) -> PyResult<Py<PyAny>> {
    static GLOBALS: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
    let globals = GLOBALS.get_or_try_init(py, || -> PyResult<_> {
        let globals = PyDict::new(py);
        py.run(GLUE, Some(&globals), None)?;
        Ok(globals.unbind())
    })?;
    Ok(globals
        .bind(py)
        .get_item(name)?
        .ok_or_else(|| pyo3::exceptions::PyNameError::new_err(name.to_string()))?
        .unbind())
}

/// This process's loop, for a request; None (logged with the request's method
/// and URI) when it cannot run, and the request gets a 503.
fn loop_for(
    head: &RequestHead<'_>,
    response: &dyn ResponseChannel,
) -> Option<std::sync::Arc<event_loop::Shared>> {
    event_loop::get()
        .map_err(|e| {
            let why = format!("cannot run the ASGI application: {e}");
            response.log(
                log::Level::Error,
                &request_line(head.method, head.request_uri, &why),
            );
        })
        .ok()
}

/// Runs `request` with the ASGI application `spec` on this process's loop;
/// this thread does the request's I/O and blocks until it has ended.
pub fn run(spec: &AppSpec, info: &ServerInfo, request: Request<'_>) -> Outcome {
    let Request {
        head,
        has_body,
        body,
        response,
    } = request;
    let Some(shared) = loop_for(&head, &*response) else {
        return Outcome::Status(503);
    };
    let ops = std::sync::Arc::new(threaded::Ops::default());
    let id = event_loop::next_id();
    shared.post(Event::New(Box::new(NewRequest {
        id,
        spec: spec.clone(),
        info: info.clone(),
        head: scope::OwnedHead::new(&head),
        has_body,
        backend: Box::new(threaded::Threaded { ops: ops.clone() }),
    })));
    let _driving = tasks::Driving::enter(id);
    threaded::serve(id, &shared, ops, body, response)
}

/// Starts `request` on this process's loop and returns at once, without the
/// GIL; `done` is called on the loop thread with its outcome.
pub fn start(
    spec: &AppSpec,
    info: &ServerInfo,
    request: Request<'_>,
    flow: Box<dyn Flow>,
    done: Done,
) {
    let Request {
        head,
        has_body,
        body,
        response,
    } = request;
    let Some(shared) = loop_for(&head, &*response) else {
        return done(Outcome::Status(503));
    };
    let id = event_loop::next_id();
    let watched = crate::python::slow::watch_task(&head, id);
    let done: Done = Box::new(move |outcome| {
        drop(watched);
        done(outcome)
    });
    let backend = flow::FlowBackend::new(id, shared.clone(), body, response, flow, done);
    shared.post(Event::New(Box::new(NewRequest {
        id,
        spec: spec.clone(),
        info: info.clone(),
        head: scope::OwnedHead::new(&head),
        has_body,
        backend: Box::new(backend),
    })));
}

/// Stops this process's loop at its exit (lifespan shutdown first), if it runs.
pub fn shutdown() {
    event_loop::shutdown();
}

/// Whether `app` is an ASGI application: a coroutine function, or an object
/// whose `__call__` is one (Starlette and FastAPI apps, Django's ASGIHandler,
/// Quart, class-based middleware).
pub fn is_asgi(py: Python<'_>, app: &Bound<'_, PyAny>) -> PyResult<bool> {
    let inspect = py.import("inspect")?;
    let is_coroutine = |obj: &Bound<'_, PyAny>| -> PyResult<bool> {
        inspect
            .call_method1("iscoroutinefunction", (obj,))?
            .is_truthy()
    };
    if is_coroutine(app)? {
        return Ok(true);
    }
    // A function's __call__ is a method-wrapper, never a coroutine function.
    match app.getattr("__call__") {
        Ok(call) => is_coroutine(&call),
        Err(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests;
