//! File-like objects that write to the server's error log, a line at a time:
//! `wsgi.errors`, and `sys.stdout`/`sys.stderr` of the embedded interpreter,
//! with a binary `buffer` as real standard streams have (Mercurial and other
//! tools write bytes to `sys.stdout.buffer`).

use pyo3::prelude::*;

/// Text written here becomes `gateway:` lines in the server's error log.
#[pyclass(module = "gateway")]
pub struct LogStream {
    prefix: String,
    level: log::Level,
    pending: String,
    /// The start of a UTF-8 sequence written to `buffer`, which the next bytes complete.
    partial: Vec<u8>,
}

impl LogStream {
    /// `wsgi.errors` of one request: lines name the request's method and URI.
    pub fn for_request(method: &[u8], uri: &[u8]) -> LogStream {
        LogStream {
            prefix: format!(
                "{} {}",
                String::from_utf8_lossy(method),
                String::from_utf8_lossy(uri)
            ),
            level: log::Level::Error,
            pending: String::new(),
            partial: Vec::new(),
        }
    }

    /// A process-wide stream such as `sys.stderr`, tagged with its name.
    pub fn named(name: &str, level: log::Level) -> LogStream {
        LogStream {
            prefix: format!("python {name}"),
            level,
            pending: String::new(),
            partial: Vec::new(),
        }
    }

    /// Takes bytes from `buffer`: UTF-8 (invalid sequences replaced), an
    /// unfinished last sequence kept for the next write.
    fn write_bytes(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        let ready = self.partial.len() - incomplete_tail(&self.partial);
        self.pending
            .push_str(&String::from_utf8_lossy(&self.partial[..ready]));
        self.partial.drain(..ready);
        self.emit(false);
    }

    /// Text written after bytes ends their unfinished sequence, if any.
    fn end_partial(&mut self) {
        if !self.partial.is_empty() {
            self.pending
                .push_str(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
    }

    fn emit(&mut self, all: bool) {
        if all {
            self.end_partial();
        }
        while let Some(i) = self.pending.find('\n') {
            log::log!(self.level, "{}: {}", self.prefix, &self.pending[..i]);
            self.pending.drain(..=i);
        }
        if all && !self.pending.is_empty() {
            log::log!(self.level, "{}: {}", self.prefix, self.pending);
            self.pending.clear();
        }
    }
}

#[pymethods]
impl LogStream {
    fn write(&mut self, text: &str) -> usize {
        self.end_partial();
        self.pending.push_str(text);
        self.emit(false);
        text.chars().count()
    }

    fn writelines(&mut self, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            self.write(line?.extract::<&str>()?);
        }
        Ok(())
    }

    fn flush(&mut self) {
        self.emit(true);
    }

    fn isatty(&self) -> bool {
        false
    }

    fn writable(&self) -> bool {
        true
    }

    /// The process's own stderr, which both servers point at their error log;
    /// faulthandler and C extensions write there directly.
    fn fileno(&self) -> i32 {
        2
    }

    #[getter]
    fn encoding(&self) -> &'static str {
        "utf-8"
    }

    #[getter]
    fn closed(&self) -> bool {
        false
    }

    /// A binary view of this stream: bytes are decoded as UTF-8 (invalid
    /// sequences replaced) and written as text.
    #[getter]
    fn buffer(slf: Py<Self>) -> LogBuffer {
        LogBuffer { text: slf }
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.emit(true);
    }
}

/// The `buffer` of a [`LogStream`]: takes bytes.
#[pyclass(module = "gateway")]
pub struct LogBuffer {
    text: Py<LogStream>,
}

/// How many bytes at the end of `data` begin a UTF-8 sequence that is not complete yet.
fn incomplete_tail(data: &[u8]) -> usize {
    for back in 1..=data.len().min(3) {
        let b = data[data.len() - back];
        if b & 0xC0 != 0x80 {
            let len = match b {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if len > back { back } else { 0 };
        }
    }
    0
}

#[pymethods]
impl LogBuffer {
    fn write(&self, py: Python<'_>, data: &[u8]) -> PyResult<usize> {
        self.text.try_borrow_mut(py)?.write_bytes(data);
        Ok(data.len())
    }

    fn writelines(&self, py: Python<'_>, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            self.write(py, line?.extract::<&[u8]>()?)?;
        }
        Ok(())
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.text.try_borrow_mut(py)?.emit(true);
        Ok(())
    }

    fn isatty(&self) -> bool {
        false
    }

    fn writable(&self) -> bool {
        true
    }

    fn fileno(&self) -> i32 {
        2
    }

    #[getter]
    fn closed(&self) -> bool {
        false
    }
}

/// Points `sys.stdout` and `sys.stderr` at the error log, as mod_wsgi users expect.
pub fn redirect_std_streams(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    sys.setattr(
        "stdout",
        Bound::new(py, LogStream::named("stdout", log::Level::Info))?,
    )?;
    sys.setattr(
        "stderr",
        Bound::new(py, LogStream::named("stderr", log::Level::Error))?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::incomplete_tail;

    #[test]
    fn only_an_unfinished_utf8_sequence_waits() {
        let euro = "€".as_bytes();
        assert_eq!(incomplete_tail(b"plain"), 0);
        assert_eq!(incomplete_tail(euro), 0);
        assert_eq!(incomplete_tail(&euro[..1]), 1);
        assert_eq!(incomplete_tail(&[b"a", &euro[..2]].concat()), 2);
        assert_eq!(incomplete_tail(&[0x80, 0x80, 0x80]), 0);
        assert_eq!(incomplete_tail(b""), 0);
    }
}
