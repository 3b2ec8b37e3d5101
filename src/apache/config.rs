//! The Apache directives: per-server and per-directory configuration records,
//! their merging, and one handler per directive.

use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard};

use super::ffi::{apr_pool_t, cmd_parms, server_rec, GLOBAL_ONLY};
use super::records::{self, Arg, Argv, Cmd, Pool, ServerId};
use crate::common::config::{
    self, split_path_list, AppSpec, ConfigError, DaemonOptions, Groups, Mode,
};
use crate::common::mount::Prefix;
use crate::common::panic::{catch, guard};
use crate::python::interpreter;

/// One `GatewayScriptAlias`.
#[derive(Debug, Clone)]
pub struct Mount {
    pub prefix: Prefix,
    pub app: AppSpec,
    /// Where it is mounted (`FILE:LINE`), for errors found later.
    pub at: String,
}

/// Configuration of the main server or a virtual host.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    pub mounts: Vec<Mount>,
    pub mode: Option<Mode>,
    pub python_home: Option<PathBuf>,
    pub python_path: Vec<PathBuf>,
    /// `GatewaySharedInterpreter`: whether embedded applications of different
    /// scripts may share the interpreter.
    pub shared_interpreter: Option<bool>,
    /// `GatewayPreload`: whether each child imports the embedded applications
    /// when it starts.
    pub preload: Option<bool>,
    /// `GatewaySlowRequest`: seconds after which an embedded request still
    /// running has its Python stack logged.
    pub slow_request: Option<u64>,
    /// `GatewayStatusCounters`: whether requests are counted for the status
    /// page (default on).
    pub status_counters: Option<bool>,
}

impl ServerConfig {
    /// The mount that serves `uri`: the longest matching prefix.
    pub fn mount_for(&self, uri: &[u8]) -> Option<&Mount> {
        self.mounts
            .iter()
            .filter(|m| m.prefix.split(uri).is_some())
            .max_by_key(|m| m.prefix.as_bytes().len())
    }
}

/// Configuration of a `<Directory>` or `<Location>`.
#[derive(Debug, Clone, Default)]
pub struct DirConfig {
    pub mode: Option<Mode>,
}

/// The daemon groups and the daemon-mode references of the configuration being
/// read, kept outside the per-server records: group names are global to the
/// server (a group defined in one virtual host can serve another).
#[derive(Debug, Default)]
pub struct Parsed {
    pub groups: Groups,
    /// `GatewayMode daemon NAME` inside a `<Directory>`, `<Location>` or the like:
    /// the name and the server of the section, whose mounts the section may send
    /// to the group.
    pub sections: Vec<(String, ServerId)>,
}

static PARSED: LazyLock<Mutex<Parsed>> = LazyLock::new(Mutex::default);

/// What the configuration read so far defines and references.
pub fn parsed() -> MutexGuard<'static, Parsed> {
    PARSED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forgets the previous reading (httpd reads its configuration again on each
/// start pass and restart).
pub fn reset_parsed() {
    *parsed() = Parsed::default();
}

impl ServerConfig {
    /// The configuration of a virtual host (`add`) on top of the main server's (`base`).
    fn merge(base: &ServerConfig, add: &ServerConfig) -> ServerConfig {
        ServerConfig {
            mounts: add.mounts.iter().chain(&base.mounts).cloned().collect(),
            mode: add.mode.clone().or_else(|| base.mode.clone()),
            python_home: base.python_home.clone(),
            python_path: base.python_path.clone(),
            shared_interpreter: base.shared_interpreter,
            preload: base.preload,
            slow_request: base.slow_request,
            status_counters: base.status_counters,
        }
    }
}

impl DirConfig {
    fn merge(base: &DirConfig, add: &DirConfig) -> DirConfig {
        DirConfig {
            mode: add.mode.clone().or_else(|| base.mode.clone()),
        }
    }
}

/// Merges two records of type `T` into a new one in pool `p`; if either is
/// missing (making it failed), the other stands for the merge.
///
/// # Safety
/// `p` must be httpd's live configuration pool; `base` and `add` NULL or
/// records of type `T` made by this module.
unsafe fn merge_records<T: 'static>(
    p: *mut apr_pool_t,
    base: *mut c_void,
    add: *mut c_void,
    merge: fn(&T, &T) -> T,
) -> *mut c_void {
    // SAFETY: guaranteed by the caller; the records are only read here.
    let (pool, b, a) = unsafe {
        (
            Pool::from_raw(p),
            base.cast::<T>().as_ref(),
            add.cast::<T>().as_ref(),
        )
    };
    match (b, a) {
        (Some(b), Some(a)) => pool.own(merge(b, a)),
        (None, _) => add,
        (_, None) => base,
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_create_server_config(
    p: *mut apr_pool_t,
    _s: *mut server_rec,
) -> *mut c_void {
    guard(
        "creating a server configuration",
        std::ptr::null_mut(),
        || {
            // SAFETY: httpd passes its live configuration pool, used by its one thread.
            unsafe { Pool::from_raw(p) }.own(ServerConfig::default())
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn gateway_merge_server_config(
    p: *mut apr_pool_t,
    base: *mut c_void,
    add: *mut c_void,
) -> *mut c_void {
    guard("merging server configurations", add, || {
        // SAFETY: httpd passes its configuration pool and two records made by
        // gateway_create_server_config.
        unsafe { merge_records(p, base, add, ServerConfig::merge) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_create_dir_config(
    p: *mut apr_pool_t,
    _dir: *mut c_char,
) -> *mut c_void {
    guard(
        "creating a directory configuration",
        std::ptr::null_mut(),
        || {
            // SAFETY: httpd passes a live pool, used by this thread only (configuration
            // reading, or the request being served).
            unsafe { Pool::from_raw(p) }.own(DirConfig::default())
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn gateway_merge_dir_config(
    p: *mut apr_pool_t,
    base: *mut c_void,
    add: *mut c_void,
) -> *mut c_void {
    guard("merging directory configurations", add, || {
        // SAFETY: httpd passes a live pool (of the configuration or of the request
        // being served) and two records made by gateway_create_dir_config.
        unsafe { merge_records(p, base, add, DirConfig::merge) }
    })
}

/// Runs the handler of `directive` and turns its result into what httpd
/// expects: NULL, or a message in the configuration pool (httpd adds the file
/// and line). A panic is an error like any other, that stops httpd.
fn directive(
    mut cmd: Cmd<'_>,
    directive: &str,
    handler: impl FnOnce(&mut Cmd<'_>) -> Result<(), ConfigError>,
) -> *const c_char {
    let result = catch(|| handler(&mut cmd)).unwrap_or_else(|p| {
        log::error!("{p} in {directive}");
        Err(ConfigError(p.to_string()))
    });
    match result {
        Ok(()) => std::ptr::null(),
        Err(e) => {
            let msg = format!("{directive}: {e}");
            cmd.pool().strdup(msg.as_bytes()).as_ptr()
        }
    }
}

/// This module's record of the server `cmd` configures.
fn server_config<'a>(cmd: &'a mut Cmd<'_>) -> Result<&'a mut ServerConfig, ConfigError> {
    cmd.server_config()
        .ok_or_else(|| ConfigError("internal error (no configuration record)".into()))
}

/// `GatewayScriptAlias URL-PATH FILE[:CALLABLE] [interface=wsgi|asgi]`
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_script_alias(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    argc: c_int,
    argv: *const *mut c_char,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms, the
    // section's record, and argc NUL-terminated arguments.
    let (cmd, argv) = unsafe { (Cmd::from_raw(cmd, dcfg), Argv::from_raw(argc, argv)) };
    directive(cmd, "GatewayScriptAlias", |cmd| match argv.to_strs()?[..] {
        [url, target, ref options @ ..] if options.len() <= 1 => {
            script_alias(cmd, url, target, options)
        }
        _ => Err(ConfigError(
            "takes URL-PATH FILE[:CALLABLE] [interface=wsgi|asgi]".into(),
        )),
    })
}

fn script_alias(
    cmd: &mut Cmd<'_>,
    url: &str,
    target: &str,
    options: &[&str],
) -> Result<(), ConfigError> {
    if !url.starts_with('/') {
        return Err(ConfigError(format!(
            "the URL path must start with '/', got '{url}'"
        )));
    }
    let app = AppSpec::parse_with(target, Path::new(""), options)?;
    let at = cmd.origin();
    let cfg = server_config(cmd)?;
    let prefix = Prefix::new(url.as_bytes());
    if cfg.mounts.iter().any(|m| m.prefix == prefix) {
        return Err(ConfigError(format!(
            "'{url}' is already mounted in this server"
        )));
    }
    cfg.mounts.push(Mount { prefix, app, at });
    Ok(())
}

/// `GatewayMode embedded | daemon NAME`, for a server or inside a section.
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_mode(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    argc: c_int,
    argv: *const *mut c_char,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms, the
    // section's record, and argc NUL-terminated arguments.
    let (cmd, argv) = unsafe { (Cmd::from_raw(cmd, dcfg), Argv::from_raw(argc, argv)) };
    directive(cmd, "GatewayMode", |cmd| {
        mode(cmd, Mode::parse(&argv.to_strs()?)?)
    })
}

fn mode(cmd: &mut Cmd<'_>, mode: Mode) -> Result<(), ConfigError> {
    let in_section = cmd.section_path().is_some();
    if let Mode::Daemon(name) = &mode {
        let mut parsed = parsed();
        // Checked once the whole configuration is read: the group may be defined later.
        parsed.groups.refer(name, cmd.origin());
        if in_section {
            parsed.sections.push((name.clone(), cmd.server_id()));
        }
    }
    match (in_section, cmd.section_config()) {
        (true, Some(section)) => section.mode = Some(mode),
        (false, _) => server_config(cmd)?.mode = Some(mode),
        (true, None) => {
            return Err(ConfigError(
                "internal error (no configuration record for this section)".into(),
            ))
        }
    }
    Ok(())
}

/// `GatewayDaemon NAME [key=value ...]`
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_daemon(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    argc: c_int,
    argv: *const *mut c_char,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms, the
    // section's record, and argc NUL-terminated arguments.
    let (cmd, argv) = unsafe { (Cmd::from_raw(cmd, dcfg), Argv::from_raw(argc, argv)) };
    directive(cmd, "GatewayDaemon", |cmd| {
        let options = DaemonOptions::parse(&argv.to_strs()?)?;
        parsed().groups.define(options, cmd.origin())
    })
}

/// Who the embedded interpreter will run as: the `User`/`Group` read so far
/// (children call initgroups), or this user when httpd does not run as root.
/// None while root has not read `User` yet: the children check for themselves.
fn worker_user() -> Option<interpreter::HomeUser> {
    let (uid, gid) = records::unixd_ids();
    if records::euid() != 0 {
        Some(interpreter::HomeUser::current())
    } else {
        (uid != u32::MAX).then(|| interpreter::HomeUser::new(uid, gid, true))
    }
}

/// `GatewayPythonHome DIR`
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_python_home(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    dir: *const c_char,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms, the
    // section's record, and the directive's NUL-terminated argument.
    let (cmd, dir) = unsafe { (Cmd::from_raw(cmd, dcfg), Arg::from_raw(dir)) };
    directive(cmd, "GatewayPythonHome", |cmd| python_home(cmd, dir))
}

fn python_home(cmd: &mut Cmd<'_>, dir: Arg<'_>) -> Result<(), ConfigError> {
    cmd.check_context(GLOBAL_ONLY)?;
    let dir = PathBuf::from(dir.to_str()?);
    let cfg = server_config(cmd)?;
    if let Some(first) = &cfg.python_home {
        return Err(ConfigError(format!(
            "is given twice ('{}', then '{}'): give it once",
            first.display(),
            dir.display()
        )));
    }
    interpreter::check_home(&dir).map_err(|e| ConfigError(e.to_string()))?;
    if let Some(user) = worker_user() {
        interpreter::check_home_access(&dir, &user).map_err(|e| ConfigError(e.to_string()))?;
    }
    cfg.python_home = Some(dir);
    Ok(())
}

/// `GatewaySharedInterpreter On|Off`
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_shared_interpreter(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    on: c_int,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms and the section's record.
    let cmd = unsafe { Cmd::from_raw(cmd, dcfg) };
    directive(cmd, "GatewaySharedInterpreter", |cmd| {
        cmd.check_context(GLOBAL_ONLY)?;
        let cfg = server_config(cmd)?;
        if cfg.shared_interpreter.is_some() {
            return Err(ConfigError("is given twice: give it once".into()));
        }
        cfg.shared_interpreter = Some(on != 0);
        Ok(())
    })
}

/// `GatewayPreload On|Off`
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_preload(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    on: c_int,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms and the section's record.
    let cmd = unsafe { Cmd::from_raw(cmd, dcfg) };
    directive(cmd, "GatewayPreload", |cmd| {
        cmd.check_context(GLOBAL_ONLY)?;
        let cfg = server_config(cmd)?;
        if cfg.preload.is_some() {
            return Err(ConfigError("is given twice: give it once".into()));
        }
        cfg.preload = Some(on != 0);
        Ok(())
    })
}

/// `GatewayStatusCounters On|Off`
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_status_counters(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    on: c_int,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms and the section's record.
    let cmd = unsafe { Cmd::from_raw(cmd, dcfg) };
    directive(cmd, "GatewayStatusCounters", |cmd| {
        cmd.check_context(GLOBAL_ONLY)?;
        let cfg = server_config(cmd)?;
        if cfg.status_counters.is_some() {
            return Err(ConfigError("is given twice: give it once".into()));
        }
        cfg.status_counters = Some(on != 0);
        Ok(())
    })
}

/// `GatewaySlowRequest SECONDS`
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_slow_request(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    value: *const c_char,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms, the
    // section's record, and the directive's NUL-terminated argument.
    let (cmd, value) = unsafe { (Cmd::from_raw(cmd, dcfg), Arg::from_raw(value)) };
    directive(cmd, "GatewaySlowRequest", |cmd| {
        cmd.check_context(GLOBAL_ONLY)?;
        let seconds = config::seconds(value.to_str()?, 1)?;
        let cfg = server_config(cmd)?;
        if cfg.slow_request.is_some() {
            return Err(ConfigError("is given twice: give it once".into()));
        }
        cfg.slow_request = Some(seconds);
        Ok(())
    })
}

/// `GatewayPythonPath DIR[:DIR...]`
#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_python_path(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    path: *const c_char,
) -> *const c_char {
    // SAFETY: httpd calls a directive handler with its live cmd_parms, the
    // section's record, and the directive's NUL-terminated argument.
    let (cmd, path) = unsafe { (Cmd::from_raw(cmd, dcfg), Arg::from_raw(path)) };
    directive(cmd, "GatewayPythonPath", |cmd| {
        cmd.check_context(GLOBAL_ONLY)?;
        let dirs = split_path_list(path.to_str()?);
        server_config(cmd)?.python_path.extend(dirs);
        Ok(())
    })
}
