//! Running one request through a WSGI application (PEP 3333): the environ, the
//! response iterable, `close()`, and what happens when any of it fails.

pub mod input;
pub mod response;

use std::os::fd::RawFd;

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::common::cgi::{header_key, header_separator, RequestHead};
use crate::common::config::AppSpec;
use crate::common::transport::{Outcome, Request};
use crate::common::VERSION;
use crate::python::app;
use crate::python::log_stream::LogStream;
use input::Input;
use response::{type_name, StartResponse};

/// What stays the same for every request a process serves.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// `apache` or `nginx`: `gateway.server`.
    pub server: &'static str,
    /// `embedded` or `daemon`: `gateway.mode`.
    pub mode: &'static str,
    /// The daemon group's name, empty when embedded: `gateway.process_group`.
    pub process_group: String,
    pub multithread: bool,
    pub multiprocess: bool,
    /// Whether applications of different scripts may share this process's
    /// interpreter: a daemon group's do (its operator grouped them); embedded
    /// ones only when the operator says so.
    pub shared_interpreter: bool,
}

/// Decodes bytes as latin-1, as PEP 3333 wants for "native strings".
fn latin1<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
    // SAFETY: PyUnicode_DecodeLatin1 reads exactly len bytes and cannot fail on any input
    // except out of memory, which from_owned_ptr turns into a panic-free error path below.
    unsafe {
        let ptr = ffi::PyUnicode_DecodeLatin1(
            bytes.as_ptr().cast(),
            bytes.len() as ffi::Py_ssize_t,
            std::ptr::null(),
        );
        Bound::from_owned_ptr_or_err(py, ptr)
            .map(|s| s.cast_into_unchecked())
            .unwrap_or_else(|_| PyString::new(py, &String::from_utf8_lossy(bytes)))
    }
}

/// Builds the environ of one request: every CGI variable PEP 3333 asks for, the
/// request headers as `HTTP_*`, and the `wsgi.*` and `gateway.*` keys.
pub fn build_environ<'py>(
    py: Python<'py>,
    head: &RequestHead<'_>,
    info: &ServerInfo,
) -> PyResult<Bound<'py, PyDict>> {
    let env = PyDict::new(py);
    // The server's own variables first: the request's CGI variables replace them.
    for (key, value) in &head.server_vars {
        if let Ok(key) = std::str::from_utf8(key) {
            env.set_item(key, latin1(py, value))?;
        }
    }
    set_cgi_variables(&env, head, info)?;
    for (key, value) in fold_headers(head) {
        env.set_item(key.as_ref(), latin1(py, &value))?;
    }
    set_wsgi_keys(&env, head, info)?;
    Ok(env)
}

/// The CGI variables of PEP 3333 that come from the request line and the connection.
fn set_cgi_variables(
    env: &Bound<'_, PyDict>,
    head: &RequestHead<'_>,
    info: &ServerInfo,
) -> PyResult<()> {
    let py = env.py();
    let set = |key: &Bound<'_, PyString>, value: &[u8]| env.set_item(key, latin1(py, value));
    set(intern!(py, "REQUEST_METHOD"), head.method)?;
    set(intern!(py, "SCRIPT_NAME"), head.script_name)?;
    set(intern!(py, "PATH_INFO"), head.path_info)?;
    set(intern!(py, "QUERY_STRING"), head.query_string)?;
    set(intern!(py, "REQUEST_URI"), head.request_uri)?;
    set(intern!(py, "SERVER_PROTOCOL"), head.protocol)?;
    set(intern!(py, "SERVER_NAME"), head.server_name)?;
    let port = head.server_port.to_string();
    set(intern!(py, "SERVER_PORT"), port.as_bytes())?;
    set(intern!(py, "SERVER_ADDR"), head.server_addr)?;
    set(intern!(py, "REMOTE_ADDR"), head.remote_addr)?;
    let port = head.remote_port.to_string();
    set(intern!(py, "REMOTE_PORT"), port.as_bytes())?;
    let software = format!("Gateway/{VERSION} ({})", info.server);
    set(intern!(py, "SERVER_SOFTWARE"), software.as_bytes())?;
    if head.https {
        set(intern!(py, "HTTPS"), b"on")?;
    }
    if let Some(user) = head.remote_user {
        set(intern!(py, "REMOTE_USER"), user)?;
    }
    if let Some(auth) = head.auth_type {
        set(intern!(py, "AUTH_TYPE"), auth)?;
    }
    Ok(())
}

/// The request headers under their environ keys, repeated ones folded into one
/// value, in the order they first came.
fn fold_headers(head: &RequestHead<'_>) -> Vec<(std::borrow::Cow<'static, str>, Vec<u8>)> {
    let mut folded: Vec<(std::borrow::Cow<'static, str>, Vec<u8>)> =
        Vec::with_capacity(head.headers.len());
    for (name, value) in &head.headers {
        let Some(key) = header_key(name) else {
            continue;
        };
        match folded.iter_mut().find(|(k, _)| *k == key) {
            Some((k, existing)) => {
                existing.extend_from_slice(header_separator(k).as_bytes());
                existing.extend_from_slice(value);
            }
            None => folded.push((key, value.to_vec())),
        }
    }
    folded
}

/// The `wsgi.*` keys of PEP 3333 and Gateway's own `gateway.*` keys.
fn set_wsgi_keys(
    env: &Bound<'_, PyDict>,
    head: &RequestHead<'_>,
    info: &ServerInfo,
) -> PyResult<()> {
    let py = env.py();
    env.set_item(intern!(py, "wsgi.version"), (1, 0))?;
    let scheme = if head.https {
        intern!(py, "https")
    } else {
        intern!(py, "http")
    };
    env.set_item(intern!(py, "wsgi.url_scheme"), scheme)?;
    env.set_item(intern!(py, "wsgi.multithread"), info.multithread)?;
    env.set_item(intern!(py, "wsgi.multiprocess"), info.multiprocess)?;
    env.set_item(intern!(py, "wsgi.run_once"), false)?;
    env.set_item(intern!(py, "wsgi.input_terminated"), true)?;
    env.set_item(
        intern!(py, "wsgi.file_wrapper"),
        py.get_type::<FileWrapper>(),
    )?;
    env.set_item(intern!(py, "gateway.server"), info.server)?;
    env.set_item(intern!(py, "gateway.mode"), info.mode)?;
    let group = info.process_group.as_str();
    env.set_item(intern!(py, "gateway.process_group"), group)?;
    env.set_item(intern!(py, "gateway.version"), VERSION)?;
    Ok(())
}

/// `wsgi.file_wrapper`: iterates a file in blocks, and lets the server send it
/// through its own file path when the application returns it unchanged.
#[pyclass(module = "gateway")]
pub struct FileWrapper {
    filelike: Py<PyAny>,
    blksize: usize,
}

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, blksize=8192))]
    fn new(filelike: Py<PyAny>, blksize: usize) -> FileWrapper {
        FileWrapper {
            filelike,
            blksize: blksize.max(1),
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let data = self
            .filelike
            .bind(py)
            .call_method1(intern!(py, "read"), (self.blksize,))?;
        Ok((data.len()? > 0).then_some(data))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let file = self.filelike.bind(py);
        if file.hasattr(intern!(py, "close"))? {
            file.call_method0(intern!(py, "close"))?;
        }
        Ok(())
    }
}

/// The open regular file behind a FileWrapper and where to read from, if the
/// server can send it directly.
fn sendable_file(py: Python<'_>, wrapper: &FileWrapper) -> Option<(RawFd, u64, u64)> {
    let file = wrapper.filelike.bind(py);
    let fd: RawFd = file
        .call_method0(intern!(py, "fileno"))
        .ok()?
        .extract()
        .ok()?;
    let offset: u64 = file
        .call_method0(intern!(py, "tell"))
        .ok()?
        .extract()
        .ok()?;
    // SAFETY: fstat only writes into the zeroed stat buffer we own.
    let size = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 || (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
            return None;
        }
        st.st_size as u64
    };
    Some((fd, offset, size.saturating_sub(offset)))
}

/// Runs `request` through the application `spec`. Never panics on application
/// errors: they are logged with their traceback and reported in the outcome.
pub fn run(spec: &AppSpec, info: &ServerInfo, request: Request<'_>) -> Outcome {
    crate::python::interpreter::with_gil(|py| {
        let Request {
            head,
            has_body: _,
            body,
            response,
        } = request;
        let responder = match Bound::new(
            py,
            StartResponse::new(response, head.method, head.request_uri),
        ) {
            Ok(r) => r,
            Err(e) => {
                log::error!("{}", format_args!("cannot create start_response: {e}"));
                return Outcome::FAILED;
            }
        };
        let input = Bound::new(py, Input::new(body));
        let outcome = match input {
            Ok(input) => {
                let outcome = call_app(py, spec, info, &head, &input, &responder);
                input.borrow_mut().detach();
                outcome
            }
            Err(e) => {
                responder
                    .borrow()
                    .log_exception(py, "cannot create wsgi.input", &e);
                Outcome::FAILED
            }
        };
        responder.borrow_mut().detach();
        outcome
    })
}

fn call_app(
    py: Python<'_>,
    spec: &AppSpec,
    info: &ServerInfo,
    head: &RequestHead<'_>,
    input: &Bound<'_, Input>,
    responder: &Bound<'_, StartResponse>,
) -> Outcome {
    let app = match app::get(py, spec, info) {
        Ok(app) => app,
        Err(e) => {
            let msg = format!(
                "loading the WSGI application {}:{} failed",
                spec.file.display(),
                spec.callable
            );
            responder.borrow().log_exception(py, &msg, &e);
            return Outcome::FAILED;
        }
    };
    let environ = build_environ(py, head, info).and_then(|env| {
        env.set_item(intern!(py, "wsgi.input"), input)?;
        env.set_item(
            intern!(py, "wsgi.errors"),
            Bound::new(py, LogStream::for_request(head.method, head.request_uri))?,
        )?;
        Ok(env)
    });
    let result = environ.and_then(|env| app.call1((env, responder)));
    let result = match result {
        Ok(result) => result,
        Err(e) => return failure(py, responder, "the application raised an exception", &e),
    };
    let outcome = send_result(py, &result, responder);
    // Lists and tuples, what most applications return, have no close(): looking it
    // up would raise and catch an AttributeError on every request.
    let closable =
        !(result.is_exact_instance_of::<PyList>() || result.is_exact_instance_of::<PyTuple>());
    let closed = if closable && result.hasattr(intern!(py, "close")).unwrap_or(false) {
        result.call_method0(intern!(py, "close")).map(drop)
    } else {
        Ok(())
    };
    match (outcome, closed) {
        (outcome, Ok(())) => outcome,
        (Outcome::Complete, Err(e)) if !responder.borrow().headers_sent() => failure(
            py,
            responder,
            "close() of the response raised an exception",
            &e,
        ),
        (outcome, Err(e)) => {
            responder
                .borrow()
                .log_exception(py, "close() of the response raised an exception", &e);
            outcome
        }
    }
}

/// Logs an application error and says how the request must end.
fn failure(
    py: Python<'_>,
    responder: &Bound<'_, StartResponse>,
    context: &str,
    err: &PyErr,
) -> Outcome {
    let mut r = responder.borrow_mut();
    if r.client_gone() {
        r.log(
            log::Level::Info,
            "the client closed the connection before the response was complete",
        );
        return Outcome::ClientGone;
    }
    r.log_exception(py, context, err);
    if r.headers_sent() {
        r.log(
            log::Level::Error,
            "the response was cut short: its headers had already been sent",
        );
        r.abort(py);
        Outcome::Aborted
    } else {
        Outcome::FAILED
    }
}

/// The application returned (or iterated to its end) without a status.
fn never_started(py: Python<'_>, responder: &Bound<'_, StartResponse>) -> Outcome {
    let e = pyo3::exceptions::PyRuntimeError::new_err(
        "the application returned without calling start_response()",
    );
    failure(py, responder, "invalid response", &e)
}

/// Sends the iterable an application returned.
fn send_result(
    py: Python<'_>,
    result: &Bound<'_, PyAny>,
    responder: &Bound<'_, StartResponse>,
) -> Outcome {
    if result.is_instance_of::<PyString>() || result.is_instance_of::<PyBytes>() {
        let e = PyTypeError::new_err(format!(
            "the application returned a {}; it must return an iterable of bytes, e.g. [body]",
            type_name(result)
        ));
        return failure(py, responder, "invalid response", &e);
    }
    if let Ok(wrapper) = result.cast::<FileWrapper>() {
        if let Some((fd, offset, available)) = sendable_file(py, &wrapper.borrow()) {
            if !responder.borrow().started() {
                return never_started(py, responder);
            }
            let sent = responder.borrow_mut().send_file(py, fd, offset, available);
            return match sent {
                Ok(()) => complete(py, responder),
                Err(e) => failure(py, responder, "sending the file failed", &e),
            };
        }
    }
    // A list or tuple is all there already: flush once at the end, not per item.
    let flush_each = !(result.is_instance_of::<PyList>() || result.is_instance_of::<PyTuple>());
    if !flush_each && result.len().ok() == Some(1) {
        if let Ok(Ok(only)) = result.get_item(0).map(|item| item.cast_into::<PyBytes>()) {
            let mut r = responder.borrow_mut();
            if r.started() {
                r.set_content_length(only.as_bytes().len());
            }
        }
    }
    let iter = match result.try_iter() {
        Ok(iter) => iter,
        Err(e) => {
            return failure(
                py,
                responder,
                "the application's response is not iterable",
                &e,
            )
        }
    };
    for chunk in iter {
        let sent = chunk.and_then(|chunk| {
            let bytes = chunk.cast::<PyBytes>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "response body chunks must be bytes, got {}",
                    type_name(&chunk)
                ))
            })?;
            let data = bytes.as_bytes();
            if data.is_empty() {
                // Nothing to send; start_response may even still be called later.
                return Ok(());
            }
            responder.borrow_mut().send(py, data, flush_each)
        });
        if let Err(e) = sent {
            return failure(py, responder, "the application's response failed", &e);
        }
    }
    if !responder.borrow().started() {
        return never_started(py, responder);
    }
    let mut r = responder.borrow_mut();
    if !r.headers_sent() {
        if let Err(e) = r.send(py, &[], false) {
            drop(r);
            return failure(py, responder, "sending the response failed", &e);
        }
    }
    drop(r);
    complete(py, responder)
}

/// The body is over: complete, unless it is shorter than its Content-Length
/// said. Then the client would wait for the rest, or take the next response
/// for it: the response is cut short, which closes the connection.
fn complete(py: Python<'_>, responder: &Bound<'_, StartResponse>) -> Outcome {
    let mut r = responder.borrow_mut();
    let Some((declared, sent)) = r.shortfall() else {
        return Outcome::Complete;
    };
    r.log(
        log::Level::Error,
        &format!("the response ended after {sent} of the {declared} bytes its Content-Length declared; closing the connection"),
    );
    r.abort(py);
    Outcome::Aborted
}

#[cfg(test)]
mod tests;
