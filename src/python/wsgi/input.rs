//! `wsgi.input`: the request body as a file-like object.

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::common::transport::RequestBody;

/// The server reads at most this much per call, so large bodies stream through.
const READ_BLOCK: usize = 64 * 1024;

/// The object behind `wsgi.input`. Once the request is over it reads as empty,
/// even if the application kept a reference to it.
#[pyclass(module = "gateway")]
pub struct Input {
    body: Option<Box<dyn RequestBody>>,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl Input {
    pub fn new(body: Box<dyn RequestBody>) -> Input {
        Input {
            body: Some(body),
            buf: Vec::new(),
            pos: 0,
            eof: false,
        }
    }

    /// Cuts the link to the server's request (which is about to be freed).
    pub fn detach(&mut self) {
        self.body = None;
        self.eof = true;
        self.buf = Vec::new();
        self.pos = 0;
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads one more block from the server; false at the end of the body.
    fn fill(&mut self, py: Python<'_>) -> PyResult<bool> {
        let Some(body) = self.body.as_mut().filter(|_| !self.eof) else {
            return Ok(false);
        };
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let start = self.buf.len();
        self.buf.resize(start + READ_BLOCK, 0);
        let buf = &mut self.buf[start..];
        let result = py.detach(|| body.read(buf));
        match result {
            Ok(n) => {
                self.buf.truncate(start + n);
                self.eof = n == 0;
                Ok(n > 0)
            }
            Err(e) => {
                self.buf.truncate(start);
                self.eof = true;
                Err(PyOSError::new_err(format!(
                    "reading the request body failed: {e}"
                )))
            }
        }
    }

    fn take<'py>(&mut self, py: Python<'py>, n: usize) -> Bound<'py, PyBytes> {
        let n = n.min(self.buffered());
        let bytes = PyBytes::new(py, &self.buf[self.pos..self.pos + n]);
        self.pos += n;
        bytes
    }

    fn line<'py>(
        &mut self,
        py: Python<'py>,
        limit: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut scanned = 0;
        loop {
            let window = &self.buf[self.pos..];
            if let Some(i) = window[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i + 1;
                return Ok(self.take(py, limit.map_or(end, |l| l.min(end))));
            }
            scanned = window.len();
            if limit.is_some_and(|l| scanned >= l) || !self.fill(py)? {
                return Ok(self.take(py, limit.unwrap_or(usize::MAX)));
            }
        }
    }
}

/// Python's convention: None or a negative size means "no limit".
fn limit(size: Option<isize>) -> Option<usize> {
    size.and_then(|s| usize::try_from(s).ok())
}

#[pymethods]
impl Input {
    #[pyo3(signature = (size=None))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        match limit(size) {
            None => {
                while self.fill(py)? {}
                Ok(self.take(py, usize::MAX))
            }
            Some(n) => {
                while self.buffered() < n && self.fill(py)? {}
                Ok(self.take(py, n))
            }
        }
    }

    #[pyo3(signature = (size=None))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<isize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.line(py, limit(size))
    }

    #[pyo3(signature = (hint=None))]
    fn readlines<'py>(
        &mut self,
        py: Python<'py>,
        hint: Option<isize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let lines = PyList::empty(py);
        let hint = limit(hint).filter(|&h| h > 0);
        let mut total = 0;
        loop {
            let line = self.line(py, None)?;
            let n = line.as_bytes().len();
            if n == 0 {
                return Ok(lines);
            }
            lines.append(line)?;
            total += n;
            if hint.is_some_and(|h| total >= h) {
                return Ok(lines);
            }
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.line(py, None)?;
        Ok((!line.as_bytes().is_empty()).then_some(line))
    }
}

#[cfg(test)]
mod tests;
