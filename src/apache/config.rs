//! The Apache directives: per-server and per-directory configuration records,
//! their merging, and one handler per directive.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex, MutexGuard};

use super::ffi::*;
use crate::common::config::{split_path_list, AppSpec, ConfigError, DaemonOptions, Groups, Mode};
use crate::common::mount::Prefix;
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
    /// the name and the server record (as an address) of the section, whose
    /// mounts the section may send to the group.
    pub sections: Vec<(String, usize)>,
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

/// Where the directive being handled was written: `file:line`.
///
/// # Safety
/// `cmd` must be the live cmd_parms of a directive handler.
unsafe fn origin(cmd: *mut cmd_parms) -> String {
    // SAFETY: cmd is live; its directive (when set) names a NUL-terminated file.
    unsafe {
        let d = (*cmd).directive;
        if d.is_null() || (*d).filename.is_null() {
            return "(unknown place)".into();
        }
        format!(
            "{}:{}",
            CStr::from_ptr((*d).filename).to_string_lossy(),
            (*d).line_num
        )
    }
}

/// Moves `value` into memory owned by `pool`: it is dropped when the pool is.
fn pool_owned<T>(pool: *mut apr_pool_t, value: T) -> *mut c_void {
    unsafe extern "C" fn drop_box<T>(data: *mut c_void) -> apr_status_t {
        // SAFETY: data came from Box::into_raw below and the pool runs this once.
        drop(unsafe { Box::from_raw(data.cast::<T>()) });
        APR_SUCCESS as apr_status_t
    }
    let ptr = Box::into_raw(Box::new(value)).cast::<c_void>();
    // SAFETY: pool is a live pool handed to us by httpd; the cleanup frees ptr with it.
    unsafe {
        apr_pool_cleanup_register(pool, ptr, Some(drop_box::<T>), Some(apr_pool_cleanup_null))
    };
    ptr
}

/// The record in the module's slot of a configuration vector.
///
/// # Safety
/// `vector` must be a configuration vector of this module's kind (server or dir).
pub unsafe fn module_config<'a, T>(vector: *mut ap_conf_vector_t) -> Option<&'a T> {
    // SAFETY: vector has one slot per module; ours is at the index httpd gave this module.
    let slot = unsafe {
        *vector
            .cast::<*mut c_void>()
            .add(gateway_ap_module_index() as usize)
    };
    // SAFETY: the slot holds NULL or a record of type T made by this module (guaranteed by the caller).
    unsafe { slot.cast::<T>().as_ref() }
}

/// # Safety
/// `vector` must be a configuration vector of this module's kind, whose slot holds a T.
unsafe fn module_config_mut<'a, T>(vector: *mut ap_conf_vector_t) -> &'a mut T {
    // SAFETY: vector has one slot per module; ours is at the index httpd gave this module.
    let slot = unsafe {
        *vector
            .cast::<*mut c_void>()
            .add(gateway_ap_module_index() as usize)
    };
    // SAFETY: the slot holds a record of type T made by this module (guaranteed by the caller).
    unsafe { &mut *slot.cast::<T>() }
}

#[no_mangle]
pub extern "C" fn gateway_create_server_config(
    p: *mut apr_pool_t,
    _s: *mut server_rec,
) -> *mut c_void {
    pool_owned(p, ServerConfig::default())
}

#[no_mangle]
pub unsafe extern "C" fn gateway_merge_server_config(
    p: *mut apr_pool_t,
    base: *mut c_void,
    add: *mut c_void,
) -> *mut c_void {
    // SAFETY: httpd passes two records made by gateway_create_server_config.
    let (base, add) = unsafe { (&*base.cast::<ServerConfig>(), &*add.cast::<ServerConfig>()) };
    let merged = ServerConfig {
        mounts: add.mounts.iter().chain(&base.mounts).cloned().collect(),
        mode: add.mode.clone().or_else(|| base.mode.clone()),
        python_home: base.python_home.clone(),
        python_path: base.python_path.clone(),
        shared_interpreter: base.shared_interpreter,
    };
    pool_owned(p, merged)
}

#[no_mangle]
pub extern "C" fn gateway_create_dir_config(p: *mut apr_pool_t, _dir: *mut c_char) -> *mut c_void {
    pool_owned(p, DirConfig::default())
}

#[no_mangle]
pub unsafe extern "C" fn gateway_merge_dir_config(
    p: *mut apr_pool_t,
    base: *mut c_void,
    add: *mut c_void,
) -> *mut c_void {
    // SAFETY: httpd passes two records made by gateway_create_dir_config.
    let (base, add) = unsafe { (&*base.cast::<DirConfig>(), &*add.cast::<DirConfig>()) };
    pool_owned(
        p,
        DirConfig {
            mode: add.mode.clone().or_else(|| base.mode.clone()),
        },
    )
}

/// Turns a directive handler's result into what httpd expects: NULL or a message
/// in the configuration pool. httpd adds the file and line.
fn result(cmd: *mut cmd_parms, directive: &str, r: Result<(), ConfigError>) -> *const c_char {
    match r {
        Ok(()) => std::ptr::null(),
        Err(e) => {
            let msg = CString::new(format!("{directive}: {e}")).unwrap_or_default();
            // SAFETY: cmd is the live cmd_parms of this directive; apr_pstrdup copies msg.
            unsafe { apr_pstrdup((*cmd).pool, msg.as_ptr()) }
        }
    }
}

/// Borrows a C string argument as UTF-8.
///
/// # Safety
/// `s` must be a NUL-terminated string that outlives `'a`.
unsafe fn arg<'a>(s: *const c_char) -> Result<&'a str, ConfigError> {
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| ConfigError("arguments must be UTF-8".into()))
}

/// # Safety
/// `argv` must hold `argc` NUL-terminated strings that outlive `'a`.
unsafe fn argv<'a>(argc: c_int, argv: *const *mut c_char) -> Result<Vec<&'a str>, ConfigError> {
    (0..argc as usize)
        // SAFETY: each of the argc entries is such a string (guaranteed by the caller).
        .map(|i| unsafe { arg(*argv.add(i)) })
        .collect()
}

/// The server record a directive configures.
///
/// # Safety
/// `cmd` must be the live cmd_parms of a directive handler.
unsafe fn server_config<'a>(cmd: *mut cmd_parms) -> &'a mut ServerConfig {
    // SAFETY: cmd->server is the server record being configured; its vector has our ServerConfig.
    unsafe { module_config_mut::<ServerConfig>((*(*cmd).server).module_config) }
}

/// Fails unless the directive stands outside any virtual host or section.
///
/// # Safety
/// `cmd` must be the live cmd_parms of a directive handler.
unsafe fn global_only(cmd: *mut cmd_parms) -> Result<(), ConfigError> {
    // SAFETY: cmd is live (guaranteed by the caller).
    let msg = unsafe { ap_check_cmd_context(cmd, GLOBAL_ONLY) };
    if msg.is_null() {
        Ok(())
    } else {
        Err(ConfigError(
            // SAFETY: ap_check_cmd_context returns NULL or a NUL-terminated message.
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned(),
        ))
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_script_alias(
    cmd: *mut cmd_parms,
    _dcfg: *mut c_void,
    url: *const c_char,
    target: *const c_char,
) -> *const c_char {
    let r = (|| {
        // SAFETY: httpd passes the directive's two NUL-terminated arguments.
        let (url, target) = unsafe { (arg(url)?, arg(target)?) };
        if !url.starts_with('/') {
            return Err(ConfigError(format!(
                "the URL path must start with '/', got '{url}'"
            )));
        }
        let app = AppSpec::parse(target)?;
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        let cfg = unsafe { server_config(cmd) };
        let prefix = Prefix::new(url.as_bytes());
        if cfg.mounts.iter().any(|m| m.prefix == prefix) {
            return Err(ConfigError(format!(
                "'{url}' is already mounted in this server"
            )));
        }
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        let at = unsafe { origin(cmd) };
        cfg.mounts.push(Mount { prefix, app, at });
        Ok(())
    })();
    result(cmd, "GatewayScriptAlias", r)
}

#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_mode(
    cmd: *mut cmd_parms,
    dcfg: *mut c_void,
    argc: c_int,
    argv_: *const *mut c_char,
) -> *const c_char {
    let r = (|| {
        // SAFETY: httpd passes argc NUL-terminated arguments.
        let mode = Mode::parse(&unsafe { argv(argc, argv_) }?)?;
        // Inside <Directory>/<Location> cmd->path is set and dcfg is that section's record.
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        let in_section = !unsafe { (*cmd).path }.is_null();
        if let Mode::Daemon(name) = &mode {
            let mut parsed = parsed();
            // Checked once the whole configuration is read: the group may be defined later.
            // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
            parsed.groups.refer(name, unsafe { origin(cmd) });
            if in_section {
                parsed
                    .sections
                    // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
                    .push((name.clone(), unsafe { (*cmd).server } as usize));
            }
        }
        if !in_section {
            // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
            unsafe { server_config(cmd) }.mode = Some(mode);
        } else {
            // SAFETY: inside a section, dcfg is that section's DirConfig (made by gateway_create_dir_config).
            unsafe { &mut *dcfg.cast::<DirConfig>() }.mode = Some(mode);
        }
        Ok(())
    })();
    result(cmd, "GatewayMode", r)
}

#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_daemon(
    cmd: *mut cmd_parms,
    _dcfg: *mut c_void,
    argc: c_int,
    argv_: *const *mut c_char,
) -> *const c_char {
    let r = (|| {
        // SAFETY: httpd passes argc NUL-terminated arguments.
        let options = DaemonOptions::parse(&unsafe { argv(argc, argv_) }?)?;
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        parsed().groups.define(options, unsafe { origin(cmd) })
    })();
    result(cmd, "GatewayDaemon", r)
}

/// Who the embedded interpreter will run as: the `User`/`Group` read so far
/// (children call initgroups), or this user when httpd does not run as root.
/// None while root has not read `User` yet: the children check for themselves.
fn worker_user() -> Option<interpreter::HomeUser> {
    // SAFETY: geteuid has no preconditions; mod_unixd fills ap_unixd_config while
    // reading User/Group (user_id stays -1 until then); only read here.
    let (euid, uid, gid) = unsafe {
        (
            libc::geteuid(),
            ap_unixd_config.user_id,
            ap_unixd_config.group_id,
        )
    };
    if euid != 0 {
        Some(interpreter::HomeUser::current())
    } else {
        (uid != u32::MAX).then(|| interpreter::HomeUser::new(uid, gid, true))
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_python_home(
    cmd: *mut cmd_parms,
    _dcfg: *mut c_void,
    dir: *const c_char,
) -> *const c_char {
    let r = (|| {
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        unsafe { global_only(cmd) }?;
        // SAFETY: httpd passes the directive's NUL-terminated argument.
        let dir = PathBuf::from(unsafe { arg(dir) }?);
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        let cfg = unsafe { server_config(cmd) };
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
    })();
    result(cmd, "GatewayPythonHome", r)
}

#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_shared_interpreter(
    cmd: *mut cmd_parms,
    _dcfg: *mut c_void,
    on: c_int,
) -> *const c_char {
    let r = (|| {
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        unsafe { global_only(cmd) }?;
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        let cfg = unsafe { server_config(cmd) };
        if cfg.shared_interpreter.is_some() {
            return Err(ConfigError("is given twice: give it once".into()));
        }
        cfg.shared_interpreter = Some(on != 0);
        Ok(())
    })();
    result(cmd, "GatewaySharedInterpreter", r)
}

#[no_mangle]
pub unsafe extern "C" fn gateway_cmd_python_path(
    cmd: *mut cmd_parms,
    _dcfg: *mut c_void,
    path: *const c_char,
) -> *const c_char {
    let r = (|| {
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        unsafe { global_only(cmd) }?;
        // SAFETY: httpd passes the directive's NUL-terminated argument.
        let dirs = split_path_list(unsafe { arg(path) }?);
        // SAFETY: httpd calls this handler with the live cmd_parms of the directive it reads.
        unsafe { server_config(cmd) }.python_path.extend(dirs);
        Ok(())
    })();
    result(cmd, "GatewayPythonPath", r)
}
