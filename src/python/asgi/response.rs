//! The response of one ASGI request as the application sends it: the checks on
//! `http.response.start` (a head that could split the response is refused),
//! and the body counted against what the head declared.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyInt};

use super::backend::Head;
use crate::common::framing::{self, BodyFraming};
use crate::common::transport::Header;
use crate::python::wsgi::response::{type_name, HOP_BY_HOP};

/// Where the response stands.
#[derive(Debug)]
enum State {
    /// No `http.response.start` yet.
    Waiting,
    /// Started; the head waits for the first body bytes, to go out with them.
    Started(Head),
    /// The head went out; more body may follow.
    Streaming,
    /// `more_body` was false: the response is complete.
    Ended,
}

/// What one `http.response.body` message sends.
#[derive(Debug)]
pub struct Piece {
    /// The head, when this is the first piece.
    pub head: Option<Head>,
    /// The bytes the head allows (none for HEAD, 204, 304; no more than the
    /// Content-Length).
    pub data: Vec<u8>,
    /// The Content-Length, when these are the first bytes beyond it.
    pub excess_from: Option<u64>,
}

/// How the application left a response when it returned.
#[derive(Debug)]
pub enum End {
    NeverStarted,
    /// Not ended yet: end it with an empty last piece (with the head, if it
    /// has not gone out), as uvicorn does.
    Flush(Option<Head>),
    Done,
}

#[derive(Debug)]
pub struct Response {
    state: State,
    framing: BodyFraming,
    head_request: bool,
}

impl Response {
    pub fn new(head_request: bool) -> Response {
        Response {
            state: State::Waiting,
            framing: BodyFraming::new(200, None, head_request),
            head_request,
        }
    }

    /// Whether the head went out to the transport.
    pub fn head_sent(&self) -> bool {
        matches!(self.state, State::Streaming | State::Ended)
    }

    pub fn ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    /// How a request must end when it failed now.
    pub fn failure_outcome(&self) -> crate::common::transport::Outcome {
        use crate::common::transport::Outcome;
        if self.head_sent() {
            Outcome::Aborted
        } else {
            Outcome::FAILED
        }
    }

    /// At the end: the declared Content-Length and the bytes sent, when fewer.
    pub fn shortfall(&self) -> Option<(u64, u64)> {
        self.framing.shortfall()
    }

    /// `http.response.start`: checks and keeps the head. Returns the names of
    /// hop-by-hop headers it dropped (the server owns the connection).
    pub fn start(
        &mut self,
        status: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<String>> {
        if !matches!(self.state, State::Waiting) {
            return Err(PyRuntimeError::new_err(
                "http.response.start was sent twice (or after the body)",
            ));
        }
        let status = parse_status(status)?;
        let mut dropped = Vec::new();
        let headers = match headers {
            Some(headers) => parse_headers(headers, &mut dropped)?,
            None => Vec::new(),
        };
        let status_line = status_line(status);
        self.framing = framing::check_head(status, &status_line, &headers, self.head_request)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        self.state = State::Started(Head {
            status,
            status_line,
            headers,
        });
        Ok(dropped)
    }

    /// `http.response.body`: what goes out for it.
    pub fn body(&mut self, body: Option<&Bound<'_, PyAny>>, more: bool) -> PyResult<Piece> {
        let data = match body {
            None => &[][..],
            Some(body) => body_bytes(body)?,
        };
        let mut head = match std::mem::replace(&mut self.state, State::Streaming) {
            State::Waiting => {
                self.state = State::Waiting;
                return Err(PyRuntimeError::new_err(
                    "http.response.body was sent before http.response.start",
                ));
            }
            State::Ended => {
                self.state = State::Ended;
                return Err(PyRuntimeError::new_err(
                    "http.response.body was sent after the response ended (more_body was false)",
                ));
            }
            State::Started(head) => Some(head),
            State::Streaming => None,
        };
        if let Some(head) = head.as_mut().filter(|_| !more) {
            self.declare_length(head, data.len());
        }
        let admitted = self.framing.admit(data.len());
        let excess_from = self.framing.first_excess(data.len() - admitted);
        if !more {
            self.state = State::Ended;
        }
        Ok(Piece {
            head,
            data: data[..admitted].to_vec(),
            excess_from,
        })
    }

    /// A body sent whole in one message gets its length declared, so that the
    /// server need not chunk it (unless the head declared one, or the response
    /// has no body: a length would then describe nothing sent).
    fn declare_length(&mut self, head: &mut Head, len: usize) {
        if self.head_request || framing::status_has_no_body(head.status) {
            return;
        }
        if framing::declared_length(&head.headers) == Ok(None) {
            head.headers
                .push(("content-length".to_string(), len.to_string().into_bytes()));
            self.framing.declare(len as u64);
        }
    }

    /// The application returned: how its response ends.
    pub fn finish(&mut self) -> End {
        match std::mem::replace(&mut self.state, State::Ended) {
            State::Waiting => {
                self.state = State::Waiting;
                End::NeverStarted
            }
            State::Started(mut head) => {
                self.declare_length(&mut head, 0);
                End::Flush(Some(head))
            }
            State::Streaming => End::Flush(None),
            State::Ended => End::Done,
        }
    }
}

/// The bytes of a `body` (bytes, or a bytearray).
fn body_bytes<'a>(body: &'a Bound<'_, PyAny>) -> PyResult<&'a [u8]> {
    if let Ok(bytes) = body.cast::<PyBytes>() {
        return Ok(bytes.as_bytes());
    }
    if let Ok(array) = body.cast::<PyByteArray>() {
        // SAFETY: the bytes are copied (Piece::data) before any Python code
        // could run and resize the bytearray.
        return Ok(unsafe { array.as_bytes() });
    }
    Err(PyTypeError::new_err(format!(
        "http.response.body's 'body' must be bytes, got {}",
        type_name(body)
    )))
}

fn parse_status(status: Option<&Bound<'_, PyAny>>) -> PyResult<u16> {
    let Some(status) = status else {
        return Err(PyValueError::new_err(
            "http.response.start needs a 'status'",
        ));
    };
    if !status.is_instance_of::<PyInt>() || status.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "http.response.start's 'status' must be an int, got {}",
            type_name(status)
        )));
    }
    match status.extract::<u16>() {
        Ok(code) if (100..=999).contains(&code) => Ok(code),
        _ => Err(PyValueError::new_err(format!(
            "invalid HTTP status {status}: it must be a number from 100 to 999"
        ))),
    }
}

/// Headers as ASGI gives them: an iterable of `[name, value]` byte strings.
fn parse_headers(headers: &Bound<'_, PyAny>, dropped: &mut Vec<String>) -> PyResult<Vec<Header>> {
    let mut out = Vec::new();
    let items = headers.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "http.response.start's 'headers' must be an iterable of [name, value] pairs, got {}",
            type_name(headers)
        ))
    })?;
    for item in items {
        let (name, value) = header_pair(&item?)?;
        let name = std::str::from_utf8(&name)
            .ok()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "invalid response header name {:?}",
                    String::from_utf8_lossy(&name)
                ))
            })?
            .to_string();
        framing::check_header(&name, &value).map_err(|e| {
            PyValueError::new_err(format!("{e}: {:?}", String::from_utf8_lossy(&value)))
        })?;
        if HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(&name)) {
            dropped.push(name);
            continue;
        }
        out.push((name, value));
    }
    Ok(out)
}

/// One header: two byte strings.
fn header_pair(item: &Bound<'_, PyAny>) -> PyResult<(Vec<u8>, Vec<u8>)> {
    let wrong = || {
        PyTypeError::new_err(format!(
            "each response header must be a [name, value] pair of bytes, got {}",
            type_name(item)
        ))
    };
    let mut parts = item.try_iter().map_err(|_| wrong())?;
    let (Some(name), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(wrong());
    };
    let (name, value) = (name?, value?);
    let (Ok(name), Ok(value)) = (name.cast::<PyBytes>(), value.cast::<PyBytes>()) else {
        return Err(PyTypeError::new_err(format!(
            "response header names and values must be bytes, got ({}, {})",
            type_name(&name),
            type_name(&value)
        )));
    };
    Ok((name.as_bytes().to_vec(), value.as_bytes().to_vec()))
}

/// The status line for a code: with its reason phrase when it has a standard one.
pub fn status_line(code: u16) -> String {
    match reason(code) {
        Some(reason) => format!("{code} {reason}"),
        None => code.to_string(),
    }
}

fn reason(code: u16) -> Option<&'static str> {
    Some(match code {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        207 => "Multi-Status",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        423 => "Locked",
        424 => "Failed Dependency",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        511 => "Network Authentication Required",
        _ => return None,
    })
}
