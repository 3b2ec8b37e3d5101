//! The Python side: what every Python protocol shares (the embedded
//! interpreter, loading applications, the log streams) and one folder per
//! protocol on top of it ([`wsgi`] today). Server-neutral: servers plug in
//! through the traits of [`crate::common::transport`].

pub mod app;
pub mod interpreter;
pub mod log_stream;
pub mod wsgi;

pub use wsgi::ServerInfo;

use crate::common::config::AppSpec;
use crate::common::transport::{Done, Flow, Outcome, Request};

/// Runs `request` with the application `spec` in this process, with the
/// protocol the application speaks; blocks until its response has gone out.
pub fn run(spec: &AppSpec, info: &ServerInfo, request: Request<'_>) -> Outcome {
    wsgi::run(spec, info, request)
}

/// Loads the application `spec` now (a preload); Err is its error with the
/// traceback, for the log.
pub fn load(spec: &AppSpec, info: &ServerInfo) -> Result<(), String> {
    interpreter::with_gil(|py| {
        app::get(py, spec, info)
            .map(drop)
            .map_err(|e| wsgi::response::format_exception(py, &e))
    })
}

/// Whether requests for `spec` can be started without a thread ([`start`]):
/// its application is known to be ASGI.
pub fn runs_without_thread(_spec: &AppSpec) -> bool {
    false
}

/// Starts `request` on this process's event loop and returns at once; `done`
/// is called with its outcome. Only for applications [`runs_without_thread`]
/// accepts, over a transport that never blocks (`flow`).
pub fn start(
    spec: &AppSpec,
    info: &ServerInfo,
    request: Request<'_>,
    flow: Box<dyn Flow>,
    done: Done,
) {
    let _ = (spec, info, request, flow);
    done(Outcome::Status(503))
}

#[cfg(test)]
mod test_support;
