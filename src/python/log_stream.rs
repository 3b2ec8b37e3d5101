//! File-like objects that write to the server's error log, a line at a time:
//! `wsgi.errors`, and `sys.stdout`/`sys.stderr` of the embedded interpreter.

use pyo3::prelude::*;

/// Text written here becomes `gateway:` lines in the server's error log.
#[pyclass(module = "gateway")]
pub struct LogStream {
    prefix: String,
    level: log::Level,
    pending: String,
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
        }
    }

    /// A process-wide stream such as `sys.stderr`, tagged with its name.
    pub fn named(name: &str, level: log::Level) -> LogStream {
        LogStream {
            prefix: format!("python {name}"),
            level,
            pending: String::new(),
        }
    }

    fn emit(&mut self, all: bool) {
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
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.emit(true);
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
