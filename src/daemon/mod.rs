//! Daemon mode: applications run in process groups that the module spawns,
//! supervises and talks to over Unix sockets. Server-neutral; a server plugs in
//! with a few calls:
//!
//! - In its master/parent process, once per configuration generation (start-up
//!   and each reload), never for a configuration test:
//!   1. build a [`supervisor::SupervisorConfig`] (server name, a run directory
//!      unique to the master, the master's pid, the worker user's uid/gid, the
//!      groups, an [`auth::Generation`] with a fresh secret and each group's
//!      applications, and the previous generation's, whose server processes
//!      still finish their requests); [`supervisor::SupervisorConfig::check`]
//!      gives configuration-test errors;
//!   2. [`supervisor::start`] with the `gateway-daemon` executable found next to
//!      the module: it returns once the sockets exist, with a
//!      [`supervisor::Lifeline`] the master keeps (store its raw fd somewhere that
//!      survives the reload);
//!   3. close the previous generation's lifeline fd: its daemons drain while the
//!      new ones already take new connections;
//!   4. [`client::set_endpoints`] with [`supervisor::SupervisorConfig::endpoints`],
//!      before the worker processes fork (they inherit it).
//! - In each worker process at start: [`supervisor::close_inherited`] on the
//!   lifeline fd, so that the master's death is seen at once.
//! - Per request, on any thread of a worker process: [`client::endpoint`] by
//!   group name, then [`client::forward`] with the request head, a
//!   [`crate::common::transport::RequestBody`] and a
//!   [`crate::common::transport::ResponseChannel`]
//!   (the same traits as embedded mode); it blocks until the response has been
//!   relayed and returns a [`crate::common::transport::Outcome`] saying how to
//!   finish the request.
//!
//! Parts: [`protocol`] (the wire format), [`auth`] (the secret and the
//! applications a group serves), [`client`] (the server side: a
//! connection pool and request forwarding), [`supervisor`] (spawns, restarts and
//! stops daemon processes), [`worker`] (a daemon process: Python, threads, the
//! request loop), [`process`] (privileges, titles, signals), [`rundir`] (the
//! directory of the sockets, which only root may change). The supervisor and
//! worker run in the `gateway-daemon` executable.

pub mod auth;
pub mod client;
pub mod launch;
pub mod process;
pub mod protocol;
pub mod rundir;
pub mod supervisor;
pub mod watch;
pub mod worker;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The name of the daemon executable, installed next to the server modules.
pub const EXECUTABLE: &str = "gateway-daemon";

/// The daemon executable installed next to the server module that holds the
/// code at address `addr` (any function of the module, as a number).
pub fn executable_beside(addr: usize) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: Dl_info is plain data; all zeroes is a valid value that dladdr overwrites.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr looks up the loaded object that holds addr.
    let found = unsafe { libc::dladdr(addr as *const std::ffi::c_void, &mut info) } != 0;
    if !found || info.dli_fname.is_null() {
        return Err("cannot tell where the Gateway module was loaded from".into());
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the dynamic loader.
    let module = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    let module = PathBuf::from(module);
    let exe = module.with_file_name(EXECUTABLE);
    let runnable =
        std::fs::metadata(&exe).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if runnable {
        Ok(exe)
    } else {
        Err(format!(
            "{} is missing or not executable (it is installed next to {})",
            exe.display(),
            module.display()
        ))
    }
}

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
    /// How long a request may wait for a daemon thread (`queue-timeout`), if bounded.
    pub queue_timeout: Option<Duration>,
    /// The secret this server process proves, and the applications it may name.
    pub access: auth::GroupAccess,
}

/// The file name of `group`'s socket in the run directory.
pub fn socket_name(group: &str) -> String {
    format!("{group}.sock")
}

/// The socket of `group` in `run_dir`.
pub fn socket_path(run_dir: &Path, group: &str) -> PathBuf {
    run_dir.join(socket_name(group))
}

/// The file name of `group`'s status file (its scoreboard) in the run directory.
pub fn status_name(group: &str) -> String {
    format!("{group}.status")
}

/// The status file of `group` in `run_dir`.
pub fn status_path(run_dir: &Path, group: &str) -> PathBuf {
    run_dir.join(status_name(group))
}

/// The prefix of the supervisor's exit records in the run directory.
pub const EXIT_RECORD_PREFIX: &str = "exit-";

/// The file name of the record of how daemon process `pid` ended.
pub fn exit_record_name(pid: u32) -> String {
    format!("{EXIT_RECORD_PREFIX}{pid}")
}

/// Where the supervisor records how daemon process `pid` ended.
pub fn exit_record_path(run_dir: &Path, pid: u32) -> PathBuf {
    run_dir.join(exit_record_name(pid))
}

/// The longest path a Unix socket address holds (sun_path less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
