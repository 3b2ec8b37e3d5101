//! The hooks registered by the shim: start-up, child start, URL mapping, and the
//! content handler.

use std::ffi::{c_int, c_void, CStr, CString};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

use std::sync::OnceLock;

use super::config::{module_config, parsed, reset_parsed, DirConfig, Mount, ServerConfig};
use super::ffi::*;
use super::request;
use crate::common::config::{self, DaemonOptions, Mode};
use crate::daemon::auth::Generation;
use crate::daemon::launch::{self, Problem};
use crate::daemon::protocol::{Decoder, Encoder};
use crate::daemon::{self, supervisor};
use crate::dispatch::{self, Route, Runner};
use crate::python::interpreter::{self, PythonSettings};
use crate::python::ServerInfo;

/// The handler name that GatewayScriptAlias gives to the requests it maps.
const HANDLER: &CStr = c"gateway-script";

/// The main server, for log lines that belong to no request.
static MAIN_SERVER: AtomicPtr<server_rec> = AtomicPtr::new(std::ptr::null_mut());

/// This child's interpreter: started on the child's first embedded request (a
/// child that only forwards to daemon groups never starts Python), or why it
/// could not be.
static PYTHON: OnceLock<Result<ServerInfo, String>> = OnceLock::new();

/// What the current supervisor was started with, to start it again if it dies.
static SUPERVISOR: Mutex<Option<(PathBuf, supervisor::SupervisorConfig)>> = Mutex::new(None);

/// The key, in the process pool (which outlives restarts and this module), of
/// the lifeline of the current daemon supervisor.
const LIFELINE_KEY: &CStr = c"gateway-daemon-lifeline";

/// httpd's log level for a `log` level.
pub fn aplog_level(level: log::Level) -> c_int {
    (match level {
        log::Level::Error => APLOG_ERR,
        log::Level::Warn => APLOG_WARNING,
        log::Level::Info => APLOG_INFO,
        log::Level::Debug => APLOG_DEBUG,
        log::Level::Trace => APLOG_TRACE1,
    }) as c_int
}

fn log_to_main_server(level: log::Level, line: &str) {
    let s = MAIN_SERVER.load(Ordering::Relaxed);
    let line = crate::common::log::c_line(line);
    // SAFETY: s is the main server_rec (or NULL, which ap_log_error accepts) and line is NUL-terminated.
    unsafe { gateway_ap_log(s, std::ptr::null(), aplog_level(level), line.as_ptr()) };
}

/// Every server record of this configuration: the main server, then the virtual hosts.
fn servers(s: *mut server_rec) -> impl Iterator<Item = *mut server_rec> {
    // SAFETY: httpd's server list is a NULL-terminated chain that lives as long as the configuration.
    std::iter::successors((!s.is_null()).then_some(s), |&s| unsafe {
        Some((*s).next).filter(|n| !n.is_null())
    })
}

/// # Safety
/// `s` must be a server record of this configuration.
unsafe fn server_config<'a>(s: *const server_rec) -> Option<&'a ServerConfig> {
    // SAFETY: guaranteed by the caller; the main server and each virtual host have our ServerConfig.
    unsafe { module_config::<ServerConfig>((*s).module_config) }
}

#[no_mangle]
pub extern "C" fn gateway_pre_config(
    _pconf: *mut apr_pool_t,
    _plog: *mut apr_pool_t,
    _ptemp: *mut apr_pool_t,
) -> c_int {
    reset_parsed();
    OK as c_int
}

/// The daemon executable: installed next to this module.
fn daemon_executable() -> Result<PathBuf, String> {
    daemon::executable_beside(gateway_pre_config as *const () as usize)
}

/// The supervisor configuration of this server for `groups`.
fn supervisor_config(
    run_dir: &str,
    groups: Vec<DaemonOptions>,
    generation: Generation,
    previous: Option<Generation>,
) -> supervisor::SupervisorConfig {
    // SAFETY: mod_unixd fills ap_unixd_config while reading User/Group; only read here.
    let (uid, gid) = unsafe { (ap_unixd_config.user_id, ap_unixd_config.group_id) };
    supervisor::SupervisorConfig {
        server: "apache".into(),
        run_dir: PathBuf::from(run_dir),
        server_pid: std::process::id(),
        server_uid: uid,
        server_gid: gid,
        groups,
        generation,
        previous,
    }
}

/// A new configuration generation for `groups`: a fresh secret, and each
/// group's applications: the mounts of every server whose `GatewayMode` names
/// the group, and, for a group a `<Directory>`/`<Location>` section names, every
/// mount that section may apply to (one of the main server applies to every
/// virtual host too).
///
/// # Safety
/// `s` must be the main server record of this configuration.
unsafe fn new_generation(s: *mut server_rec, groups: &[DaemonOptions]) -> io::Result<Generation> {
    let sections = parsed().sections.clone();
    let mut mounts = Vec::new();
    for server in servers(s) {
        // SAFETY: server is a record of this configuration.
        let Some(cfg) = (unsafe { server_config(server) }) else {
            continue;
        };
        let from_server = match &cfg.mode {
            Some(Mode::Daemon(name)) => Some(name.as_str()),
            _ => None,
        };
        let from_sections = section_groups(&sections, server, s);
        for group in from_server.into_iter().chain(from_sections) {
            mounts.extend(cfg.mounts.iter().map(|m| (group, &m.app)));
        }
    }
    Generation::new(groups, mounts)
}

/// The daemon groups that `<Directory>`/`<Location>` sections name for the
/// mounts of `server`: its own sections', and those of the main server `main`,
/// which apply to every virtual host.
fn section_groups(
    sections: &[(String, usize)],
    server: *mut server_rec,
    main: *mut server_rec,
) -> impl Iterator<Item = &str> {
    sections
        .iter()
        .filter(move |(_, at)| *at == server as usize || *at == main as usize)
        .map(|(name, _)| name.as_str())
}

/// The key, in the process pool, of the current generation's encoding: the
/// next generation's daemons also serve this one's server processes, which
/// finish their requests after a restart.
const GENERATION_KEY: &CStr = c"gateway-daemon-generation";

/// The slot of the current generation's encoding in the process pool: a
/// malloc'd buffer of a big-endian u32 length and the bytes, or NULL.
///
/// # Safety
/// `s` must be a live server record, in the parent's single thread.
unsafe fn generation_slot(s: *mut server_rec) -> *mut *mut u8 {
    // SAFETY: guaranteed by the caller.
    unsafe { process_slot(s, GENERATION_KEY, std::ptr::null_mut()) }
}

/// A value of type `T` that survives restarts: kept in the process pool under
/// `key`, set to `initial` the first time.
///
/// # Safety
/// `s` must be a live server record, in the parent's single thread, and `key`
/// always used with the same `T`.
unsafe fn process_slot<T: Copy>(s: *mut server_rec, key: &CStr, initial: T) -> *mut T {
    // SAFETY: s->process->pool lives as long as the httpd process; the slot is a T in it.
    unsafe {
        let pool = (*(*s).process).pool;
        let mut data: *mut c_void = std::ptr::null_mut();
        apr_pool_userdata_get(&mut data, key.as_ptr(), pool);
        if data.is_null() {
            data = apr_palloc(pool, std::mem::size_of::<T>() as apr_size_t);
            *data.cast::<T>() = initial;
            apr_pool_userdata_set(data, key.as_ptr(), None, pool);
        }
        data.cast()
    }
}

/// Takes the generation stored by [`store_generation`], if any (the module's
/// own memory does not outlive a restart, the process pool does).
///
/// # Safety
/// As [`generation_slot`].
unsafe fn take_generation(s: *mut server_rec) -> Option<Generation> {
    // SAFETY: guaranteed by the caller; the buffer is ours, made by store_generation.
    unsafe {
        let slot = generation_slot(s);
        let buf = std::ptr::replace(slot, std::ptr::null_mut());
        if buf.is_null() {
            return None;
        }
        let len = u32::from_be_bytes(*buf.cast::<[u8; 4]>()) as usize;
        let bytes = std::slice::from_raw_parts_mut(buf.add(4), len);
        let generation = Generation::decode(&mut Decoder::new(bytes)).ok();
        // The secret does not stay behind in freed memory.
        bytes.fill(0);
        libc::free(buf.cast());
        generation
    }
}

/// Keeps `generation` in the process pool for the next restart.
///
/// # Safety
/// As [`generation_slot`].
unsafe fn store_generation(s: *mut server_rec, generation: &Generation) {
    let mut bytes = Vec::new();
    generation.encode(&mut Encoder(&mut bytes));
    // SAFETY: guaranteed by the caller; the buffer holds the length and the bytes.
    unsafe {
        drop(take_generation(s));
        let buf = libc::malloc(4 + bytes.len()).cast::<u8>();
        if !buf.is_null() {
            std::ptr::copy_nonoverlapping((bytes.len() as u32).to_be_bytes().as_ptr(), buf, 4);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.add(4), bytes.len());
            *generation_slot(s) = buf;
        }
    }
    bytes.fill(0);
}

/// Routes log lines without a request to `s`, the main server. Both configuration
/// hooks do it, as either may be the first to log (configtest runs only check_config).
fn adopt_main_server(s: *mut server_rec) {
    MAIN_SERVER.store(s, Ordering::Relaxed);
    crate::common::log::install(log_to_main_server);
}

/// Checks what needs the whole configuration: every group that `GatewayMode
/// daemon` names exists, and the groups can start. Runs for `apachectl
/// configtest` too (post_config does not); a failure stops httpd with the message.
#[no_mangle]
pub unsafe extern "C" fn gateway_check_config(
    _pconf: *mut apr_pool_t,
    _plog: *mut apr_pool_t,
    _ptemp: *mut apr_pool_t,
    s: *mut server_rec,
) -> c_int {
    adopt_main_server(s);
    let parsed = parsed();
    let mut ok = no_other_python_module();
    // SAFETY: httpd passes the main server record of the configuration just read.
    if let Some(clash) = unsafe { interpreter_clash_in(s, &parsed.sections) } {
        log::error!("{clash}");
        ok = false;
    }
    for (name, at) in parsed.groups.undefined() {
        log::error!(
            "GatewayMode at {at}: daemon process group '{name}' is not defined \
             (define it with 'GatewayDaemon {name} ...')"
        );
        ok = false;
    }
    let generation = match Generation::new(&[], []) {
        Ok(g) => g,
        Err(e) => {
            log::error!("daemon mode cannot start: {e}");
            return HTTP_INTERNAL_SERVER_ERROR as c_int;
        }
    };
    let config = supervisor_config("", Vec::new(), generation, None);
    let exe = daemon_executable();
    for Problem { at, what } in launch::problems(
        &parsed.groups,
        &config,
        exe.as_deref().map_err(|e| e.as_str()),
    ) {
        log::error!("GatewayDaemon at {at}: {what}");
        ok = false;
    }
    if ok {
        OK as c_int
    } else {
        HTTP_INTERNAL_SERVER_ERROR as c_int
    }
}

/// Two embedders cannot share one interpreter; whichever starts Python second
/// breaks. Checked with the configuration, so that configtest fails too.
fn no_other_python_module() -> bool {
    for (other, module) in [(c"mod_wsgi.c", "wsgi"), (c"mod_python.c", "python")] {
        // SAFETY: looks a module up by name in httpd's list of loaded modules.
        if !unsafe { ap_find_linked_module(other.as_ptr()) }.is_null() {
            log::error!(
                "mod_{module} is loaded too: it and Gateway would share one Python interpreter, which neither supports. \
                 Disable one of them ('a2dismod {module}'), or run the other's applications in a Gateway daemon group"
            );
            return false;
        }
    }
    true
}

/// Two scripts mounted in embedded mode, which would share one interpreter
/// without `GatewaySharedInterpreter On`. Only servers whose mounts' mode is
/// known here count: a `<Location>` or `<Directory>` that names a daemon group
/// may take any mount of its server out of embedded mode, which only a request
/// tells (the interpreter then refuses the second script itself).
///
/// # Safety
/// `s` must be the main server record of the configuration.
unsafe fn interpreter_clash_in(s: *mut server_rec, sections: &[(String, usize)]) -> Option<String> {
    // SAFETY: guaranteed by the caller.
    let main = unsafe { server_config(s) }?;
    if main.shared_interpreter == Some(true) {
        return None;
    }
    let mut first: Option<&Mount> = None;
    for server in servers(s).filter(|&server| section_groups(sections, server, s).next().is_none())
    {
        // SAFETY: server is a record of this configuration.
        let Some(cfg) = (unsafe { server_config(server) }) else {
            continue;
        };
        if matches!(cfg.mode, Some(Mode::Daemon(_))) {
            continue;
        }
        for mount in &cfg.mounts {
            match first {
                None => first = Some(mount),
                Some(f) if f.app.file != mount.app.file => {
                    return Some(config::interpreter_clash(
                        "apache",
                        (&f.app.file, &f.at),
                        (&mount.app.file, &mount.at),
                    ))
                }
                Some(_) => {}
            }
        }
    }
    None
}

/// The lifeline slot in the process pool.
///
/// # Safety
/// `s` must be a live server record.
unsafe fn lifeline_slot(s: *mut server_rec) -> *mut c_int {
    // SAFETY: guaranteed by the caller.
    unsafe { process_slot(s, LIFELINE_KEY, -1) }
}

/// Starts this generation's daemon supervisor, then lets the previous one (on a
/// restart) drain: its daemons finish their requests while new connections
/// already reach the new ones.
///
/// # Safety
/// In the parent's post_config, with its live pool and server.
unsafe fn start_daemons(pconf: *mut apr_pool_t, s: *mut server_rec) -> Result<(), String> {
    let groups = parsed().groups.options();
    // SAFETY: s is the live main server; the slot is an int in its process pool,
    // touched only by the parent's single thread.
    let slot = unsafe { lifeline_slot(s) };
    // SAFETY: slot points at the int in the process pool (lifeline_slot).
    let previous = unsafe { std::ptr::replace(slot, -1) };
    // The previous generation's server processes still finish their requests.
    // SAFETY: as above.
    let previous_generation = unsafe { take_generation(s) }.filter(|_| previous >= 0);
    let name = CString::new(format!("gateway-{}", std::process::id())).expect("no NUL");
    // SAFETY: returns a NUL-terminated path allocated in pconf.
    let run_dir = unsafe { CStr::from_ptr(ap_runtime_dir_relative(pconf, name.as_ptr())) };
    // SAFETY: s is the live main server.
    let generation = unsafe { new_generation(s, &groups) }.map_err(|e| e.to_string())?;
    let config = supervisor_config(
        &run_dir.to_string_lossy(),
        groups,
        generation,
        previous_generation,
    );
    let mut exe = None;
    let fd = launch::start_generation(&config, previous, |config| {
        let path = daemon_executable().map_err(io::Error::other)?;
        let lifeline = supervisor::start(&path, config);
        exe = Some(path);
        lifeline
    })
    .map_err(|e| format!("starting the daemon supervisor failed: {e}"))?;
    // SAFETY: as above.
    unsafe {
        *slot = fd;
        if fd >= 0 {
            store_generation(s, &config.generation);
        }
    }
    *SUPERVISOR.lock().unwrap_or_else(|e| e.into_inner()) = exe.map(|exe| (exe, config));
    Ok(())
}

/// Runs in the parent about once a second: if the supervisor died (its end of
/// the lifeline is closed, so ours reports an error), starts a new one. Its
/// daemons died with it; requests meanwhile wait in the sockets' queues or get
/// a 503 if there is no socket.
#[no_mangle]
pub unsafe extern "C" fn gateway_monitor(_p: *mut apr_pool_t, s: *mut server_rec) -> c_int {
    // SAFETY: httpd passes the live main server, in the parent's single thread.
    let slot = unsafe { lifeline_slot(s) };
    // SAFETY: slot points at the int in the process pool (lifeline_slot).
    let fd = unsafe { *slot };
    if fd < 0 {
        return DECLINED;
    }
    let mut polled = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: polls our own descriptor without waiting.
    let n = unsafe { libc::poll(&mut polled, 1, 0) };
    if n <= 0 || polled.revents & (libc::POLLERR | libc::POLLHUP) == 0 {
        return DECLINED;
    }
    let current = SUPERVISOR.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some((exe, config)) = current else {
        return DECLINED;
    };
    log::error!("the daemon supervisor is gone (its lifeline broke); starting a new one");
    match supervisor::start(&exe, &config) {
        Ok(lifeline) => {
            supervisor::close_inherited(fd);
            // SAFETY: as above.
            unsafe { *slot = lifeline.into_raw_fd() };
        }
        Err(e) => {
            log::error!("restarting the daemon supervisor failed (next try in a second): {e}")
        }
    }
    DECLINED
}

#[no_mangle]
pub unsafe extern "C" fn gateway_post_config(
    pconf: *mut apr_pool_t,
    _plog: *mut apr_pool_t,
    _ptemp: *mut apr_pool_t,
    s: *mut server_rec,
) -> c_int {
    adopt_main_server(s);
    // httpd reads the configuration twice at start-up; act on the real pass only.
    // SAFETY: ap_state_query only reads httpd's state.
    if unsafe { ap_state_query(AP_SQ_MAIN_STATE as c_int) } == AP_SQ_MS_CREATE_PRE_CONFIG as c_int {
        return OK as c_int;
    }
    let mounts: usize = servers(s)
        // SAFETY: servers() yields records of this configuration.
        .map(|s| unsafe { server_config(s) }.map_or(0, |c| c.mounts.len()))
        .sum();
    // SAFETY: pconf and s are the ones httpd passed to this hook.
    if let Err(e) = unsafe { start_daemons(pconf, s) } {
        log::error!("daemon mode cannot start: {e}");
        return HTTP_INTERNAL_SERVER_ERROR as c_int;
    }
    log::info!(
        "Gateway/{} ready, {} application(s) mounted",
        crate::common::VERSION,
        mounts
    );
    OK as c_int
}

fn mpm_query(code: u32) -> c_int {
    let mut value: c_int = 0;
    // SAFETY: ap_mpm_query writes one int into value.
    unsafe { ap_mpm_query(code as c_int, &mut value) };
    value
}

#[no_mangle]
pub unsafe extern "C" fn gateway_child_init(pchild: *mut apr_pool_t, s: *mut server_rec) {
    // Only the parent keeps the supervisor's lifeline, so that its death (even by
    // kill -9) ends the daemons at once.
    // SAFETY: httpd passes the live main server; the slot was copied into this child by fork.
    let lifeline = unsafe { *lifeline_slot(s) };
    if lifeline >= 0 {
        supervisor::close_inherited(lifeline);
    }
    unsafe extern "C" fn at_exit(_: *mut c_void) -> apr_status_t {
        interpreter::run_exit_handlers();
        APR_SUCCESS as apr_status_t
    }
    // SAFETY: registers a fork handler that only closes httpd's listening sockets.
    unsafe { gateway_ap_close_listeners_at_fork() };
    // SAFETY: pchild lives until the child exits, when the cleanup runs atexit handlers.
    unsafe {
        apr_pool_cleanup_register(
            pchild,
            std::ptr::null_mut(),
            Some(at_exit),
            Some(apr_pool_cleanup_null),
        )
    };
}

/// Starts Python in this child with the server's settings.
///
/// # Safety
/// `s` must be a server record of this configuration.
unsafe fn start_python(s: *const server_rec) -> Result<ServerInfo, String> {
    // SAFETY: guaranteed by the caller.
    let cfg = unsafe { server_config(s) };
    let settings = PythonSettings {
        home: cfg.and_then(|c| c.python_home.clone()),
        path: cfg.map(|c| c.python_path.clone()).unwrap_or_default(),
    };
    match interpreter::initialize(&settings) {
        Ok(()) => {
            let threads = mpm_query(AP_MPMQ_MAX_THREADS);
            let daemons = mpm_query(AP_MPMQ_MAX_DAEMONS);
            Ok(ServerInfo {
                server: "apache",
                mode: "embedded",
                process_group: String::new(),
                multithread: mpm_query(AP_MPMQ_IS_THREADED) != AP_MPMQ_NOT_SUPPORTED as c_int
                    && threads > 1,
                multiprocess: daemons > 1,
                shared_interpreter: cfg.and_then(|c| c.shared_interpreter).unwrap_or(false),
            })
        }
        Err(e) => {
            log::error!("{e}");
            Err(e.to_string())
        }
    }
}

/// Maps URLs below a GatewayScriptAlias to its script, so that `<Directory>`
/// access control of the script's directory applies, as for mod_wsgi.
#[no_mangle]
pub unsafe extern "C" fn gateway_translate_name(r: *mut request_rec) -> c_int {
    // SAFETY: httpd passes a live request whose uri is NUL-terminated.
    let (uri, server) = unsafe { ((*r).uri, (*r).server) };
    if uri.is_null() {
        return DECLINED;
    }
    // SAFETY: httpd passes the request's NUL-terminated URI.
    let uri = unsafe { CStr::from_ptr(uri) }.to_bytes();
    // SAFETY: server is the request's server record.
    let Some(mount) = (unsafe { server_config(server) }).and_then(|c| c.mount_for(uri)) else {
        return DECLINED;
    };
    let Ok(file) = CString::new(mount.app.file.as_os_str().as_encoded_bytes()) else {
        return DECLINED;
    };
    // SAFETY: the strings are copied into the request pool, which outlives the request.
    unsafe {
        (*r).filename = apr_pstrdup((*r).pool, file.as_ptr());
        (*r).handler = HANDLER.as_ptr();
    }
    OK as c_int
}

#[no_mangle]
pub unsafe extern "C" fn gateway_handler(r: *mut request_rec) -> c_int {
    // SAFETY: httpd passes a live request.
    let handler = unsafe { (*r).handler };
    // SAFETY: a request's handler is NULL or a NUL-terminated string.
    if handler.is_null() || unsafe { CStr::from_ptr(handler) } != HANDLER {
        return DECLINED;
    }
    // SAFETY: httpd passes the live request of the running handler.
    match catch_unwind(AssertUnwindSafe(|| unsafe { handle(r) })) {
        Ok(status) => status,
        Err(_) => {
            request::log(
                r,
                log::Level::Error,
                "internal error (panic) while serving this request",
            );
            HTTP_INTERNAL_SERVER_ERROR as c_int
        }
    }
}

/// # Safety
/// `r` must be the live request of the running handler.
unsafe fn handle(r: *mut request_rec) -> c_int {
    // SAFETY: r is live (guaranteed by the caller); its uri is NUL-terminated.
    let uri = unsafe { CStr::from_ptr((*r).uri) }.to_bytes();
    let Some(mount): Option<&Mount> =
        // SAFETY: r->server is the request's server record.
        (unsafe { server_config((*r).server) }).and_then(|c| c.mount_for(uri))
    else {
        return DECLINED;
    };
    // SAFETY: r->server is the request's server record.
    let server_mode = unsafe { server_config((*r).server) }.and_then(|c| c.mode.clone());
    let dir_mode =
        // SAFETY: r->per_dir_config is the request's merged vector; our slot holds a DirConfig or NULL.
        unsafe { module_config::<DirConfig>((*r).per_dir_config) }.and_then(|c| c.mode.clone());
    let route = match dispatch::route(dir_mode.or(server_mode).as_ref()) {
        Ok(route) => route,
        Err(not_running) => {
            request::log(r, log::Level::Error, &not_running.to_string());
            return c_int::from(dispatch::NotRunning::STATUS);
        }
    };
    if let Route::Daemon(endpoint) = route {
        // SAFETY: r is live (guaranteed by the caller).
        return unsafe { request::serve(r, mount, Runner::Daemon(&endpoint)) };
    }
    // SAFETY: r->server is the request's live server record.
    let server = unsafe { (*r).server };
    // SAFETY: server is a record of this configuration.
    match PYTHON.get_or_init(|| unsafe { start_python(server) }) {
        // SAFETY: r is live (guaranteed by the caller).
        Ok(info) => unsafe { request::serve(r, mount, Runner::Embedded(info)) },
        Err(why) => {
            let msg = format!("Python is not available in this process: {why}");
            request::log(r, log::Level::Error, &msg);
            HTTP_INTERNAL_SERVER_ERROR as c_int
        }
    }
}
