//! What a server's master does with each configuration generation, the same on
//! both servers: check the daemon groups, start their supervisor, and hand new
//! connections over from the previous generation's.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::auth::Generation;
use super::client;
use super::supervisor::{self, Lifeline, SupervisorConfig};
use crate::common::config::Groups;

/// A daemon group that cannot start: the `FILE:LINE` of its definition and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: String,
    pub what: String,
}

/// The settings a configuration test checks the groups against (see
/// [`problems`]): the server's name and its workers' user, no run directory,
/// no groups, and a throwaway generation.
pub fn check_settings(server: &str, uid: u32, gid: u32) -> io::Result<SupervisorConfig> {
    Ok(SupervisorConfig {
        server: server.into(),
        run_dir: PathBuf::new(),
        server_pid: 0,
        server_uid: uid,
        server_gid: gid,
        groups: Vec::new(),
        generation: Generation::new(&[], [])?,
        previous: None,
    })
}

/// What stops the daemon groups of `groups` from starting with the settings of
/// `config` (whose own groups are ignored), found before anything starts so
/// that a configuration test reports it. `exe` is the daemon executable, or why
/// there is none.
pub fn problems(
    groups: &Groups,
    config: &SupervisorConfig,
    exe: Result<&Path, &str>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let (Some((_, first)), Err(e)) = (groups.iter().next(), exe) {
        problems.push(Problem {
            at: first.to_string(),
            what: format!("daemon mode needs its executable: {e}"),
        });
    }
    for (group, at) in groups.iter() {
        let one = SupervisorConfig {
            groups: vec![group.clone()],
            ..config.clone()
        };
        if let Err(what) = one.check() {
            problems.push(Problem {
                at: at.to_string(),
                what,
            });
        }
    }
    problems
}

/// Starts the generation `config` with `start` (which runs the supervisor the
/// way the server keeps it), then lets the previous generation (its lifeline fd
/// `previous`, or -1) drain: its daemons finish their requests while new
/// connections reach the new ones. Returns the new lifeline fd for the master to
/// keep (-1 without groups, when `start` is not called). On failure nothing
/// changes: the previous generation keeps serving.
pub fn start_generation(
    config: &SupervisorConfig,
    previous: RawFd,
    start: impl FnOnce(&SupervisorConfig) -> io::Result<Lifeline>,
) -> io::Result<RawFd> {
    if config.groups.is_empty() {
        retire(previous);
        return Ok(-1);
    }
    let fd = start(config)?.into_raw_fd();
    if previous >= 0 {
        supervisor::close_inherited(previous);
    }
    client::set_endpoints(config.endpoints());
    Ok(fd)
}

/// A generation without daemon groups: the previous one (its lifeline fd
/// `previous`, or -1) drains, and no group is reachable any more.
pub fn retire(previous: RawFd) {
    if previous >= 0 {
        supervisor::close_inherited(previous);
    }
    client::set_endpoints(Vec::new());
}
