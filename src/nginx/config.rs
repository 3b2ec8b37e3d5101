//! The nginx directives: the module's http-level (main) and location records,
//! their merging, and one handler per directive. nginx adds the file and line to
//! every error a handler returns.

use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ffi::*;
use crate::common::config::{
    self, split_path_list, AppSpec, ConfigError, DaemonOptions, Groups, Mode,
};
use crate::common::mount::Prefix;
use crate::daemon::auth::Generation;
use crate::daemon::supervisor::SupervisorConfig;
use crate::python::interpreter::{self, HomeUser};

/// Python threads per worker when `gateway_threads` is not set: enough that a few
/// slow requests (sleeps, upstream calls) do not hold up the rest, few enough that
/// CPU-bound applications do not spend their time handing the GIL around.
pub const DEFAULT_THREADS: usize = 8;

/// A placeholder worker uid/gid for checks made before nginx has read `user`.
const NOBODY: u32 = 65534;

/// The most threads `gateway_threads` accepts.
pub const MAX_THREADS: usize = 1024;

/// The http-level settings: the interpreter of every worker.
#[derive(Debug, Default)]
pub struct MainConfig {
    pub python_home: Option<PathBuf>,
    /// Where `python_home` is set (`FILE:LINE`), for the workers' access check.
    pub python_home_at: String,
    pub python_path: Vec<PathBuf>,
    pub threads: Option<usize>,
    /// The daemon groups, and the places `gateway_mode daemon` names them.
    pub groups: Groups,
    /// How many locations serve an application: workers start their threads only if any do.
    pub apps: usize,
    /// How many of them run it embedded: workers start Python only if any do.
    pub embedded: usize,
    /// The applications of the locations that run them in a daemon group: the
    /// group's name and the application.
    pub daemon_mounts: Vec<(String, AppSpec)>,
    /// `gateway_shared_interpreter`: whether embedded applications of
    /// different scripts may share the interpreter.
    pub shared_interpreter: Option<bool>,
    /// The first location that runs its application embedded.
    pub first_embedded: Option<Arc<Mount>>,
}

/// An application mounted by `gateway_app` in one location.
#[derive(Debug)]
pub struct Mount {
    pub app: AppSpec,
    /// SCRIPT_NAME: the location's prefix; the root (empty) for regex and
    /// named locations, whose SCRIPT_NAME is empty.
    pub prefix: Prefix,
    /// Where `gateway_app` is written (`FILE:LINE`), for errors found later.
    pub at: String,
}

/// A location's settings.
#[derive(Debug, Default)]
pub struct LocConfig {
    pub mount: Option<Arc<Mount>>,
    pub mode: Option<Mode>,
}

/// Moves `value` into memory owned by `pool`: it is dropped with the pool.
fn pool_owned<T>(pool: *mut ngx_pool_t, value: T) -> *mut c_void {
    unsafe extern "C" fn drop_box<T>(data: *mut c_void) {
        // SAFETY: data came from Box::into_raw below and the pool runs this once.
        drop(unsafe { Box::from_raw(data.cast::<T>()) });
    }
    // SAFETY: pool is a live configuration pool; the cleanup frees the box with it.
    let cln = unsafe { ngx_pool_cleanup_add(pool, 0) };
    if cln.is_null() {
        return std::ptr::null_mut();
    }
    let ptr = Box::into_raw(Box::new(value)).cast::<c_void>();
    // SAFETY: cln is a fresh cleanup record of pool.
    unsafe {
        (*cln).handler = Some(drop_box::<T>);
        (*cln).data = ptr;
    }
    ptr
}

#[no_mangle]
pub unsafe extern "C" fn gateway_create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes its live configuration context.
    pool_owned(unsafe { (*cf).pool }, MainConfig::default())
}

#[no_mangle]
pub unsafe extern "C" fn gateway_create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: as above.
    pool_owned(unsafe { (*cf).pool }, LocConfig::default())
}

/// Runs once the http block is read: every group that `gateway_mode daemon`
/// names must be defined (anywhere in the block, so only now can it be checked).
#[no_mangle]
pub unsafe extern "C" fn gateway_init_main_conf(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    user: libc::uid_t,
    group: libc::gid_t,
) -> *mut c_char {
    // SAFETY: nginx passes the record made by gateway_create_main_conf.
    let mcf = unsafe { &*conf.cast::<MainConfig>() };
    let mut ok = true;
    for (name, at) in mcf.groups.undefined() {
        let msg = format!(
            "gateway_mode: daemon process group '{name}' is not defined \
             (define it in the http block with 'gateway_daemon {name} ...') in {at}"
        );
        let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
        // SAFETY: cf->log is the configuration's live log.
        unsafe { gateway_ngx_log((*cf).log, NGX_LOG_EMERG as ngx_uint_t, msg.as_ptr()) };
        ok = false;
    }
    // The groups' own problems (unknown user, missing python-home) fail here
    // rather than in init_module, so that a reload with them keeps the running
    // configuration instead of ending the master. Without `user` so far, the
    // workers' user is not known yet: any user other than root will do here.
    let unset = |id: u32| id == u32::MAX;
    let generation = match Generation::new(&[], []) {
        Ok(g) => g,
        Err(e) => {
            let msg =
                CString::new(format!("gateway: daemon mode cannot start: {e}")).unwrap_or_default();
            // SAFETY: cf->log is the configuration's live log.
            unsafe { gateway_ngx_log((*cf).log, NGX_LOG_EMERG as ngx_uint_t, msg.as_ptr()) };
            return NGX_CONF_ERROR;
        }
    };
    let config = SupervisorConfig {
        server: "nginx".into(),
        run_dir: PathBuf::new(),
        server_pid: 0,
        server_uid: if unset(user) { NOBODY } else { user },
        server_gid: if unset(group) { NOBODY } else { group },
        groups: Vec::new(),
        generation,
        previous: None,
    };
    let embedded_home = mcf.python_home.as_ref().and_then(|home| {
        // Workers run as `user` (nobody without it) when the master is root, else as its user.
        // SAFETY: geteuid has no preconditions.
        let worker = if unsafe { libc::geteuid() } != 0 {
            HomeUser::current()
        } else {
            HomeUser::new(config.server_uid, config.server_gid, true)
        };
        let e = interpreter::check_home_access(home, &worker).err()?;
        Some(format!(
            "gateway_python_home: {e} in {}",
            mcf.python_home_at
        ))
    });
    for problem in embedded_home
        .into_iter()
        .chain(super::daemons::problems(&mcf.groups, &config))
    {
        let msg = CString::new(problem.replace('\0', "\\0")).unwrap_or_default();
        // SAFETY: cf->log is the configuration's live log.
        unsafe { gateway_ngx_log((*cf).log, NGX_LOG_EMERG as ngx_uint_t, msg.as_ptr()) };
        ok = false;
    }
    if ok {
        std::ptr::null_mut()
    } else {
        NGX_CONF_ERROR
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_merge_loc_conf(
    cf: *mut ngx_conf_t,
    parent: *mut c_void,
    child: *mut c_void,
    mcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes two records made by gateway_create_loc_conf; the shim the main record.
    let (parent, child, mcf) = unsafe {
        (
            &*parent.cast::<LocConfig>(),
            &mut *child.cast::<LocConfig>(),
            &mut *mcf.cast::<MainConfig>(),
        )
    };
    if child.mode.is_none() {
        child.mode = parent.mode.clone();
    }
    match (&child.mount, &child.mode) {
        (Some(mount), Some(Mode::Daemon(group))) => {
            mcf.daemon_mounts.push((group.clone(), mount.app.clone()))
        }
        (Some(mount), _) => {
            mcf.embedded += 1;
            if let Some(clash) = embedded_clash(mcf, mount) {
                let msg = CString::new(clash.replace('\0', "\\0")).unwrap_or_default();
                // SAFETY: cf->log is the configuration's live log.
                unsafe { gateway_ngx_log((*cf).log, NGX_LOG_EMERG as ngx_uint_t, msg.as_ptr()) };
                return NGX_CONF_ERROR;
            }
        }
        (None, _) => {}
    }
    std::ptr::null_mut()
}

/// A second script in embedded mode, which would share the worker's one
/// interpreter with the first without `gateway_shared_interpreter on`.
fn embedded_clash(mcf: &mut MainConfig, mount: &Arc<Mount>) -> Option<String> {
    if mcf.shared_interpreter == Some(true) {
        return None;
    }
    let first = mcf.first_embedded.get_or_insert_with(|| mount.clone());
    (first.app.file != mount.app.file).then(|| {
        config::interpreter_clash(
            "nginx",
            (&first.app.file, &first.at),
            (&mount.app.file, &mount.at),
        )
    })
}

/// `FILE:LINE` of the directive `cf` is parsing.
///
/// # Safety
/// `cf` must be nginx's live configuration context inside a directive handler.
unsafe fn position(cf: *mut ngx_conf_t) -> String {
    // SAFETY: cf->conf_file is the file being parsed; its name lives in the cycle's pool.
    unsafe {
        let file = &*(*cf).conf_file;
        format!(
            "{}:{}",
            String::from_utf8_lossy(str_bytes(&file.file.name)),
            file.line
        )
    }
}

/// The arguments of one directive, and how to read its paths.
struct Args<'a> {
    values: Vec<&'a str>,
    /// nginx's prefix (`-p`): relative paths are relative to it, as for nginx's own directives.
    prefix: &'a Path,
}

impl<'a> Args<'a> {
    /// The arguments of the directive `cf` is parsing, without its name.
    ///
    /// # Safety
    /// `cf` must be nginx's live configuration context inside a directive handler.
    unsafe fn of(cf: *mut ngx_conf_t) -> Result<Args<'a>, ConfigError> {
        // SAFETY: cf->args is the array of ngx_str_t nginx parsed for this directive, and
        // cf->cycle->prefix is set for the whole configuration pass; both outlive the handler.
        let (all, prefix) = unsafe {
            let a = &*(*cf).args;
            (
                std::slice::from_raw_parts(a.elts.cast::<ngx_str_t>(), a.nelts),
                str_bytes(&(*(*cf).cycle).prefix),
            )
        };
        let utf8 = |b: &'a [u8]| {
            std::str::from_utf8(b).map_err(|_| ConfigError("arguments must be UTF-8".into()))
        };
        Ok(Args {
            values: all
                .iter()
                .skip(1)
                // SAFETY: each ngx_str_t of the array points into the configuration buffer.
                .map(|s| utf8(unsafe { str_bytes(s) }))
                .collect::<Result<_, _>>()?,
            prefix: Path::new(utf8(prefix)?),
        })
    }

    fn path(&self, path: &str) -> PathBuf {
        self.prefix.join(path)
    }
}

/// Runs a directive handler on its record of type `T` and turns its result into
/// what nginx expects: NGX_CONF_OK (NULL) or a message in the configuration pool,
/// which nginx prints after the directive's name and before its file and line.
///
/// # Safety
/// `cf` must be the live configuration context and `conf` the record of type `T`
/// that the directive table's offset selects.
unsafe fn directive<T>(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    handler: impl FnOnce(&mut T, &Args<'_>) -> Result<(), ConfigError>,
) -> *mut c_char {
    // SAFETY: guaranteed by the caller.
    let r =
        unsafe { Args::of(cf) }.and_then(|args| handler(unsafe { &mut *conf.cast::<T>() }, &args));
    let Err(e) = r else {
        return std::ptr::null_mut();
    };
    let msg = CString::new(e.0.replace('\0', "\\0")).unwrap_or_default();
    let bytes = msg.as_bytes_with_nul();
    // SAFETY: cf->pool is live; the copy (with its NUL) fits the allocation.
    unsafe {
        let p = ngx_pnalloc((*cf).pool, bytes.len()).cast::<u8>();
        if p.is_null() {
            return NGX_CONF_ERROR;
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        p.cast()
    }
}

fn duplicate() -> ConfigError {
    ConfigError("is duplicate".into())
}

/// Sets a directive's value, which may be given once.
fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), ConfigError> {
    if slot.is_some() {
        return Err(duplicate());
    }
    *slot = Some(value);
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_app(
    cf: *mut ngx_conf_t,
    lcf: *mut c_void,
    mcf: *mut c_void,
    clcf: *mut ngx_http_core_loc_conf_t,
) -> *mut c_char {
    // SAFETY: the shim passes the main record and the location's core record of this location;
    // lcf is this location's record of this module.
    let (mcf, clcf) = unsafe { (&mut *mcf.cast::<MainConfig>(), &*clcf) };
    // SAFETY: the location's name lives in the configuration pool.
    let name = unsafe { str_bytes(&clcf.name) };
    // SAFETY: cf is live inside this handler.
    let at = unsafe { position(cf) };
    let literal = clcf.regex.is_null() && clcf.named() == 0;
    let prefix = Prefix::new(if literal { name } else { b"" });
    // SAFETY: see above.
    unsafe {
        directive(cf, lcf, |lcf: &mut LocConfig, args| {
            if lcf.mount.is_some() {
                return Err(duplicate());
            }
            lcf.mount = Some(Arc::new(Mount {
                app: AppSpec::parse_in(args.values[0], args.prefix)?,
                prefix,
                at,
            }));
            mcf.apps += 1;
            Ok(())
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_mode(
    cf: *mut ngx_conf_t,
    lcf: *mut c_void,
    mcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: the shim passes this level's LocConfig and the MainConfig.
    let (mcf, at) = unsafe { (&mut *mcf.cast::<MainConfig>(), position(cf)) };
    // SAFETY: as above.
    unsafe {
        directive(cf, lcf, |lcf: &mut LocConfig, args| {
            if lcf.mode.is_some() {
                return Err(duplicate());
            }
            let mode = Mode::parse(&args.values)?;
            if let Mode::Daemon(name) = &mode {
                mcf.groups.refer(name, at);
            }
            lcf.mode = Some(mode);
            Ok(())
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_daemon(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: cf is live inside this handler.
    let at = unsafe { position(cf) };
    // SAFETY: NGX_HTTP_MAIN_CONF_OFFSET: conf is the MainConfig.
    unsafe {
        directive(cf, conf, |mcf: &mut MainConfig, args| {
            let mut options = DaemonOptions::parse(&args.values)?;
            // Relative paths are relative to nginx's prefix, as for gateway_python_home.
            options.python_home = options.python_home.map(|h| args.prefix.join(h));
            for dir in &mut options.python_path {
                *dir = args.prefix.join(&*dir);
            }
            mcf.groups.define(options, at)
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_python_home(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: cf is live inside this handler.
    let at = unsafe { position(cf) };
    // SAFETY: NGX_HTTP_MAIN_CONF_OFFSET: conf is the MainConfig.
    unsafe {
        directive(cf, conf, |mcf: &mut MainConfig, args| {
            if mcf.python_home.is_some() {
                return Err(duplicate());
            }
            let dir = args.path(args.values[0]);
            interpreter::check_home(&dir).map_err(|e| ConfigError(e.to_string()))?;
            mcf.python_home = Some(dir);
            mcf.python_home_at = at;
            Ok(())
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_python_path(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: NGX_HTTP_MAIN_CONF_OFFSET: conf is the MainConfig.
    unsafe {
        directive(cf, conf, |mcf: &mut MainConfig, args| {
            let dirs = split_path_list(args.values[0])
                .into_iter()
                .map(|d| args.prefix.join(d));
            mcf.python_path.extend(dirs);
            Ok(())
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_shared_interpreter(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: NGX_HTTP_MAIN_CONF_OFFSET: conf is the MainConfig.
    unsafe {
        directive(cf, conf, |mcf: &mut MainConfig, args| {
            let on = match args.values[0] {
                "on" => true,
                "off" => false,
                other => return Err(ConfigError(format!("needs 'on' or 'off', got '{other}'"))),
            };
            set_once(&mut mcf.shared_interpreter, on)
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_threads(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: NGX_HTTP_MAIN_CONF_OFFSET: conf is the MainConfig.
    unsafe {
        directive(cf, conf, |mcf: &mut MainConfig, args| {
            let value = args.values[0];
            match value.parse::<usize>() {
                Ok(n) if (1..=MAX_THREADS).contains(&n) => set_once(&mut mcf.threads, n),
                _ => Err(ConfigError(format!(
                    "needs a number of threads from 1 to {MAX_THREADS}, got '{value}'"
                ))),
            }
        })
    }
}
