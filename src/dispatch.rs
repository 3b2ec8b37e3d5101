//! What both servers do with a request once they hold its transport: find
//! where it runs (embedded, or the daemon group its mode names), run it there,
//! and report how it ended. A server only maps the [`Outcome`] to its own
//! status codes and I/O.

use std::fmt;
use std::sync::Arc;

use crate::common::config::{AppSpec, Mode};
use crate::common::transport::{Done, Flow, Outcome, Request, ResponseChannel};
use crate::daemon::{client, status_path, Endpoint};
use crate::ops::{self, render, scoreboard};
use crate::python::{self, ServerInfo};

/// Where the requests of one location or virtual host run.
#[derive(Debug, Clone)]
pub enum Route {
    /// In this server process's interpreter.
    Embedded,
    /// Forwarded to a daemon process group.
    Daemon(Arc<Endpoint>),
}

/// A daemon group that the configuration names but this server process cannot
/// reach: answered with 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotRunning(pub String);

impl NotRunning {
    pub const STATUS: u16 = 503;
}

impl fmt::Display for NotRunning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "daemon process group '{}' is not running in this server; answering 503",
            self.0
        )
    }
}

/// The route of a request whose effective mode is `mode` (None: embedded).
pub fn route(mode: Option<&Mode>) -> Result<Route, NotRunning> {
    match mode {
        Some(Mode::Daemon(name)) => client::endpoint(name)
            .map(Route::Daemon)
            .ok_or_else(|| NotRunning(name.clone())),
        _ => Ok(Route::Embedded),
    }
}

/// Where one request runs, with what that needs.
pub enum Runner<'a> {
    /// Embedded, in an interpreter started with `info`.
    Embedded(&'a ServerInfo),
    /// Forwarded to the daemon group at this endpoint.
    Daemon(&'a Endpoint),
}

/// Runs `request` with the application `app`; blocks until its response has
/// gone out (or failed) and says how it ended.
pub fn run(runner: Runner<'_>, app: &AppSpec, request: Request<'_>) -> Outcome {
    match runner {
        Runner::Embedded(info) => python::run(app, info, request),
        Runner::Daemon(endpoint) => {
            let Request {
                head,
                has_body,
                mut body,
                mut response,
            } = request;
            let outcome =
                client::forward(endpoint, app, &head, has_body, &mut *body, &mut *response);
            count_refusal(&endpoint.group, outcome);
            outcome
        }
    }
}

/// Counts a daemon group's request that this server answered 503 (shed) or
/// 504 (timed out) for the status page.
pub fn count_refusal(group: &str, outcome: Outcome) {
    match outcome {
        Outcome::Status(503) => scoreboard::group(group).map(|g| g.count_shed()),
        Outcome::Status(504) => scoreboard::group(group).map(|g| g.count_timeout()),
        _ => None,
    };
}

/// Answers a status request (`SetHandler gateway-status`, `gateway_status;`)
/// of server `server` with the page in the format that `query` and the
/// `Accept` header ask for: this server's processes and every daemon group's.
pub fn status(
    server: &'static str,
    query: &[u8],
    accept: Option<&[u8]>,
    response: &mut dyn ResponseChannel,
) -> Outcome {
    let groups: Vec<_> = client::endpoints()
        .iter()
        .map(|ep| (ep.group.clone(), status_path(&ep.run_dir, &ep.group)))
        .collect();
    let snapshot = ops::collect(server, &groups);
    let format = render::Format::choose(query, accept);
    let body = render::render(&snapshot, format);
    let headers = [
        ("Content-Type".to_string(), format.content_type().into()),
        ("Content-Length".to_string(), body.len().to_string().into()),
        ("Cache-Control".to_string(), b"no-store".to_vec()),
    ];
    let sent = response
        .start(200, "200 OK", &headers)
        .and_then(|()| response.write(body.as_bytes(), true));
    match sent {
        Ok(()) => Outcome::Complete,
        Err(_) => Outcome::ClientGone,
    }
}

/// Whether requests for the embedded application `app` can run without a
/// thread of the server ([`start`]): it is known to be ASGI.
pub fn runs_without_thread(app: &AppSpec) -> bool {
    python::runs_without_thread(app)
}

/// Starts an embedded request that [`runs_without_thread`] on the
/// interpreter's event loop, over a transport that never blocks, and returns
/// at once; `done` gets its outcome.
pub fn start(
    app: &AppSpec,
    info: &ServerInfo,
    request: Request<'_>,
    flow: Box<dyn Flow>,
    done: Done,
) {
    python::start(app, info, request, flow, done)
}
