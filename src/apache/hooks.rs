//! The hooks registered by the shim: start-up, child start, URL mapping, and the
//! content handler.

use std::ffi::{c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};

use once_cell::sync::OnceCell;

use super::config::{module_config, DirConfig, Mount, ServerConfig};
use super::ffi::*;
use super::request;
use crate::common::config::Mode;
use crate::python::interpreter::{self, PythonSettings};
use crate::python::ServerInfo;

/// The handler name that GatewayScriptAlias gives to the requests it maps.
const HANDLER: &CStr = c"gateway-script";

/// The main server, for log lines that belong to no request.
static MAIN_SERVER: AtomicPtr<server_rec> = AtomicPtr::new(std::ptr::null_mut());

/// This child's interpreter: started once in child_init, or why it could not be.
static PYTHON: OnceCell<Result<ServerInfo, String>> = OnceCell::new();

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
    let line = CString::new(line.replace('\0', "\\0")).unwrap_or_default();
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
    unsafe { module_config::<ServerConfig>((*s).module_config) }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_post_config(
    _pconf: *mut apr_pool_t,
    _plog: *mut apr_pool_t,
    _ptemp: *mut apr_pool_t,
    s: *mut server_rec,
) -> c_int {
    MAIN_SERVER.store(s, Ordering::Relaxed);
    crate::common::log::install(log_to_main_server);
    // httpd reads the configuration twice at start-up; act on the real pass only.
    if unsafe { ap_state_query(AP_SQ_MAIN_STATE as c_int) } == AP_SQ_MS_CREATE_PRE_CONFIG as c_int {
        return OK as c_int;
    }
    // Two embedders cannot share one interpreter; whichever starts Python second breaks.
    for other in [c"mod_wsgi.c", c"mod_python.c"] {
        if !unsafe { ap_find_linked_module(other.as_ptr()) }.is_null() {
            log::error!(
                "{} is loaded too: it and Gateway would share one Python interpreter, which neither supports. \
                 Unload one of them (a2dismod), or run the other's applications in a Gateway daemon group",
                other.to_string_lossy().trim_end_matches(".c")
            );
            return HTTP_INTERNAL_SERVER_ERROR as c_int;
        }
    }
    let mounts: usize = servers(s)
        .map(|s| unsafe { server_config(s) }.map_or(0, |c| c.mounts.len()))
        .sum();
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
    let any_mounts =
        servers(s).any(|s| unsafe { server_config(s) }.is_some_and(|c| !c.mounts.is_empty()));
    if !any_mounts {
        return;
    }
    let Some(cfg) = (unsafe { server_config(s) }) else {
        return;
    };
    let settings = PythonSettings {
        home: cfg.python_home.clone(),
        path: cfg.python_path.clone(),
    };
    let started = match interpreter::initialize(&settings) {
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
            })
        }
        Err(e) => {
            log::error!("{e}");
            Err(e.to_string())
        }
    };
    let _ = PYTHON.set(started);
    unsafe extern "C" fn at_exit(_: *mut c_void) -> apr_status_t {
        interpreter::run_exit_handlers();
        APR_SUCCESS as apr_status_t
    }
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

/// Maps URLs below a GatewayScriptAlias to its script, so that `<Directory>`
/// access control of the script's directory applies, as for mod_wsgi.
#[no_mangle]
pub unsafe extern "C" fn gateway_translate_name(r: *mut request_rec) -> c_int {
    // SAFETY: httpd passes a live request whose uri is NUL-terminated.
    let (uri, server) = unsafe { ((*r).uri, (*r).server) };
    if uri.is_null() {
        return DECLINED;
    }
    let uri = unsafe { CStr::from_ptr(uri) }.to_bytes();
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
    if handler.is_null() || unsafe { CStr::from_ptr(handler) } != HANDLER {
        return DECLINED;
    }
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

unsafe fn handle(r: *mut request_rec) -> c_int {
    let uri = unsafe { CStr::from_ptr((*r).uri) }.to_bytes();
    let Some(mount): Option<&Mount> =
        (unsafe { server_config((*r).server) }).and_then(|c| c.mount_for(uri))
    else {
        return DECLINED;
    };
    let server_mode = unsafe { server_config((*r).server) }.and_then(|c| c.mode.clone());
    let dir_mode =
        unsafe { module_config::<DirConfig>((*r).per_dir_config) }.and_then(|c| c.mode.clone());
    if let Some(Mode::Daemon(name)) = dir_mode.or(server_mode) {
        request::log(
            r,
            log::Level::Error,
            &format!("daemon process group '{name}' is not available in this build"),
        );
        return HTTP_SERVICE_UNAVAILABLE as c_int;
    }
    let info = match PYTHON.get() {
        Some(Ok(info)) => info,
        Some(Err(why)) => {
            request::log(
                r,
                log::Level::Error,
                &format!("Python is not available in this process: {why}"),
            );
            return HTTP_INTERNAL_SERVER_ERROR as c_int;
        }
        None => {
            request::log(
                r,
                log::Level::Error,
                "Python was not started in this process (no child_init?)",
            );
            return HTTP_INTERNAL_SERVER_ERROR as c_int;
        }
    };
    unsafe { request::serve(r, mount, info) }
}
