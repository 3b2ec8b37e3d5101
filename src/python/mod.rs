//! The Python side: what every Python protocol shares (the embedded
//! interpreter, loading applications, the log streams) and one folder per
//! protocol on top of it ([`wsgi`], [`asgi`]); [`run`] picks the one an
//! application speaks. Server-neutral: servers plug in
//! through the traits of [`crate::common::transport`].

pub mod app;
pub mod asgi;
pub mod interpreter;
pub mod log_stream;
pub mod slow;
pub mod wsgi;

pub use wsgi::ServerInfo;

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use crate::common::config::{AppSpec, Interface};
use crate::common::transport::{Done, Flow, Outcome, Request};

/// What detection found each application of this process to speak, so that
/// later requests decide without the GIL.
static DETECTED: LazyLock<Mutex<HashMap<AppSpec, Interface>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn detected(spec: &AppSpec) -> Option<Interface> {
    match spec.interface {
        Interface::Detect => DETECTED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(spec)
            .copied(),
        known => Some(known),
    }
}

/// The protocol of `spec`'s application: as configured, or told from the
/// callable (loading it); None when it cannot be loaded (the WSGI runner then
/// reports the loading error, and the next request tries again).
fn interface(spec: &AppSpec, info: &ServerInfo) -> Option<Interface> {
    if let Some(known) = detected(spec) {
        return Some(known);
    }
    let found = interpreter::with_gil(|py| {
        let app = app::get(py, spec, info).ok()?;
        match asgi::is_asgi(py, &app) {
            Ok(true) => Some(Interface::Asgi),
            _ => Some(Interface::Wsgi),
        }
    })?;
    DETECTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(spec.clone(), found);
    Some(found)
}

/// Runs `request` with the application `spec` in this process, with the
/// protocol the application speaks; blocks until its response has gone out.
pub fn run(spec: &AppSpec, info: &ServerInfo, request: Request<'_>) -> Outcome {
    let _watched = slow::watch_thread(&request.head);
    match interface(spec, info) {
        Some(Interface::Asgi) => asgi::run(spec, info, request),
        _ => wsgi::run(spec, info, request),
    }
}

/// Loads the application `spec` now (a preload); Err is its error with the
/// traceback, for the log.
pub fn load(spec: &AppSpec, info: &ServerInfo) -> Result<(), String> {
    interpreter::with_gil(|py| {
        app::get(py, spec, info)
            .map(drop)
            .map_err(|e| wsgi::response::format_exception(py, &e))
    })?;
    // Known from now on: an ASGI application's first request runs without a thread.
    interface(spec, info);
    Ok(())
}

/// Whether requests for `spec` can be started without a thread ([`start`]):
/// its application is known to be ASGI. Takes no GIL.
pub fn runs_without_thread(spec: &AppSpec) -> bool {
    detected(spec) == Some(Interface::Asgi)
}

/// Starts `request` on this process's event loop and returns at once; `done`
/// is called with its outcome, on the loop's thread. Only for applications
/// [`runs_without_thread`] accepts, over a transport that never blocks
/// (`flow`): it takes no GIL and never waits.
pub fn start(
    spec: &AppSpec,
    info: &ServerInfo,
    request: Request<'_>,
    flow: Box<dyn Flow>,
    done: Done,
) {
    asgi::start(spec, info, request, flow, done)
}

#[cfg(test)]
mod test_support;
