//! Starting the embedded interpreter once per process, and giving each server
//! thread one Python thread state for its whole life.

use std::cell::Cell;
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use pyo3::ffi;
use pyo3::prelude::*;

/// How the interpreter of this process is set up.
#[derive(Debug, Clone, Default)]
pub struct PythonSettings {
    /// A virtualenv (a directory with `pyvenv.cfg`) or a Python prefix.
    pub home: Option<PathBuf>,
    /// Extra `sys.path` entries, added like site directories (`.pth` files work).
    pub path: Vec<PathBuf>,
}

/// Why the interpreter could not be started.
#[derive(Debug)]
pub enum InitError {
    /// Another embedder (mod_wsgi, most likely) owns the interpreter of this process.
    AlreadyInitialized,
    /// The configured home does not exist or is not a directory.
    BadHome(PathBuf),
    /// The user Python runs as may not enter or read `path`, on the way to `home`.
    HomeDenied {
        home: PathBuf,
        path: PathBuf,
        user: String,
        /// The permission bits of `path`, its owner, and the `chmod` that would let the user in.
        mode: u32,
        owner: String,
        grant: &'static str,
    },
    /// The virtualenv was made by another Python version than the one embedded.
    VenvVersion {
        home: PathBuf,
        venv: String,
        embedded: String,
        /// The interpreter that made the virtualenv, to build Gateway for.
        python: String,
    },
    /// Python itself refused the configuration.
    Python(String),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::AlreadyInitialized => f.write_str(
                "Python is already initialised in this process by another module (is mod_wsgi loaded too?); \
                 Gateway needs the interpreter to itself: disable the other module",
            ),
            InitError::BadHome(home) => {
                write!(f, "'{}' is not a directory (expected a virtualenv or a Python prefix)", home.display())
            }
            InitError::HomeDenied { home, path, user, mode, owner, grant } => write!(
                f,
                "permission denied for user {user} on {path} (mode {mode:04o}, owner {owner}): Python cannot \
                 use its home {home} as {user}; let {user} in (e.g. chmod {grant} {path}) or move the \
                 virtualenv where {user} can read it, such as /opt or /srv",
                path = path.display(),
                home = home.display(),
            ),
            InitError::VenvVersion { home, venv, embedded, python } => write!(
                f,
                "the virtualenv {} was made by Python {venv}, but Gateway embeds Python {embedded}: \
                 recreate it with that Python (e.g. /usr/bin/python3 -m venv {}), or rebuild Gateway \
                 for the virtualenv's Python {venv} with `make PYTHON={python}`",
                home.display(),
                home.display()
            ),
            InitError::Python(msg) => write!(f, "starting Python failed: {msg}"),
        }
    }
}

impl std::error::Error for InitError {}

fn c_path(p: &Path) -> Result<CString, InitError> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| InitError::Python(format!("path {} contains NUL", p.display())))
}

/// Starts the interpreter in this process and releases the GIL. Must run in a
/// server child (or daemon), never in the Apache parent or the nginx master.
pub fn initialize(settings: &PythonSettings) -> Result<(), InitError> {
    // SAFETY: Py_IsInitialized may be called at any time.
    if unsafe { ffi::Py_IsInitialized() } != 0 {
        return Err(InitError::AlreadyInitialized);
    }
    if let Some(home) = &settings.home {
        check_home_access(home, &HomeUser::current())?;
        check_home(home)?;
    }
    // SAFETY: PyConfig is plain data, initialised by PyConfig_InitPythonConfig before use,
    // and every string set on it is a valid NUL-terminated buffer.
    unsafe {
        let mut config: ffi::PyConfig = std::mem::zeroed();
        ffi::PyConfig_InitPythonConfig(&mut config);
        // The server owns the signals (SIGTERM, SIGHUP, SIGINT, ...).
        config.install_signal_handlers = 0;
        // Ignore the server's own argv and stay out of PYTHON* variables in its environment.
        config.parse_argv = 0;
        config.use_environment = 0;
        let status = match &settings.home {
            Some(home) if home.join("pyvenv.cfg").exists() => {
                // A virtualenv is found through its interpreter, as `HOME/bin/python` would.
                let program = c_path(&home.join("bin").join("python"))?;
                Some(ffi::PyConfig_SetBytesString(
                    &mut config,
                    &mut config.program_name,
                    program.as_ptr(),
                ))
            }
            Some(home) => {
                let home = c_path(home)?;
                Some(ffi::PyConfig_SetBytesString(
                    &mut config,
                    &mut config.home,
                    home.as_ptr(),
                ))
            }
            None => None,
        };
        if let Some(status) = status {
            check(status, &mut config)?;
        }
        let status = ffi::Py_InitializeFromConfig(&config);
        check(status, &mut config)?;
        ffi::PyConfig_Clear(&mut config);
    }
    let added = Python::attach(|py| {
        // threading names its main thread after the thread that imports it first;
        // CPython's signal module, after the one that started the interpreter (this
        // one). They must agree, or an event loop started on another thread (uvloop)
        // takes itself for the main thread and fails in signal.set_wakeup_fd.
        py.import("threading")?;
        super::log_stream::redirect_std_streams(py)?;
        add_site_dirs(py, &settings.path)
    });
    // SAFETY: this thread holds the GIL since Py_InitializeFromConfig; hand it over so that
    // server threads can take it. The thread state stays this thread's.
    unsafe {
        ffi::PyEval_SaveThread();
    }
    added.map_err(|e| {
        InitError::Python(format!(
            "setting up sys.path and the standard streams failed: {e}"
        ))
    })
}

/// The `major.minor` of a version string such as `3.11.2 (main, ...)`.
fn major_minor(version: &str) -> Option<&str> {
    let end = version
        .match_indices('.')
        .nth(1)
        .map_or(version.len(), |(i, _)| i);
    let mm = version[..end].trim();
    (mm.contains('.') && mm.chars().all(|c| c.is_ascii_digit() || c == '.')).then_some(mm)
}

/// Checks a configured Python home before anything starts: it must be a
/// directory, and a virtualenv must come from the Python version Gateway embeds.
/// Configuration checks call this so that mistakes fail the configuration test.
pub fn check_home(home: &Path) -> Result<(), InitError> {
    if !home.is_dir() {
        return Err(InitError::BadHome(home.to_path_buf()));
    }
    check_venv_version(home)
}

/// The user a Python home must be readable by (a server's worker user, a daemon
/// group's user), with the groups its processes get. Configuration checks run as
/// root, who may read anything, so they judge the permission bits on its behalf.
#[derive(Debug, Clone)]
pub struct HomeUser {
    uid: u32,
    groups: Vec<u32>,
    name: String,
}

/// Permission bits, as in the "other" class of a mode.
const READ: u32 = 0o4;
const SEARCH: u32 = 0o1;

impl HomeUser {
    /// The user `uid` with group `gid` and, when its processes call `initgroups`
    /// (the servers' workers, daemons of a named user), its supplementary groups.
    pub fn new(uid: u32, gid: u32, supplementary: bool) -> HomeUser {
        let account = crate::common::account::account(uid);
        let mut groups = match &account {
            Some(a) if supplementary => group_list(&a.name, gid),
            _ => Vec::new(),
        };
        groups.push(gid);
        HomeUser {
            uid,
            groups,
            name: user_name(uid, account.as_ref()),
        }
    }

    /// The user this process runs as, with its actual groups.
    pub fn current() -> HomeUser {
        // SAFETY: geteuid, getegid and getgroups(0, NULL) have no preconditions.
        let (uid, gid, n) = unsafe {
            (
                libc::geteuid(),
                libc::getegid(),
                libc::getgroups(0, std::ptr::null_mut()),
            )
        };
        let mut groups = vec![0; n.max(0) as usize];
        // SAFETY: the buffer holds `groups.len()` entries; getgroups writes at most that many.
        let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
        groups.truncate(n.max(0) as usize);
        groups.push(gid);
        HomeUser {
            groups,
            ..HomeUser::new(uid, gid, false)
        }
    }

    /// Whether the permission bits of `meta` grant all of `want` to this user.
    fn may(&self, meta: &fs::Metadata, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let class = if meta.uid() == self.uid {
            6
        } else if self.groups.contains(&meta.gid()) {
            3
        } else {
            0
        };
        (meta.mode() >> class) & want == want
    }
}

/// A user's name for messages: its account's, or its number without one.
fn user_name(uid: u32, account: Option<&crate::common::account::Account>) -> String {
    account.map_or_else(
        || uid.to_string(),
        |a| String::from_utf8_lossy(&a.name).into_owned(),
    )
}

/// The groups `initgroups(name, gid)` would give a process.
fn group_list(name: &[u8], gid: u32) -> Vec<u32> {
    let Ok(name) = CString::new(name) else {
        return Vec::new();
    };
    let mut groups = vec![0; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: name is NUL-terminated; the buffer holds `n` entries, and getgrouplist
        // writes at most that many (it says how many it needs when they do not fit).
        let found = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if found >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        groups.resize((n.max(0) as usize).max(groups.len() * 2), 0);
    }
}

/// Checks that `user` can use the Python home `home` as Python will: every
/// directory on the way to it, also those a symbolic link leads through, must
/// let them in, the home itself must let them list and enter it, and its
/// `pyvenv.cfg` read. Names the first path that does not. A home that does
/// not exist or is no directory is left to [`check_home`].
pub fn check_home_access(home: &Path, user: &HomeUser) -> Result<(), InitError> {
    match fs::metadata(home) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Ok(meta) if meta.is_dir() => {}
        _ => return Ok(()),
    }
    let given = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
    let real = fs::canonicalize(&given).unwrap_or_else(|_| given.clone());
    for path in [&given, &real] {
        let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
        dirs.reverse();
        for dir in dirs {
            need(dir, SEARCH, user, home)?;
        }
        need(path, READ | SEARCH, user, home)?;
    }
    need(&real.join("pyvenv.cfg"), READ, user, home)
}

/// Fails when `path` exists and its permission bits deny `user` any of `want`.
fn need(path: &Path, want: u32, user: &HomeUser, home: &Path) -> Result<(), InitError> {
    match fs::metadata(path) {
        Ok(meta) if !user.may(&meta, want) => Err(InitError::HomeDenied {
            home: home.to_path_buf(),
            path: path.to_path_buf(),
            user: user.name.clone(),
            mode: meta.mode() & 0o7777,
            owner: user_name(
                meta.uid(),
                crate::common::account::account(meta.uid()).as_ref(),
            ),
            grant: match want {
                SEARCH => "o+x",
                READ => "o+r",
                _ => "o+rx",
            },
        }),
        _ => Ok(()),
    }
}

/// A virtualenv only works with the Python version that made it; a mismatch
/// otherwise surfaces as an obscure failure to find the standard library.
fn check_venv_version(home: &Path) -> Result<(), InitError> {
    let Ok(cfg) = std::fs::read_to_string(home.join("pyvenv.cfg")) else {
        return Ok(());
    };
    let value_of = |keys: &[&str]| {
        cfg.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            keys.contains(&key.trim()).then(|| value.trim().to_string())
        })
    };
    let venv = value_of(&["version", "version_info"]);
    // SAFETY: Py_GetVersion returns a static string and may be called before initialisation.
    let embedded = unsafe { std::ffi::CStr::from_ptr(ffi::Py_GetVersion()) }
        .to_string_lossy()
        .into_owned();
    match (
        venv.as_deref().and_then(major_minor),
        major_minor(&embedded),
    ) {
        (Some(v), Some(e)) if v != e => Err(InitError::VenvVersion {
            home: home.to_path_buf(),
            venv: venv.clone().unwrap_or_default(),
            embedded: e.to_string(),
            // pyvenv.cfg names the Python that made the virtualenv (`executable`, since
            // Python 3.11) or its directory (`home`).
            python: value_of(&["executable"]).unwrap_or_else(|| {
                let dir = value_of(&["home"]).unwrap_or_else(|| "/path/to".into());
                format!("{dir}/python{v}")
            }),
        }),
        _ => Ok(()),
    }
}

/// Fails with Python's own message when a PyStatus is an error.
///
/// # Safety
/// `config` must be a PyConfig initialised by PyConfig_InitPythonConfig.
unsafe fn check(status: ffi::PyStatus, config: &mut ffi::PyConfig) -> Result<(), InitError> {
    // SAFETY: PyStatus_Exception only reads the status Python returned.
    if unsafe { ffi::PyStatus_Exception(status) } == 0 {
        return Ok(());
    }
    // SAFETY: config was initialised by PyConfig_InitPythonConfig (guaranteed by the caller).
    unsafe { ffi::PyConfig_Clear(config) };
    let msg = if status.err_msg.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: a non-NULL err_msg of a PyStatus is a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(status.err_msg) }
            .to_string_lossy()
            .into_owned()
    };
    Err(InitError::Python(msg))
}

fn add_site_dirs(py: Python<'_>, dirs: &[PathBuf]) -> PyResult<()> {
    if dirs.is_empty() {
        return Ok(());
    }
    let site = py.import("site")?;
    for dir in dirs {
        site.call_method1("addsitedir", (dir.as_os_str().to_string_lossy().as_ref(),))?;
    }
    Ok(())
}

thread_local! {
    static HAS_THREAD_STATE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the GIL on a server thread. The first call on a thread creates
/// the thread's Python thread state and keeps it for the thread's life, so that
/// `threading.local` works and no thread state is created per request.
pub fn with_gil<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
    HAS_THREAD_STATE.with(|has| {
        if !has.get() {
            // SAFETY: the interpreter is initialised (callers check is_initialized first).
            // Ensure creates this thread's state with a count of one that is never released,
            // so later Ensure/Release pairs (Python::attach) reuse it; SaveThread drops the GIL.
            unsafe {
                ffi::PyGILState_Ensure();
                ffi::PyEval_SaveThread();
            }
            has.set(true);
        }
    });
    Python::attach(f)
}

/// Whether this process has a running interpreter.
pub fn is_initialized() -> bool {
    // SAFETY: Py_IsInitialized may be called at any time.
    unsafe { ffi::Py_IsInitialized() != 0 }
}

/// Runs `atexit` handlers at the end of a process, as a Python program would,
/// after the ASGI applications' lifespan shutdown (bounded; the event loop
/// thread needs the GIL, so this thread must not hold it meanwhile).
pub fn run_exit_handlers() {
    if !is_initialized() {
        return;
    }
    super::asgi::shutdown();
    with_gil(|py| {
        if let Err(e) = py
            .import("atexit")
            .and_then(|m| m.call_method0("_run_exitfuncs"))
        {
            log::warn!("running atexit handlers failed: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_minor_of_version_strings() {
        assert_eq!(major_minor("3.11.2 (main, Mar 13 2023)"), Some("3.11"));
        assert_eq!(major_minor("3.12.1"), Some("3.12"));
        assert_eq!(major_minor("3.13"), Some("3.13"));
        assert_eq!(major_minor("garbage"), None);
    }

    #[test]
    fn a_venv_of_another_python_version_is_refused() {
        let dir = std::env::temp_dir().join(format!("gateway-venv-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("pyvenv.cfg"),
            "home = /opt/python/bin\nversion = 2.7.18\n",
        )
        .unwrap();
        let err = check_venv_version(&dir).unwrap_err().to_string();
        assert!(
            err.contains("was made by Python 2.7.18, but Gateway embeds Python 3."),
            "{err}"
        );
        assert!(
            err.contains("rebuild Gateway for the virtualenv's Python 2.7.18 with `make PYTHON=/opt/python/bin/python2.7`"),
            "{err}"
        );
        std::fs::write(
            dir.join("pyvenv.cfg"),
            "home = /opt/bin\nversion = 3.99.0\nexecutable = /opt/python3.99/bin/python3.99\n",
        )
        .unwrap();
        let err = check_venv_version(&dir).unwrap_err().to_string();
        assert!(
            err.contains("`make PYTHON=/opt/python3.99/bin/python3.99`"),
            "{err}"
        );
        std::fs::write(dir.join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        assert!(check_venv_version(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
