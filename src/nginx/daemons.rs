//! Daemon mode under nginx: the master starts each configuration generation's
//! daemon supervisor (see [`crate::daemon`]) before its workers fork, and lets
//! the previous generation drain. Nothing Python runs in the master.
//!
//! nginx has no hook that runs in the master later on, so the supervisor is
//! started with a keeper ([`supervisor::start_kept`]) that starts a new one if it
//! dies. Daemon processes that die are replaced by the supervisor itself.

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

use super::config::MainConfig;
use super::ffi::*;
use crate::common::config::Groups;
use crate::common::log::{nginx_level_name, STDERR_LOG_VAR};
use crate::daemon::auth::Generation;
use crate::daemon::launch::{self, Problem};
use crate::daemon::{self, supervisor};

/// The master's end of the current generation's lifeline, or -1. A static of the
/// module survives reloads: nginx reopens the module it already has loaded.
static LIFELINE: AtomicI32 = AtomicI32::new(-1);

/// Whether this process started a generation already (later calls are reloads).
static STARTED: AtomicBool = AtomicBool::new(false);

/// The running generation's secret and applications: the next generation's
/// daemons also serve its workers, which finish their requests after a reload.
static GENERATION: Mutex<Option<Generation>> = Mutex::new(None);

/// Logs `msg` to `cycle`'s log.
///
/// # Safety
/// `cycle` must be a live cycle.
unsafe fn log(cycle: *mut ngx_cycle_t, level: u32, msg: &str) {
    let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // SAFETY: guaranteed by the caller; the message is NUL-terminated.
    unsafe { gateway_ngx_log((*cycle).log, level as ngx_uint_t, msg.as_ptr()) };
}

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
    daemonizing: ngx_uint_t,
) -> ngx_int_t {
    // SAFETY: the shim passes the http main record, or NULL without an http block.
    let mcf = unsafe { mcf.cast::<MainConfig>().as_ref() };
    let groups = mcf.map(|m| m.groups.clone()).unwrap_or_default();
    // Made here, in the master before the workers fork: they inherit it in memory.
    let mounts = mcf.iter().flat_map(|m| &m.daemon_mounts);
    let options = groups.options();
    let generation = match Generation::new(&options, mounts.map(|(g, app)| (g.as_str(), app))) {
        Ok(g) => g,
        Err(e) => {
            // SAFETY: nginx passes its live cycle.
            unsafe {
                log(
                    cycle,
                    NGX_LOG_EMERG,
                    &format!("gateway: daemon mode cannot start: {e}"),
                )
            };
            return NGX_ERROR as ngx_int_t;
        }
    };
    let mut running = GENERATION.lock().unwrap_or_else(|e| e.into_inner());
    // Without `user` (nginx not started as root) the workers run as the master's user.
    // SAFETY: geteuid and getegid cannot fail.
    let (uid, gid) = unsafe {
        (
            if user == libc::uid_t::MAX {
                libc::geteuid()
            } else {
                user
            },
            if group == libc::gid_t::MAX {
                libc::getegid()
            } else {
                group
            },
        )
    };
    // SAFETY: the core module's pid path lives in the cycle's pool.
    let pid_file =
        PathBuf::from(String::from_utf8_lossy(unsafe { str_bytes(&*pid_file) }).as_ref());
    let config = supervisor::SupervisorConfig {
        server: "nginx".into(),
        run_dir: run_dir(&pid_file, test != 0),
        server_pid: if daemonizing != 0 {
            0
        } else {
            std::process::id()
        },
        server_uid: uid,
        server_gid: gid,
        groups: options,
        generation,
        previous: running.clone(),
    };
    // A reload (kill -HUP) must not end the master, which nginx does when
    // init_module fails: it keeps the previous daemon groups instead.
    let reload = test == 0 && STARTED.load(Ordering::Relaxed);
    let problems = problems(&groups, &config);
    if !problems.is_empty() {
        for problem in &problems {
            let level = if reload { NGX_LOG_ALERT } else { NGX_LOG_EMERG };
            // SAFETY: nginx passes its live cycle.
            unsafe { log(cycle, level, problem) };
        }
        if !reload {
            return NGX_ERROR as ngx_int_t;
        }
        // SAFETY: as above.
        unsafe {
            log(
                cycle,
                NGX_LOG_ALERT,
                "gateway: the new daemon groups cannot start; the previous ones keep serving",
            )
        };
        return NGX_OK as ngx_int_t;
    }
    if test != 0 {
        return NGX_OK as ngx_int_t;
    }
    STARTED.store(true, Ordering::Relaxed);
    let previous = LIFELINE.load(Ordering::Relaxed);
    // SAFETY: nginx passes its live cycle, in its single-threaded master.
    let started = launch::start_generation(&config, previous, |config| unsafe {
        let exe = daemon::executable_beside(gateway_init_module as *const () as usize)
            .map_err(std::io::Error::other)?;
        with_worker_environment(cycle, || {
            with_log_settings(cycle, || start_logging_to(cycle, &exe, config))
        })
    });
    let fd = match started {
        Ok(fd) => fd,
        Err(e) => {
            let msg = format!("gateway: starting the daemon supervisor failed: {e}");
            if !reload {
                // SAFETY: as above.
                unsafe { log(cycle, NGX_LOG_EMERG, &msg) };
                return NGX_ERROR as ngx_int_t;
            }
            // A failed reload must not end the master (nginx exits when init_module
            // fails): the previous generation's daemons keep serving.
            // SAFETY: as above.
            unsafe {
                log(
                    cycle,
                    NGX_LOG_ALERT,
                    &format!("{msg}; the previous daemon groups keep serving"),
                )
            };
            return NGX_OK as ngx_int_t;
        }
    };
    // The new generation takes new connections now; the old one finishes its requests.
    LIFELINE.store(fd, Ordering::Relaxed);
    *running = (fd >= 0).then(|| config.generation.clone());
    NGX_OK as ngx_int_t
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
/// `cycle` must be the live cycle being initialized, in the single-threaded master.
unsafe fn with_worker_environment<T>(
    cycle: *mut ngx_cycle_t,
    start: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let mut extra: ngx_uint_t = 0;
    // The environment nginx's `env` directives keep (`TZ` and the variables listed).
    // SAFETY: the caller passes the live cycle; with `extra` given nginx only builds a
    // copy (a new array, freed below) and leaves `environ` alone.
    let env = unsafe { ngx_set_environment(cycle, &mut extra) };
    if env.is_null() {
        return Err(std::io::Error::other(
            "cannot build the environment of nginx's env directives (out of memory)",
        ));
    }
    // SAFETY: no other thread runs in the master to read `environ` while it is swapped;
    // it is restored before the array nginx allocated is freed.
    unsafe {
        let saved = environ;
        environ = env;
        let started = start();
        environ = saved;
        libc::free(env.cast());
        started
    }
}

/// Runs `start` with [`STDERR_LOG_VAR`] added to the environment: nginx's format
/// and the level of the cycle's error log, where the supervisor and its daemon
/// processes write, so that their lines look like nginx's and `error_log`'s
/// level holds for them too.
///
/// # Safety
/// As for [`with_worker_environment`], and called inside it.
unsafe fn with_log_settings<T>(
    cycle: *mut ngx_cycle_t,
    start: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    // SAFETY: the cycle's log is set before init_module runs.
    let level = unsafe { (*cycle).log.as_ref() }.map_or(NGX_LOG_ERR as usize, |l| l.log_level);
    let setting = CString::new(format!(
        "{STDERR_LOG_VAR}=nginx:{}",
        nginx_level_name(level)
    ))
    .expect("no NUL in a level name");
    let mut env = vec![setting.as_ptr().cast_mut()];
    // SAFETY: environ is NULL or a NULL-terminated array of C strings; only read here.
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
    // SAFETY: as in with_worker_environment: no other thread reads `environ`, and it
    // is restored while `env` and `setting` are still alive.
    unsafe {
        let saved = environ;
        environ = env.as_mut_ptr();
        let started = start();
        environ = saved;
        started
    }
}

/// Starts a supervisor whose standard output and error (where it and its
/// daemons log) are the cycle's error log: nginx points its own there only
/// later, and the supervisor must not hold on to the terminal or pipes nginx
/// was started with.
///
/// # Safety
/// `cycle` must be the live cycle being initialized, in the single-threaded master.
unsafe fn start_logging_to(
    cycle: *mut ngx_cycle_t,
    exe: &Path,
    config: &supervisor::SupervisorConfig,
) -> std::io::Result<supervisor::Lifeline> {
    // SAFETY: the cycle's log and its open file are set before init_module runs.
    let log_fd = unsafe {
        let log = (*cycle).log;
        if log.is_null() || (*log).file.is_null() {
            -1
        } else {
            (*(*log).file).fd
        }
    };
    if log_fd < 0 || log_fd == libc::STDERR_FILENO {
        return supervisor::start_kept(exe, config);
    }
    let std = [libc::STDOUT_FILENO, libc::STDERR_FILENO];
    // SAFETY: fds 1 and 2 are swapped for the log only while the supervisor forks, then
    // restored; the master runs no other thread that could write to them meanwhile.
    unsafe {
        let saved = std.map(|fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3));
        for fd in std {
            libc::dup2(log_fd, fd);
        }
        let started = supervisor::start_kept(exe, config);
        for (fd, copy) in std.into_iter().zip(saved) {
            if copy >= 0 {
                libc::dup2(copy, fd);
                libc::close(copy);
            }
        }
        started
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
