//! Test doubles for the Python layer's unit tests: a request body that yields
//! given chunks, a response channel that records what reached it, and helpers
//! to run Python code against them.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::common::transport::{Header, RequestBody, ResponseChannel};

/// Runs `f` with the GIL, starting the interpreter on first use. Tests run on
/// parallel threads: the GIL serialises their Python parts.
pub fn with_py<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
    Python::initialize();
    Python::attach(f)
}

/// Evaluates a Python expression in which `vars` are the global names.
pub fn eval<'py>(
    py: Python<'py>,
    expr: &str,
    vars: &[(&str, &Bound<'py, PyAny>)],
) -> PyResult<Bound<'py, PyAny>> {
    let globals = names(py, vars);
    let code = CString::new(expr).expect("test code has no NUL");
    py.eval(&code, Some(&globals), None)
}

/// Runs Python statements in which `vars` are global names; returns the globals.
pub fn run<'py>(
    py: Python<'py>,
    code: &str,
    vars: &[(&str, &Bound<'py, PyAny>)],
) -> PyResult<Bound<'py, PyDict>> {
    let globals = names(py, vars);
    let code = CString::new(code).expect("test code has no NUL");
    py.run(&code, Some(&globals), None)?;
    Ok(globals)
}

fn names<'py>(py: Python<'py>, vars: &[(&str, &Bound<'py, PyAny>)]) -> Bound<'py, PyDict> {
    let globals = PyDict::new(py);
    for (name, value) in vars {
        globals.set_item(name, value).expect("str keys");
    }
    globals
}

/// The exception of a failed call as the application sees it: `Type: message`.
pub fn raised<T: std::fmt::Debug>(py: Python<'_>, result: PyResult<T>) -> String {
    let err = result.expect_err("the call should have raised");
    let name = err.get_type(py).name().expect("type name").to_string();
    format!("{name}: {}", err.value(py))
}

/// The bytes of a Python `bytes` object.
pub fn bytes_of(obj: &Bound<'_, PyAny>) -> Vec<u8> {
    obj.extract::<Vec<u8>>().expect("a bytes object")
}

/// A request body delivering its chunks one per read (or in parts when a read's
/// buffer is smaller), then an end; an `Err` chunk is returned as that read's error.
pub struct ChunkBody {
    chunks: VecDeque<io::Result<Vec<u8>>>,
    /// The size of each read's buffer, in order; shared with the test.
    pub reads: Arc<Mutex<Vec<usize>>>,
}

impl ChunkBody {
    pub fn new(chunks: Vec<io::Result<Vec<u8>>>) -> ChunkBody {
        assert!(
            chunks
                .iter()
                .all(|c| c.as_ref().map_or(true, |c| !c.is_empty())),
            "an empty chunk would read as the end of the body"
        );
        ChunkBody {
            chunks: chunks.into(),
            reads: Arc::default(),
        }
    }

    /// A body of these byte strings.
    pub fn of(chunks: &[&[u8]]) -> ChunkBody {
        ChunkBody::new(chunks.iter().map(|c| Ok(c.to_vec())).collect())
    }
}

impl RequestBody for ChunkBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads.lock().unwrap().push(buf.len());
        match self.chunks.pop_front() {
            None => Ok(0),
            Some(Err(e)) => Err(e),
            Some(Ok(mut chunk)) => {
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.chunks.push_front(Ok(chunk.split_off(n)));
                }
                Ok(n)
            }
        }
    }
}

/// What reached a [`RecordingChannel`].
#[derive(Debug, Default)]
pub struct Sent {
    /// Each `start`: code, status line, headers.
    pub starts: Vec<(u16, String, Vec<Header>)>,
    /// Each `write`: data and flush.
    pub writes: Vec<(Vec<u8>, bool)>,
    pub files: Vec<(RawFd, u64, u64)>,
    pub aborts: usize,
    pub logs: Vec<(log::Level, String)>,
}

impl Sent {
    /// The body bytes the client received.
    pub fn body(&self) -> Vec<u8> {
        self.writes.iter().flat_map(|(d, _)| d.clone()).collect()
    }

    /// The log lines at `level`.
    pub fn logged(&self, level: log::Level) -> Vec<&str> {
        self.logs
            .iter()
            .filter(|(l, _)| *l == level)
            .map(|(_, line)| line.as_str())
            .collect()
    }
}

/// A response channel that records what it is given. It can refuse the head
/// (as a server does with a head it cannot send) or fail writes (as when the
/// client has gone).
#[derive(Default)]
pub struct RecordingChannel {
    sent: Arc<Mutex<Sent>>,
    pub refuse_head: bool,
    pub fail_writes: bool,
}

impl RecordingChannel {
    /// A channel, and the record the test reads.
    pub fn new() -> (RecordingChannel, Record) {
        let channel = RecordingChannel::default();
        let record = Record(channel.sent.clone());
        (channel, record)
    }
}

/// The test's view of what reached a [`RecordingChannel`].
#[derive(Clone)]
pub struct Record(Arc<Mutex<Sent>>);

impl Record {
    pub fn get(&self) -> MutexGuard<'_, Sent> {
        self.0.lock().unwrap()
    }
}

impl ResponseChannel for RecordingChannel {
    fn start(&mut self, status: u16, status_line: &str, headers: &[Header]) -> io::Result<()> {
        if self.refuse_head {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the head is too large",
            ));
        }
        let mut sent = self.sent.lock().unwrap();
        sent.starts
            .push((status, status_line.to_string(), headers.to_vec()));
        Ok(())
    }

    fn write(&mut self, data: &[u8], flush: bool) -> io::Result<()> {
        if self.fail_writes {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "broken pipe"));
        }
        self.sent
            .lock()
            .unwrap()
            .writes
            .push((data.to_vec(), flush));
        Ok(())
    }

    fn send_file(&mut self, fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        self.sent.lock().unwrap().files.push((fd, offset, len));
        Ok(())
    }

    fn abort(&mut self) {
        self.sent.lock().unwrap().aborts += 1;
    }

    fn log(&self, level: log::Level, line: &str) {
        self.sent
            .lock()
            .unwrap()
            .logs
            .push((level, line.to_string()));
    }
}
