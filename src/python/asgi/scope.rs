//! The HTTP connection scope of one request, from an owned copy of its head
//! (the head is borrowed from the server's records; the scope is built later,
//! on the event loop thread).

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::common::cgi::{header_key, RequestHead};

/// What the scope needs of a request head, owned so that it can travel to the
/// event loop thread.
#[derive(Debug, Default, Clone)]
pub struct OwnedHead {
    pub method: Vec<u8>,
    pub script_name: Vec<u8>,
    pub path_info: Vec<u8>,
    pub query_string: Vec<u8>,
    pub request_uri: Vec<u8>,
    pub protocol: Vec<u8>,
    pub server_name: Vec<u8>,
    pub server_port: u16,
    pub server_addr: Vec<u8>,
    pub remote_addr: Vec<u8>,
    pub remote_port: u16,
    pub https: bool,
    /// Lower-case names, in arrival order, repeats kept; only the headers the
    /// project lets reach applications (see [`header_key`]).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl OwnedHead {
    pub fn new(head: &RequestHead<'_>) -> OwnedHead {
        let headers = head
            .headers
            .iter()
            .filter(|(name, _)| header_key(name).is_some())
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_vec()))
            .collect();
        OwnedHead {
            method: head.method.to_vec(),
            script_name: head.script_name.to_vec(),
            path_info: head.path_info.to_vec(),
            query_string: head.query_string.to_vec(),
            request_uri: head.request_uri.to_vec(),
            protocol: head.protocol.to_vec(),
            server_name: head.server_name.to_vec(),
            server_port: head.server_port,
            server_addr: head.server_addr.to_vec(),
            remote_addr: head.remote_addr.to_vec(),
            remote_port: head.remote_port,
            https: head.https,
            headers,
        }
    }

    /// The body length the request declares, if it declares one: the body
    /// then ends after that many bytes without another read.
    pub fn content_length(&self) -> Option<u64> {
        let (_, value) = self.headers.iter().find(|(n, _)| n == b"content-length")?;
        std::str::from_utf8(value).ok()?.trim().parse().ok()
    }
}

/// ASGI's `http_version` for a request line's protocol.
pub fn http_version(protocol: &[u8]) -> &'static str {
    match protocol {
        b"HTTP/1.0" => "1.0",
        b"HTTP/2.0" | b"HTTP/2" => "2",
        b"HTTP/3.0" | b"HTTP/3" => "3",
        _ => "1.1",
    }
}

/// The path part of a request target (what precedes `?`).
pub fn raw_path(request_uri: &[u8]) -> &[u8] {
    let end = request_uri
        .iter()
        .position(|&c| c == b'?')
        .unwrap_or(request_uri.len());
    &request_uri[..end]
}

/// The `asgi` key of every scope.
pub fn asgi_version(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let asgi = PyDict::new(py);
    asgi.set_item(intern!(py, "version"), intern!(py, "3.0"))?;
    asgi.set_item(intern!(py, "spec_version"), intern!(py, "2.4"))?;
    Ok(asgi)
}

/// Builds the `http` scope of a request (its `state` is added by the glue,
/// from the application's lifespan).
///
/// `path` is the decoded path as UTF-8; bytes that are not UTF-8 become
/// U+FFFD, as uvicorn's `unquote` does: a str with surrogates would break the
/// first `.encode()` a framework calls on it. `raw_path` keeps the bytes.
pub fn build<'py>(py: Python<'py>, head: &OwnedHead) -> PyResult<Bound<'py, PyDict>> {
    let scope = PyDict::new(py);
    scope.set_item(intern!(py, "type"), intern!(py, "http"))?;
    scope.set_item(intern!(py, "asgi"), asgi_version(py)?)?;
    scope.set_item(intern!(py, "http_version"), http_version(&head.protocol))?;
    let method = String::from_utf8_lossy(&head.method);
    scope.set_item(intern!(py, "method"), PyString::new(py, &method))?;
    let scheme = if head.https { "https" } else { "http" };
    scope.set_item(intern!(py, "scheme"), scheme)?;
    let mut path = head.script_name.clone();
    path.extend_from_slice(&head.path_info);
    scope.set_item(intern!(py, "path"), String::from_utf8_lossy(&path))?;
    let raw = PyBytes::new(py, raw_path(&head.request_uri));
    scope.set_item(intern!(py, "raw_path"), raw)?;
    let root = String::from_utf8_lossy(&head.script_name);
    scope.set_item(intern!(py, "root_path"), root)?;
    let query = PyBytes::new(py, &head.query_string);
    scope.set_item(intern!(py, "query_string"), query)?;
    scope.set_item(intern!(py, "headers"), headers(py, head)?)?;
    scope.set_item(intern!(py, "client"), client(py, head)?)?;
    scope.set_item(intern!(py, "server"), server(py, head)?)?;
    Ok(scope)
}

fn headers<'py>(py: Python<'py>, head: &OwnedHead) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for (name, value) in &head.headers {
        let pair = PyTuple::new(py, [PyBytes::new(py, name), PyBytes::new(py, value)])?;
        list.append(pair)?;
    }
    Ok(list)
}

/// `[host, port]` of the client; None when the server has no address for it
/// (a Unix socket).
fn client<'py>(py: Python<'py>, head: &OwnedHead) -> PyResult<Bound<'py, PyAny>> {
    if head.remote_addr.is_empty() {
        return Ok(py.None().into_bound(py));
    }
    let host = String::from_utf8_lossy(&head.remote_addr);
    Ok(PyTuple::new(
        py,
        [
            host.into_pyobject(py)?.into_any(),
            head.remote_port.into_pyobject(py)?.into_any(),
        ],
    )?
    .into_any())
}

/// `[host, port]` the request came in on: the listening address, or the
/// server's name when the address is unknown.
fn server<'py>(py: Python<'py>, head: &OwnedHead) -> PyResult<Bound<'py, PyAny>> {
    let host = if head.server_addr.is_empty() {
        &head.server_name
    } else {
        &head.server_addr
    };
    let host = String::from_utf8_lossy(host);
    Ok(PyTuple::new(
        py,
        [
            host.into_pyobject(py)?.into_any(),
            head.server_port.into_pyobject(py)?.into_any(),
        ],
    )?
    .into_any())
}
