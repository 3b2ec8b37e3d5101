//! The nginx directives: the module's http-level (main) and location records,
//! their merging, and one handler per directive. nginx adds the file and line to
//! every error a handler returns.

use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ffi::*;
use super::records::{Conf, Location};
use crate::common::config::{
    self, split_path_list, AppSpec, ConfigError, DaemonOptions, Groups, Mode,
};
use crate::common::mount::Prefix;
use crate::common::panic::catch;
use crate::daemon::launch;
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
    /// `gateway_preload`: whether each worker imports the embedded
    /// applications when it starts.
    pub preload: Option<bool>,
    /// The applications that locations run embedded, each once.
    pub embedded_apps: Vec<AppSpec>,
    /// `gateway_slow_request`: seconds after which an embedded request still
    /// running has its Python stack logged.
    pub slow_request: Option<u64>,
    /// `gateway_status_counters`: whether requests are counted for the status
    /// page (default on).
    pub status_counters: Option<bool>,
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

/// Runs a configuration hook (`what`) that answers nginx with `fallback` on a
/// failure: a panic in it is logged, with the file and line being parsed, and
/// fails the configuration.
fn hook<T>(cf: &Conf<'_>, what: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    catch(f).unwrap_or_else(|p| {
        cf.log(NGX_LOG_EMERG, &format!("gateway: {p} in {what}"));
        fallback
    })
}

/// Makes a record in the configuration's pool (dropped with it); NULL fails.
fn create<T: 'static>(cf: &Conf<'_>, what: &str, make: impl FnOnce() -> T) -> *mut c_void {
    hook(cf, what, std::ptr::null_mut(), || {
        cf.pool()
            .own(make())
            .map_or(std::ptr::null_mut(), |p| p.as_ptr().cast())
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes its live configuration context.
    let cf = unsafe { Conf::from_raw(cf) };
    create(&cf, "the http block", MainConfig::default)
}

#[no_mangle]
pub unsafe extern "C" fn gateway_create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes its live configuration context.
    let cf = unsafe { Conf::from_raw(cf) };
    create(&cf, "a location", LocConfig::default)
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
    // SAFETY: nginx passes its live configuration context and the record made by
    // gateway_create_main_conf.
    let (cf, mcf) = unsafe { (Conf::from_raw(cf), &*conf.cast::<MainConfig>()) };
    hook(&cf, "the http block", NGX_CONF_ERROR, || {
        let problems = init_main_conf(mcf, user, group);
        for problem in &problems {
            cf.log(NGX_LOG_EMERG, problem);
        }
        if problems.is_empty() {
            std::ptr::null_mut()
        } else {
            NGX_CONF_ERROR
        }
    })
}

/// What is wrong with the http block's settings, in words for `nginx -t`.
fn init_main_conf(mcf: &MainConfig, user: libc::uid_t, group: libc::gid_t) -> Vec<String> {
    let mut problems: Vec<String> = mcf
        .groups
        .undefined()
        .map(|(name, at)| {
            format!(
                "gateway_mode: daemon process group '{name}' is not defined \
                 (define it in the http block with 'gateway_daemon {name} ...') in {at}"
            )
        })
        .collect();
    // The groups' own problems (unknown user, missing python-home) fail here
    // rather than in init_module, so that a reload with them keeps the running
    // configuration instead of ending the master.
    let config = match checking_config(user, group) {
        Ok(config) => config,
        Err(e) => {
            problems.push(format!("gateway: daemon mode cannot start: {e}"));
            return problems;
        }
    };
    problems.extend(embedded_home_problem(mcf, &config));
    problems.extend(super::daemons::problems(&mcf.groups, &config));
    problems
}

/// The supervisor's settings as far as they are known while the configuration
/// is read. Without `user` so far, the workers' user is not known yet: any user
/// other than root will do here.
fn checking_config(user: libc::uid_t, group: libc::gid_t) -> std::io::Result<SupervisorConfig> {
    let known = |id: u32| if id == u32::MAX { NOBODY } else { id };
    launch::check_settings("nginx", known(user), known(group))
}

/// Whether the workers' user can read `gateway_python_home`.
fn embedded_home_problem(mcf: &MainConfig, config: &SupervisorConfig) -> Option<String> {
    let home = mcf.python_home.as_ref()?;
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
}

#[no_mangle]
pub unsafe extern "C" fn gateway_merge_loc_conf(
    cf: *mut ngx_conf_t,
    parent: *mut c_void,
    child: *mut c_void,
    mcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes its live configuration context and two records made by
    // gateway_create_loc_conf; the shim the main record. All three are distinct.
    let (cf, parent, child, mcf) = unsafe {
        (
            Conf::from_raw(cf),
            &*parent.cast::<LocConfig>(),
            &mut *child.cast::<LocConfig>(),
            &mut *mcf.cast::<MainConfig>(),
        )
    };
    hook(&cf, "a location", NGX_CONF_ERROR, || {
        match merge_loc_conf(parent, child, mcf) {
            Ok(()) => std::ptr::null_mut(),
            Err(clash) => {
                cf.log(NGX_LOG_EMERG, &clash);
                NGX_CONF_ERROR
            }
        }
    })
}

fn merge_loc_conf(
    parent: &LocConfig,
    child: &mut LocConfig,
    mcf: &mut MainConfig,
) -> Result<(), String> {
    if child.mode.is_none() {
        child.mode = parent.mode.clone();
    }
    match (&child.mount, &child.mode) {
        (Some(mount), Some(Mode::Daemon(group))) => {
            mcf.daemon_mounts.push((group.clone(), mount.app.clone()))
        }
        (Some(mount), _) => {
            mcf.embedded += 1;
            if !mcf.embedded_apps.contains(&mount.app) {
                mcf.embedded_apps.push(mount.app.clone());
            }
            if let Some(clash) = embedded_clash(mcf, mount) {
                return Err(clash);
            }
        }
        (None, _) => {}
    }
    Ok(())
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

/// The arguments of one directive, and how to read its paths.
struct Args<'a> {
    values: Vec<&'a str>,
    /// nginx's prefix (`-p`): relative paths are relative to it, as for nginx's own directives.
    prefix: &'a Path,
    /// Where the directive is written (`FILE:LINE`).
    at: String,
}

impl<'a> Args<'a> {
    /// The arguments of the directive `cf` is parsing, without its name.
    fn of(cf: &Conf<'a>) -> Result<Args<'a>, ConfigError> {
        let utf8 = |b: &'a [u8]| {
            std::str::from_utf8(b).map_err(|_| ConfigError("arguments must be UTF-8".into()))
        };
        Ok(Args {
            values: cf.args().skip(1).map(utf8).collect::<Result<_, _>>()?,
            prefix: Path::new(utf8(cf.prefix())?),
            at: cf.position(),
        })
    }

    fn path(&self, path: &str) -> PathBuf {
        self.prefix.join(path)
    }
}

/// Runs a directive handler on its record and turns its result into what nginx
/// expects: NGX_CONF_OK (NULL) or a message, which nginx prints after the
/// directive's name and before its file and line. A panic is such a message.
fn directive<T>(
    cf: &Conf<'_>,
    record: &mut T,
    handler: impl FnOnce(&mut T, &Args<'_>) -> Result<(), ConfigError>,
) -> *mut c_char {
    let done = catch(|| Args::of(cf).and_then(|args| handler(record, &args)));
    let msg = match done {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(e)) => e.0,
        Err(p) => p.to_string(),
    };
    cf.message(&msg)
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
    // SAFETY: nginx passes its live configuration context; the shim this location's
    // record of this module, the main record and the location's core record.
    let (cf, lcf, mcf, location) = unsafe {
        (
            Conf::from_raw(cf),
            &mut *lcf.cast::<LocConfig>(),
            &mut *mcf.cast::<MainConfig>(),
            Location::from_raw(clcf),
        )
    };
    directive(&cf, lcf, |lcf, args| {
        if lcf.mount.is_some() {
            return Err(duplicate());
        }
        let literal = location.is_literal();
        lcf.mount = Some(Arc::new(Mount {
            app: AppSpec::parse_with(args.values[0], args.prefix, &args.values[1..])?,
            prefix: Prefix::new(if literal { location.name() } else { b"" }),
            at: args.at.clone(),
        }));
        mcf.apps += 1;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_mode(
    cf: *mut ngx_conf_t,
    lcf: *mut c_void,
    mcf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes its live configuration context; the shim this level's
    // LocConfig and the MainConfig.
    let (cf, lcf, mcf) = unsafe {
        (
            Conf::from_raw(cf),
            &mut *lcf.cast::<LocConfig>(),
            &mut *mcf.cast::<MainConfig>(),
        )
    };
    directive(&cf, lcf, |lcf, args| {
        if lcf.mode.is_some() {
            return Err(duplicate());
        }
        let mode = Mode::parse(&args.values)?;
        if let Mode::Daemon(name) = &mode {
            mcf.groups.refer(name, args.at.clone());
        }
        lcf.mode = Some(mode);
        Ok(())
    })
}

/// The context and record of a directive of the http block.
///
/// # Safety
/// `cf` must be nginx's live configuration context and `conf` the MainConfig
/// (NGX_HTTP_MAIN_CONF_OFFSET), as nginx passes them to a directive handler.
unsafe fn main_directive<'c>(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
) -> (Conf<'c>, &'c mut MainConfig) {
    // SAFETY: guaranteed by the caller.
    unsafe { (Conf::from_raw(cf), &mut *conf.cast::<MainConfig>()) }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_daemon(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls the handler of an http-level directive.
    let (cf, mcf) = unsafe { main_directive(cf, conf) };
    directive(&cf, mcf, |mcf, args| {
        let mut options = DaemonOptions::parse(&args.values)?;
        // Relative paths are relative to nginx's prefix, as for gateway_python_home.
        options.python_home = options.python_home.map(|h| args.prefix.join(h));
        for dir in &mut options.python_path {
            *dir = args.prefix.join(&*dir);
        }
        mcf.groups.define(options, args.at.clone())
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_python_home(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls the handler of an http-level directive.
    let (cf, mcf) = unsafe { main_directive(cf, conf) };
    directive(&cf, mcf, |mcf, args| {
        if mcf.python_home.is_some() {
            return Err(duplicate());
        }
        let dir = args.path(args.values[0]);
        interpreter::check_home(&dir).map_err(|e| ConfigError(e.to_string()))?;
        mcf.python_home = Some(dir);
        mcf.python_home_at = args.at.clone();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_python_path(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls the handler of an http-level directive.
    let (cf, mcf) = unsafe { main_directive(cf, conf) };
    directive(&cf, mcf, |mcf, args| {
        let dirs = split_path_list(args.values[0])
            .into_iter()
            .map(|d| args.prefix.join(d));
        mcf.python_path.extend(dirs);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_shared_interpreter(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls the handler of an http-level directive.
    let (cf, mcf) = unsafe { main_directive(cf, conf) };
    directive(&cf, mcf, |mcf, args| {
        set_once(&mut mcf.shared_interpreter, on_off(args.values[0])?)
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_preload(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls the handler of an http-level directive.
    let (cf, mcf) = unsafe { main_directive(cf, conf) };
    directive(&cf, mcf, |mcf, args| {
        set_once(&mut mcf.preload, on_off(args.values[0])?)
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_status_counters(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls the handler of an http-level directive.
    let (cf, mcf) = unsafe { main_directive(cf, conf) };
    directive(&cf, mcf, |mcf, args| {
        set_once(&mut mcf.status_counters, on_off(args.values[0])?)
    })
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_slow_request(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls the handler of an http-level directive.
    let (cf, mcf) = unsafe { main_directive(cf, conf) };
    directive(&cf, mcf, |mcf, args| {
        set_once(&mut mcf.slow_request, config::seconds(args.values[0], 1)?)
    })
}

/// The value of an `on|off` directive.
fn on_off(value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(ConfigError(format!("needs 'on' or 'off', got '{other}'"))),
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_conf_threads(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls the handler of an http-level directive.
    let (cf, mcf) = unsafe { main_directive(cf, conf) };
    directive(&cf, mcf, |mcf, args| {
        let value = args.values[0];
        match value.parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => set_once(&mut mcf.threads, n),
            _ => Err(ConfigError(format!(
                "needs a number of threads from 1 to {MAX_THREADS}, got '{value}'"
            ))),
        }
    })
}
