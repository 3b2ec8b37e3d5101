//! Loading WSGI scripts into the interpreter, once per process and script.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use std::sync::LazyLock;

use super::ServerInfo;
use crate::common::config::{interpreter_clash, AppSpec};
use pyo3::exceptions::PyRuntimeError;

/// Loaded callables of this process. A script that failed to load is retried on
/// the next request (the author may have fixed it), like mod_wsgi does.
static APPS: LazyLock<Mutex<HashMap<AppSpec, Py<PyAny>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Python side of loading: a module of its own per script (like mod_wsgi), any file
/// extension, and the script's directory on sys.path so it can import its neighbours.
/// One thread loads a script while the others wait on a Python lock (which releases
/// the GIL, as the import itself may).
const LOADER: &std::ffi::CStr = cr#"
import importlib.machinery, importlib.util, os, sys, threading

_lock = threading.Lock()
_loaded = {}

def load(path, callable_name, module_name):
    with _lock:
        app = _loaded.get(module_name)
        if app is None:
            app = _loaded[module_name] = _load(path, callable_name, module_name)
        return app

def _load(path, callable_name, module_name):
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    try:
        app = getattr(module, callable_name)
    except AttributeError:
        raise LookupError(f"{path} defines no {callable_name!r}: name the WSGI callable with FILE:CALLABLE") from None
    if not callable(app):
        raise TypeError(f"{callable_name!r} in {path} is not callable")
    return app
"#;

fn module_name(spec: &AppSpec) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    spec.hash(&mut h);
    format!("_gateway_app_{:016x}", h.finish())
}

/// The script whose applications this process's interpreter runs, when it may
/// run only one.
static OWNER: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Claims the interpreter for `spec`'s script, unless scripts may share it;
/// another script's claim is an error that says what to do. The configuration
/// tests refuse what they can see; this catches the rest (Apache decides a
/// mount's mode per request, from its <Location> and <Directory> sections).
fn claim(spec: &AppSpec, info: &ServerInfo) -> PyResult<()> {
    if info.shared_interpreter {
        return Ok(());
    }
    let mut owner = OWNER.lock().unwrap_or_else(|e| e.into_inner());
    match owner.as_ref() {
        Some(first) if *first != spec.file => Err(PyRuntimeError::new_err(interpreter_clash(
            info.server,
            (first, ""),
            (&spec.file, ""),
        ))),
        Some(_) => Ok(()),
        None => {
            *owner = Some(spec.file.clone());
            Ok(())
        }
    }
}

/// Returns the callable for `spec`, loading its script on first use.
pub fn get<'py>(py: Python<'py>, spec: &AppSpec, info: &ServerInfo) -> PyResult<Bound<'py, PyAny>> {
    if let Some(app) = APPS.lock().unwrap_or_else(|e| e.into_inner()).get(spec) {
        return Ok(app.bind(py).clone());
    }
    claim(spec, info)?;
    static LOAD: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let load = LOAD.get_or_try_init(py, || -> PyResult<_> {
        let globals = PyDict::new(py);
        py.run(LOADER, Some(&globals), None)?;
        Ok(globals
            .get_item("load")?
            .expect("the loader defines load()")
            .unbind())
    })?;
    let app = load.bind(py).call1((
        spec.file.to_string_lossy().as_ref(),
        spec.callable.as_str(),
        module_name(spec),
    ))?;
    APPS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(spec.clone(), app.clone().unbind());
    Ok(app)
}
