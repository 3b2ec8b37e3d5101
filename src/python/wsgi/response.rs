//! `start_response`, the `write()` callable, and the checks on what an
//! application sends.

use std::os::fd::RawFd;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};

use crate::common::framing::{self, BodyFraming, HeadError};
use crate::common::log::request_line;

use crate::common::transport::{Header, ResponseChannel};

/// Hop-by-hop headers belong to the server's connection, never to the application.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

/// The `start_response` callable of one request; its `write` method is the
/// `write()` callable of PEP 3333.
#[pyclass(module = "gateway")]
pub struct StartResponse {
    channel: Option<Box<dyn ResponseChannel>>,
    status: Option<(u16, String)>,
    headers: Vec<Header>,
    /// How much body the head allows (set with the status).
    framing: BodyFraming,
    headers_sent: bool,
    client_gone: bool,
    method: Vec<u8>,
    uri: Vec<u8>,
}

impl StartResponse {
    pub fn new(channel: Box<dyn ResponseChannel>, method: &[u8], uri: &[u8]) -> StartResponse {
        StartResponse {
            channel: Some(channel),
            status: None,
            headers: Vec::new(),
            framing: BodyFraming::new(200, None, false),
            headers_sent: false,
            client_gone: false,
            method: method.to_vec(),
            uri: uri.to_vec(),
        }
    }

    /// Whether the status and headers have gone to the client.
    pub fn headers_sent(&self) -> bool {
        self.headers_sent
    }

    /// Whether a write failed because the client went away.
    pub fn client_gone(&self) -> bool {
        self.client_gone
    }

    /// Whether the application called start_response.
    pub fn started(&self) -> bool {
        self.status.is_some()
    }

    /// Declares the body's length when the application did not, so the server
    /// need not chunk a body it already has whole.
    pub fn set_content_length(&mut self, len: usize) {
        if !self.headers_sent && framing::declared_length(&self.headers) == Ok(None) {
            self.headers
                .push(("Content-Length".to_string(), len.to_string().into_bytes()));
            self.framing.declare(len as u64);
        }
    }

    /// At the end of the body: the declared Content-Length and the bytes sent,
    /// when fewer were sent.
    pub fn shortfall(&self) -> Option<(u64, u64)> {
        self.framing.shortfall()
    }

    /// Logs a line about this request.
    pub fn log(&self, level: log::Level, msg: &str) {
        let line = request_line(&self.method, &self.uri, msg);
        match &self.channel {
            Some(channel) => channel.log(level, &line),
            None => log::log!(level, "{}", line.trim_start_matches("gateway: ")),
        }
    }

    /// Logs a Python exception with its traceback, a log line per traceback line.
    pub fn log_exception(&self, py: Python<'_>, context: &str, err: &PyErr) {
        self.log(log::Level::Error, context);
        for line in format_exception(py, err).lines() {
            self.log(log::Level::Error, line);
        }
    }

    /// Sends body bytes, sending the headers first if they have not gone yet.
    /// Bytes beyond the declared Content-Length (or any, for HEAD, 204 and 304)
    /// are dropped: on a keep-alive connection the client would read them as
    /// the next response.
    pub fn send(&mut self, py: Python<'_>, data: &[u8], flush: bool) -> PyResult<()> {
        if self.status.is_none() {
            return Err(PyRuntimeError::new_err(
                "the application sent body data before calling start_response()",
            ));
        }
        let admitted = self.framing.admit(data.len());
        if let Some(limit) = self.framing.first_excess(data.len() - admitted) {
            self.log(
                log::Level::Error,
                &format!("the application sent more than its Content-Length of {limit} bytes; the excess was dropped"),
            );
        }
        let data = &data[..admitted];
        let StartResponse {
            channel,
            status,
            headers,
            headers_sent,
            ..
        } = self;
        let Some(channel) = channel.as_mut() else {
            return Err(PyOSError::new_err("the request is over"));
        };
        let (code, line) = status.as_ref().expect("checked above");
        let start = !*headers_sent;
        let only_buffers = channel.only_buffers(data.len(), flush);
        let mut send = || {
            if start {
                channel.start(*code, line, headers)?;
            }
            if data.is_empty() && !flush {
                return Ok(());
            }
            channel.write(data, flush)
        };
        let result = if only_buffers {
            send()
        } else {
            py.detach(send)
        };
        *headers_sent = true;
        result.map_err(|e| self.send_error(start, e))
    }

    /// The exception for a failed send: the server refused the head (nothing
    /// went out: the request fails with a 500), or the client went away.
    fn send_error(&mut self, starting: bool, e: std::io::Error) -> PyErr {
        if starting && e.kind() == std::io::ErrorKind::InvalidData {
            self.headers_sent = false;
            return PyValueError::new_err(format!("the response head was refused: {e}"));
        }
        self.client_gone = true;
        PyOSError::new_err(format!("client closed the connection: {e}"))
    }

    /// Sends the headers, then up to `len` bytes of an open file (no more than the
    /// declared Content-Length) through the server's file path.
    pub fn send_file(&mut self, py: Python<'_>, fd: RawFd, offset: u64, len: u64) -> PyResult<()> {
        self.send(py, &[], false)?;
        let len = self.framing.admit(len as usize) as u64;
        if len == 0 {
            return Ok(());
        }
        let channel = self.channel.as_mut().expect("send checked the channel");
        let result = py.detach(|| channel.send_file(fd, offset, len));
        result.map_err(|e| {
            self.client_gone = true;
            PyOSError::new_err(format!("client closed the connection: {e}"))
        })
    }

    /// Cuts a response short after its headers were sent.
    pub fn abort(&mut self, py: Python<'_>) {
        if let Some(channel) = self.channel.as_mut() {
            py.detach(|| channel.abort());
        }
    }

    /// Ends the request: the application may keep a reference to this object,
    /// but it no longer reaches the server's request.
    pub fn detach(&mut self) {
        self.channel = None;
    }
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info=None))]
    fn __call__<'py>(
        mut slf: PyRefMut<'py, Self>,
        status: &Bound<'py, PyAny>,
        headers: &Bound<'py, PyAny>,
        exc_info: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match exc_info.filter(|e| !e.is_none()) {
            Some(exc_info) if slf.headers_sent => {
                // Too late to change the response: re-raise, as PEP 3333 requires.
                let value = exc_info.get_item(1)?;
                return Err(PyErr::from_value(value));
            }
            Some(_) => {}
            None if slf.status.is_some() => {
                return Err(PyRuntimeError::new_err(
                    "start_response() was called a second time without exc_info",
                ));
            }
            None => {}
        }
        let status = parse_status(status)?;
        let headers = parse_headers(headers, &mut |name| {
            slf.log(
                log::Level::Warn,
                &format!("dropped hop-by-hop response header '{name}'"),
            )
        })?;
        let head_request = slf.method == b"HEAD";
        slf.framing =
            framing::check_head(status.0, &status.1, &headers, head_request).map_err(head_error)?;
        slf.status = Some(status);
        slf.headers = headers;
        let py = slf.py();
        slf.into_pyobject(py)?.into_any().getattr("write")
    }

    /// The `write()` callable: sends `data` at once.
    fn write(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = data.cast::<PyBytes>().map_err(|_| {
            PyTypeError::new_err(format!("write() takes bytes, got {}", type_name(data)))
        })?;
        self.send(py, data.as_bytes(), true)
    }
}

pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn parse_status(status: &Bound<'_, PyAny>) -> PyResult<(u16, String)> {
    let s = status
        .cast::<PyString>()
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "status must be a str like '200 OK', got {}",
                type_name(status)
            ))
        })?
        .to_str()?;
    let code = framing::check_status(s).map_err(head_error)?;
    Ok((code, s.to_string()))
}

/// A refused response head, as the exception start_response raises.
fn head_error(e: HeadError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn parse_headers(
    headers: &Bound<'_, PyAny>,
    dropped: &mut dyn FnMut(&str),
) -> PyResult<Vec<Header>> {
    let mut out = Vec::new();
    for item in headers.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "headers must be a list of (name, value) tuples, got {}",
            type_name(headers)
        ))
    })? {
        let item = item?;
        let pair = item
            .cast::<PyTuple>()
            .ok()
            .filter(|t| t.len() == 2)
            .ok_or_else(|| {
                PyTypeError::new_err(format!(
                    "each header must be a (name, value) tuple, got {}",
                    type_name(&item)
                ))
            })?;
        let (name, value) = (pair.get_item(0)?, pair.get_item(1)?);
        let (Ok(name), Ok(value)) = (name.cast::<PyString>(), value.cast::<PyString>()) else {
            return Err(PyTypeError::new_err(format!(
                "header names and values must be str, got ({}, {})",
                type_name(&name),
                type_name(&value)
            )));
        };
        let name = name.to_str()?;
        let value = value.to_str()?;
        framing::check_header(name, value.as_bytes())
            .map_err(|e| PyValueError::new_err(format!("{e}: {value:?}")))?;
        let Some(value) = value
            .chars()
            .map(|c| u8::try_from(c as u32).ok())
            .collect::<Option<Vec<u8>>>()
        else {
            return Err(PyValueError::new_err(format!(
                "response header {name} is not latin-1: {value:?}"
            )));
        };
        if HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            dropped(name);
            continue;
        }
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// Formats an exception with its traceback, as Python would print it.
pub fn format_exception(py: Python<'_>, err: &PyErr) -> String {
    let formatted = py
        .import("traceback")
        .and_then(|tb| {
            tb.call_method1(
                "format_exception",
                (err.get_type(py), err.value(py), err.traceback(py)),
            )
        })
        .and_then(|lines| {
            lines
                .try_iter()?
                .map(|l| l?.extract::<String>())
                .collect::<PyResult<Vec<_>>>()
        });
    match formatted {
        Ok(lines) => lines.concat(),
        Err(_) => err.to_string(),
    }
}

#[cfg(test)]
mod tests;
