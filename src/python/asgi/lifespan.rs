//! Lifespan, the Rust side: one `Lifespan` (see `glue.py`) per application
//! and process, started by its first request; shutdown when the loop stops;
//! what it reports, in the server's log.

use std::cell::RefCell;
use std::collections::HashMap;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;

use super::event_loop::SHUTDOWN_WAIT;
use crate::common::config::AppSpec;
use crate::python::wsgi::response::format_exception;

thread_local! {
    /// The loop thread's lifespans, by application; and the shutdown task.
    static LIFESPANS: RefCell<HashMap<AppSpec, Py<PyAny>>> = RefCell::new(HashMap::new());
    static SHUTDOWN: RefCell<Option<Py<PyAny>>> = const { RefCell::new(None) };
}

static LIFESPAN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static SHUTDOWN_ALL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The lifespan of `spec`'s application `app`, started on first use.
pub fn get<'py>(
    py: Python<'py>,
    spec: &AppSpec,
    app: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    if let Some(lifespan) = LIFESPANS.with(|l| l.borrow().get(spec).map(|l| l.clone_ref(py))) {
        return Ok(lifespan.into_bound(py));
    }
    let class = LIFESPAN.get_or_try_init(py, || super::glue(py, "Lifespan"))?;
    let name = format!("{}:{}", spec.file.display(), spec.callable);
    let report = wrap_pyfunction!(report, py)?;
    let lifespan = class.bind(py).call1((app, name, report))?;
    LIFESPANS.with(|l| {
        l.borrow_mut()
            .insert(spec.clone(), lifespan.clone().unbind())
    });
    Ok(lifespan)
}

/// Runs every application's lifespan shutdown, then stops the loop.
pub fn shutdown_and_stop(py: Python<'_>) {
    let started = (|| -> PyResult<()> {
        let lifespans: Vec<Py<PyAny>> =
            LIFESPANS.with(|l| l.borrow().values().map(|l| l.clone_ref(py)).collect());
        let shutdown = SHUTDOWN_ALL.get_or_try_init(py, || super::glue(py, "shutdown"))?;
        let coroutine = shutdown
            .bind(py)
            .call1((PyList::new(py, lifespans)?, SHUTDOWN_WAIT.as_secs_f64()))?;
        let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
        let task = event_loop.call_method1(intern!(py, "create_task"), (coroutine,))?;
        SHUTDOWN.with(|s| *s.borrow_mut() = Some(task.unbind()));
        Ok(())
    })();
    if let Err(e) = started {
        log::error!("shutting the ASGI applications down failed: {e}");
        if let Ok(event_loop) = py
            .import("asyncio")
            .and_then(|a| a.call_method0("get_running_loop"))
        {
            let _ = event_loop.call_method0("stop");
        }
    }
}

/// Drops the lifespans (the loop has stopped).
pub fn forget(_py: Python<'_>) {
    LIFESPANS.with(|l| l.borrow_mut().clear());
    SHUTDOWN.with(|s| s.borrow_mut().take());
}

/// What a lifespan reports, logged once per process and application.
#[pyfunction]
fn report(py: Python<'_>, kind: &str, name: &str, detail: Bound<'_, PyAny>) {
    let text = |detail: &Bound<'_, PyAny>| {
        if detail.is_instance_of::<pyo3::exceptions::PyBaseException>() {
            let err = PyErr::from_value(detail.clone());
            let type_name = err
                .get_type(py)
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default();
            format!("{type_name}: {}", err.value(py))
        } else {
            detail.to_string()
        }
    };
    match kind {
        "unsupported" => log::info!(
            "the ASGI application {name} does not support lifespan ({}); serving it without",
            text(&detail)
        ),
        "startup-failed" => {
            log::error!("lifespan startup of the ASGI application {name} failed; its requests are answered with 503:");
            for line in text(&detail).lines() {
                log::error!("{line}");
            }
        }
        "shutdown-failed" => log::error!(
            "lifespan shutdown of the ASGI application {name} failed: {}",
            text(&detail)
        ),
        "shutdown-error" => {
            log::error!("lifespan shutdown of the ASGI application {name} raised an exception:");
            for line in format_exception(py, &PyErr::from_value(detail)).lines() {
                log::error!("{line}");
            }
        }
        _ => log::warn!(
            "lifespan shutdown of the ASGI application {name} did not end within {}s",
            text(&detail)
        ),
    }
}
