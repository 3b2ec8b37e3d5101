//! Daemon mode under nginx: the master starts each configuration generation's
//! daemon supervisor (see [`crate::daemon`]) before its workers fork, and lets
//! the previous generation drain. Nothing Python runs in the master.
//!
//! nginx has no hook that runs in the master later on, so the supervisor is
//! started with a keeper ([`supervisor::start_kept`]) that starts a new one if it
//! dies. Daemon processes that die are replaced by the supervisor itself.

use std::ffi::{c_char, c_void, CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

use super::config::MainConfig;
use super::ffi::*;
use super::records::{self, Cycle};
use crate::common::config::{DaemonOptions, Groups};
use crate::common::log::{nginx_level_name, STDERR_LOG_VAR};
use crate::common::panic::catch;
use crate::daemon::auth::Generation;
use crate::daemon::launch::{self, Problem};
use crate::daemon::{self, supervisor};
use crate::ops::scoreboard::{self, Board};

/// The master's end of the current generation's lifeline, or -1. A static of the
/// module survives reloads: nginx reopens the module it already has loaded.
static LIFELINE: AtomicI32 = AtomicI32::new(-1);

/// Whether this process started a generation already (later calls are reloads).
static STARTED: AtomicBool = AtomicBool::new(false);

/// The running generation's secret and applications: the next generation's
/// daemons also serve its workers, which finish their requests after a reload.
static GENERATION: Mutex<Option<Generation>> = Mutex::new(None);

/// The run directory of this master, once chosen. Every generation uses the
/// same one: a new generation's sockets replace the old ones under the same
/// names, so the old workers' last requests reach the new daemons.
static RUN_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The run directory: next to nginx's pid file, named for the process that
/// first starts a supervisor (the master, or the process it forks from).
fn run_dir(pid_file: &Path, test: bool) -> PathBuf {
    let mut chosen = RUN_DIR.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = &*chosen {
        return dir.clone();
    }
    let parent = pid_file.parent().unwrap_or(Path::new("/run"));
    let dir = parent.join(format!("gateway-{}", std::process::id()));
    if !test {
        *chosen = Some(dir.clone());
    }
    dir
}

/// The init_module hook: checks the daemon groups (for `nginx -t` too) and, in a
/// master that is about to run this configuration, starts their supervisor.
/// `test` is set for `nginx -t` and `nginx -s`; `daemonizing` when the master
/// forks into the background after this call (its pid changes).
#[no_mangle]
pub unsafe extern "C" fn gateway_init_module(
    cycle: *mut ngx_cycle_t,
    mcf: *mut c_void,
    test: ngx_uint_t,
    user: libc::uid_t,
    group: libc::gid_t,
    pid_file: *const ngx_str_t,
    worker_processes: ngx_int_t,
    daemonizing: ngx_uint_t,
) -> ngx_int_t {
    // SAFETY: nginx passes its live cycle; the shim the http main record (made by
    // gateway_create_main_conf), or NULL without an http block, and the core
    // module's pid path, which lives in the cycle's pool.
    let (cycle, mcf, pid_file) = unsafe {
        (
            Cycle::from_raw(cycle),
            mcf.cast::<MainConfig>().as_ref(),
            str_bytes(&*pid_file),
        )
    };
    let start = Start {
        test: test != 0,
        user,
        group,
        pid_file: PathBuf::from(String::from_utf8_lossy(pid_file).as_ref()),
        worker_processes: worker_processes.max(1) as usize,
        daemonizing: daemonizing != 0,
    };
    // SAFETY: nginx runs init_module in its master, which runs no other thread.
    match catch(|| unsafe { init_module(cycle, mcf, &start) }) {
        Ok(rc) => rc,
        Err(p) => {
            let msg = format!("gateway: {p} in the module's start");
            refuse(cycle, &[msg], start.reload())
        }
    }
}

/// What nginx tells init_module of the start.
struct Start {
    test: bool,
    user: libc::uid_t,
    group: libc::gid_t,
    pid_file: PathBuf,
    worker_processes: usize,
    daemonizing: bool,
}

impl Start {
    /// A reload (kill -HUP), rather than a first start or `nginx -t`.
    fn reload(&self) -> bool {
        !self.test && STARTED.load(Ordering::Relaxed)
    }
}

/// # Safety
/// In nginx's master, which runs no other thread (the supervisor is started
/// with the process's environment and standard output swapped).
unsafe fn init_module(cycle: Cycle<'_>, mcf: Option<&MainConfig>, start: &Start) -> ngx_int_t {
    let groups = mcf.map(|m| m.groups.clone()).unwrap_or_default();
    let mut options = groups.options();
    let counting = mcf.and_then(|m| m.status_counters) != Some(false);
    options
        .iter_mut()
        .for_each(|g| g.status_counters = counting);
    // Made here, in the master before the workers fork: they inherit it in memory.
    let mounts = mcf.iter().flat_map(|m| &m.daemon_mounts);
    let generation = match Generation::new(&options, mounts.map(|(g, app)| (g.as_str(), app))) {
        Ok(g) => g,
        Err(e) => {
            cycle.log(
                NGX_LOG_EMERG,
                &format!("gateway: daemon mode cannot start: {e}"),
            );
            return records::ERROR;
        }
    };
    let mut running = GENERATION.lock().unwrap_or_else(|e| e.into_inner());
    let config = supervisor_config(start, options, generation, running.clone());
    let reload = start.reload();
    let problems = problems(&groups, &config);
    if !problems.is_empty() {
        return refuse(cycle, &problems, reload);
    }
    if start.test {
        return records::OK;
    }
    make_status_board(mcf, start.worker_processes);
    STARTED.store(true, Ordering::Relaxed);
    let previous = LIFELINE.load(Ordering::Relaxed);
    // SAFETY: the master runs no other thread (caller).
    let started = launch::start_generation(&config, previous, |config| unsafe {
        start_supervisor(cycle, config)
    });
    let fd = match started {
        Ok(fd) => fd,
        Err(e) => return failed(cycle, e, reload),
    };
    // The new generation takes new connections now; the old one finishes its requests.
    LIFELINE.store(fd, Ordering::Relaxed);
    *running = (fd >= 0).then(|| config.generation.clone());
    records::OK
}

/// This generation's embedded scoreboard, made in the master before the
/// workers fork: a slot for each worker, and as many again for the old
/// generation's workers that finish their requests (they keep their own
/// mapping) and for workers started again after a crash.
fn make_status_board(mcf: Option<&MainConfig>, workers: usize) {
    if mcf.and_then(|m| m.status_counters) == Some(false) {
        scoreboard::install_embedded(None);
        return;
    }
    let groups = mcf.map(|m| m.groups.options()).unwrap_or_default();
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    match Board::anonymous((2 * workers + 4).min(1024), true, &names) {
        Ok(board) => scoreboard::install_embedded(Some(board)),
        Err(e) => {
            log::warn!("the status page has no counters: its shared memory cannot be made: {e}");
            scoreboard::install_embedded(None);
        }
    }
}

/// The supervisor's settings for a start by nginx (`start`).
fn supervisor_config(
    start: &Start,
    groups: Vec<DaemonOptions>,
    generation: Generation,
    previous: Option<Generation>,
) -> supervisor::SupervisorConfig {
    // Without `user` (nginx not started as root) the workers run as the master's user.
    // SAFETY: geteuid and getegid cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    supervisor::SupervisorConfig {
        server: "nginx".into(),
        run_dir: run_dir(&start.pid_file, start.test),
        server_pid: if start.daemonizing {
            0
        } else {
            std::process::id()
        },
        server_uid: if start.user == libc::uid_t::MAX {
            euid
        } else {
            start.user
        },
        server_gid: if start.group == libc::gid_t::MAX {
            egid
        } else {
            start.group
        },
        groups,
        generation,
        previous,
    }
}

/// Logs why the new daemon groups cannot start. A reload (kill -HUP) must not
/// end the master, which nginx does when init_module fails: it keeps the
/// previous daemon groups instead.
fn refuse(cycle: Cycle<'_>, problems: &[String], reload: bool) -> ngx_int_t {
    let level = if reload { NGX_LOG_ALERT } else { NGX_LOG_EMERG };
    for problem in problems {
        cycle.log(level, problem);
    }
    if !reload {
        return records::ERROR;
    }
    cycle.log(
        NGX_LOG_ALERT,
        "gateway: the new daemon groups cannot start; the previous ones keep serving",
    );
    records::OK
}

/// The supervisor did not start.
fn failed(cycle: Cycle<'_>, e: io::Error, reload: bool) -> ngx_int_t {
    let msg = format!("gateway: starting the daemon supervisor failed: {e}");
    if !reload {
        cycle.log(NGX_LOG_EMERG, &msg);
        return records::ERROR;
    }
    // A failed reload must not end the master (nginx exits when init_module
    // fails): the previous generation's daemons keep serving.
    cycle.log(
        NGX_LOG_ALERT,
        &format!("{msg}; the previous daemon groups keep serving"),
    );
    records::OK
}

/// Starts the supervisor of `config` beside this module, with the workers'
/// environment and the cycle's error log.
///
/// # Safety
/// In nginx's master, which runs no other thread.
unsafe fn start_supervisor(
    cycle: Cycle<'_>,
    config: &supervisor::SupervisorConfig,
) -> io::Result<supervisor::Lifeline> {
    let exe = daemon::executable_beside(gateway_init_module as *const () as usize)
        .map_err(io::Error::other)?;
    // SAFETY: no other thread (caller).
    unsafe {
        with_worker_environment(cycle, || {
            with_log_settings(cycle, || start_logging_to(cycle, &exe, config))
        })
    }
}

/// What stops the daemon `groups` from starting with the settings of `config`,
/// in words for `nginx -t`, each with the file and line of its `gateway_daemon`.
pub fn problems(groups: &Groups, config: &supervisor::SupervisorConfig) -> Vec<String> {
    let exe = daemon::executable_beside(gateway_init_module as *const () as usize);
    launch::problems(groups, config, exe.as_deref().map_err(|e| e.as_str()))
        .into_iter()
        .map(|Problem { at, what }| format!("gateway_daemon: {what} in {at}"))
        .collect()
}

/// Runs `start` with the environment nginx gives its workers, so that the
/// supervisor and its daemon processes get what nginx's `env` directives keep
/// (as embedded applications do), not the shell nginx was started from.
///
/// # Safety
/// As for [`with_environ`].
unsafe fn with_worker_environment<T>(
    cycle: Cycle<'_>,
    start: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let Some(env) = cycle.worker_environment() else {
        return Err(io::Error::other(
            "cannot build the environment of nginx's env directives (out of memory)",
        ));
    };
    // SAFETY: as the caller guarantees; env lives until after the call.
    unsafe { with_environ(env.as_ptr(), start) }
}

/// Runs `start` with [`STDERR_LOG_VAR`] added to the environment: nginx's format
/// and the level of the cycle's error log, where the supervisor and its daemon
/// processes write, so that their lines look like nginx's and `error_log`'s
/// level holds for them too.
///
/// # Safety
/// As for [`with_environ`].
unsafe fn with_log_settings<T>(
    cycle: Cycle<'_>,
    start: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let level = cycle.log_level().unwrap_or(NGX_LOG_ERR as usize);
    let setting = CString::new(format!(
        "{STDERR_LOG_VAR}=nginx:{}",
        nginx_level_name(level)
    ))
    .expect("no NUL in a level name");
    let mut env = vec![setting.as_ptr().cast_mut()];
    // SAFETY: environ is NULL or a NULL-terminated array of C strings, which no
    // other thread changes (caller); only read here.
    unsafe {
        let mut var = environ;
        while !var.is_null() && !(*var).is_null() {
            let name = CStr::from_ptr(*var).to_bytes().split(|&b| b == b'=').next();
            if name != Some(STDERR_LOG_VAR.as_bytes()) {
                env.push(*var);
            }
            var = var.add(1);
        }
    }
    env.push(std::ptr::null_mut());
    // SAFETY: as the caller guarantees; env and setting live until after the call.
    unsafe { with_environ(env.as_mut_ptr(), start) }
}

/// Runs `f` with `env` as the process's environment, restored afterwards (also
/// should `f` panic).
///
/// # Safety
/// No other thread may read or change the environment meanwhile (nginx's master
/// runs none), and `env` must be a NULL-terminated array of `NAME=value` strings
/// that stays valid until this returns.
unsafe fn with_environ<T>(env: *mut *mut c_char, f: impl FnOnce() -> T) -> T {
    struct Restore(*mut *mut c_char);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back what with_environ found, on the same thread.
            unsafe { environ = self.0 };
        }
    }
    // SAFETY: no other thread uses environ, and env is valid during f (caller).
    let _restore = unsafe {
        let saved = Restore(environ);
        environ = env;
        saved
    };
    f()
}

/// Starts a supervisor whose standard output and error (where it and its
/// daemons log) are the cycle's error log: nginx points its own there only
/// later, and the supervisor must not hold on to the terminal or pipes nginx
/// was started with.
fn start_logging_to(
    cycle: Cycle<'_>,
    exe: &Path,
    config: &supervisor::SupervisorConfig,
) -> io::Result<supervisor::Lifeline> {
    match cycle.log_fd() {
        Some(log_fd) if log_fd != libc::STDERR_FILENO => {
            let _restore = StdoutToLog::swap(log_fd);
            supervisor::start_kept(exe, config)
        }
        _ => supervisor::start_kept(exe, config),
    }
}

/// Standard output and error pointed at a log until dropped (also on a panic).
/// nginx's master runs no other thread that could write to them meanwhile.
struct StdoutToLog([RawFd; 2]);

const STD: [RawFd; 2] = [libc::STDOUT_FILENO, libc::STDERR_FILENO];

impl StdoutToLog {
    fn swap(log_fd: RawFd) -> StdoutToLog {
        // SAFETY: fcntl and dup2 on descriptors only: no memory arguments.
        let saved = STD.map(|fd| unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) });
        for fd in STD {
            // SAFETY: as above.
            unsafe { libc::dup2(log_fd, fd) };
        }
        StdoutToLog(saved)
    }
}

impl Drop for StdoutToLog {
    fn drop(&mut self) {
        for (fd, copy) in STD.into_iter().zip(self.0) {
            if copy >= 0 {
                // SAFETY: copy is our duplicate of fd's original, closed once put back.
                unsafe {
                    libc::dup2(copy, fd);
                    libc::close(copy);
                }
            }
        }
    }
}

/// In a process the master forks (workers, cache helpers): let go of the
/// lifeline, so that only the master holds it and its death ends the daemons.
pub fn release_lifeline() {
    let fd = LIFELINE.swap(-1, Ordering::Relaxed);
    if fd >= 0 {
        supervisor::close_inherited(fd);
    }
}
