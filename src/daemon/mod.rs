//! Daemon mode: applications run in process groups that the module spawns,
//! supervises and talks to over Unix sockets. Server-neutral; a server plugs in
//! with two calls:
//!
//! - in its master/parent process, once per configuration generation:
//!   [`supervisor::start`] (spawns the supervisor and returns its [`supervisor::Lifeline`])
//!   and [`client::set_endpoints`] (what its worker processes connect to);
//! - on any thread of a worker process, per request: [`client::forward`].
//!
//! Parts: [`protocol`] (the wire format), [`client`] (the server side: a
//! connection pool and request forwarding), [`supervisor`] (spawns, restarts and
//! stops daemon processes), [`worker`] (a daemon process: Python, threads, the
//! request loop). The last two run in the `gateway-daemon` executable.

pub mod client;
pub mod process;
pub mod protocol;
pub mod supervisor;
pub mod worker;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The name of the daemon executable, installed next to the server modules.
pub const EXECUTABLE: &str = "gateway-daemon";

/// What a server process needs to reach one daemon group.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub group: String,
    /// The group's listening socket.
    pub socket: PathBuf,
    /// The directory of the sockets and of the supervisor's exit records.
    pub run_dir: PathBuf,
    /// How long to wait for the daemon to say anything (`socket-timeout`).
    pub socket_timeout: Duration,
}

/// The socket of `group` in `run_dir`.
pub fn socket_path(run_dir: &Path, group: &str) -> PathBuf {
    run_dir.join(format!("{group}.sock"))
}

/// Where the supervisor records how daemon process `pid` ended.
pub fn exit_record_path(run_dir: &Path, pid: u32) -> PathBuf {
    run_dir.join(format!("exit-{pid}"))
}

/// The longest path a Unix socket address holds (sun_path less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
