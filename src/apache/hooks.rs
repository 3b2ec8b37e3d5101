//! The hooks registered by the shim: start-up, child start, URL mapping, and the
//! content handler. Each `extern "C"` entry point turns httpd's pointers into the
//! safe records of `records` and runs the hook behind the panic guard.

use std::ffi::{c_int, CStr};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use super::config::{parsed, reset_parsed, Mount};
use super::ffi::{
    apr_pool_t, request_rec, server_rec, AP_MPMQ_IS_THREADED, AP_MPMQ_MAX_DAEMONS,
    AP_MPMQ_MAX_THREADS, AP_MPMQ_NOT_SUPPORTED, DECLINED, HTTP_INTERNAL_SERVER_ERROR, OK,
};
use super::records::{self, OneThread, Pool, Request, Server, ServerId, GENERATION, LIFELINE};
use super::request;
use crate::common::config::{self, DaemonOptions, Groups, Mode};
use crate::common::panic::{catch, fault_point, guard, Panic};
use crate::daemon::auth::Generation;
use crate::daemon::launch::{self, Problem};
use crate::daemon::protocol::{Decoder, Encoder};
use crate::daemon::{self, supervisor};
use crate::dispatch::{self, NotRunning, Route, Runner};
use crate::ops::scoreboard::{self, Board};
use crate::python::interpreter::{self, PythonSettings};
use crate::python::ServerInfo;

/// The handler name that GatewayScriptAlias gives to the requests it maps.
const HANDLER: &CStr = c"gateway-script";

/// The status page's handler (`SetHandler gateway-status`).
const STATUS_HANDLER: &CStr = c"gateway-status";

/// What a configuration hook answers when it fails: httpd stops with it.
const CONFIG_FAILED: c_int = HTTP_INTERNAL_SERVER_ERROR as c_int;

/// This child's interpreter: started on the child's first embedded request (a
/// child that only forwards to daemon groups never starts Python), or why it
/// could not be.
static PYTHON: OnceLock<Result<ServerInfo, String>> = OnceLock::new();

/// What the current supervisor was started with, to start it again if it dies.
static SUPERVISOR: Mutex<Option<(PathBuf, supervisor::SupervisorConfig)>> = Mutex::new(None);

#[no_mangle]
pub extern "C" fn gateway_pre_config(
    _pconf: *mut apr_pool_t,
    _plog: *mut apr_pool_t,
    _ptemp: *mut apr_pool_t,
) -> c_int {
    guard("the pre_config hook", CONFIG_FAILED, || {
        // The previous main server went with the previous configuration.
        records::forget_main_server();
        reset_parsed();
        OK as c_int
    })
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
    let (uid, gid) = records::unixd_ids();
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
fn new_generation(main: Server<'_>, groups: &[DaemonOptions]) -> io::Result<Generation> {
    let sections = parsed().sections.clone();
    let mut mounts = Vec::new();
    for server in main.chain() {
        let Some(cfg) = server.config() else {
            continue;
        };
        let from_server = match &cfg.mode {
            Some(Mode::Daemon(name)) => Some(name.as_str()),
            _ => None,
        };
        let from_sections = section_groups(&sections, server.id(), main.id());
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
    sections: &[(String, ServerId)],
    server: ServerId,
    main: ServerId,
) -> impl Iterator<Item = &str> {
    sections
        .iter()
        .filter(move |(_, at)| *at == server || *at == main)
        .map(|(name, _)| name.as_str())
}

/// Takes the generation stored by [`store_generation`] in the process pool, if
/// any: the next generation's daemons also serve this one's server processes,
/// which finish their requests after a restart (the module's own memory does
/// not outlive a restart, the process pool does).
fn take_generation(process: &Pool<'_>) -> Option<Generation> {
    let mut bytes = process.slot(&GENERATION).take()?;
    let generation = Generation::decode(&mut Decoder::new(&bytes)).ok();
    // The secret does not stay behind in freed memory.
    bytes.fill(0);
    generation
}

/// Keeps `generation` in the process pool for the next restart.
fn store_generation(process: &Pool<'_>, generation: &Generation) {
    let mut bytes = Vec::new();
    generation.encode(&mut Encoder(&mut bytes));
    process.slot(&GENERATION).store(&bytes);
    bytes.fill(0);
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
    guard("the check_config hook", CONFIG_FAILED, || {
        // SAFETY: httpd passes the main server of the configuration it just read,
        // which stays until its next reading (whose pre_config forgets it).
        let s = unsafe { Server::from_raw(s) };
        // SAFETY: as above.
        unsafe { s.adopt_as_main() };
        // Both configuration hooks do it, as either may be the first to log
        // (configtest runs only check_config).
        crate::common::log::install(records::log_to_main_server);
        if config_is_sound(s) {
            OK as c_int
        } else {
            CONFIG_FAILED
        }
    })
}

/// Logs every problem of the configuration that `main` heads; true if none.
fn config_is_sound(main: Server<'_>) -> bool {
    let parsed = parsed();
    let mut ok = no_other_python_module();
    if let Some(clash) = interpreter_clash_in(main, &parsed.sections) {
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
    daemons_can_start(&parsed.groups) && ok
}

/// Logs why the daemon groups could not start; true if nothing stops them.
fn daemons_can_start(groups: &Groups) -> bool {
    let (uid, gid) = records::unixd_ids();
    let config = match launch::check_settings("apache", uid, gid) {
        Ok(config) => config,
        Err(e) => {
            log::error!("daemon mode cannot start: {e}");
            return false;
        }
    };
    let exe = daemon_executable();
    let mut ok = true;
    for Problem { at, what } in
        launch::problems(groups, &config, exe.as_deref().map_err(|e| e.as_str()))
    {
        log::error!("GatewayDaemon at {at}: {what}");
        ok = false;
    }
    ok
}

/// Two embedders cannot share one interpreter; whichever starts Python second
/// breaks. Checked with the configuration, so that configtest fails too.
fn no_other_python_module() -> bool {
    for (other, module) in [(c"mod_wsgi.c", "wsgi"), (c"mod_python.c", "python")] {
        if records::module_loaded(other) {
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
fn interpreter_clash_in(main: Server<'_>, sections: &[(String, ServerId)]) -> Option<String> {
    if main.config()?.shared_interpreter == Some(true) {
        return None;
    }
    let mut first: Option<&Mount> = None;
    let unsectioned = main.chain().filter(|server| {
        section_groups(sections, server.id(), main.id())
            .next()
            .is_none()
    });
    for server in unsectioned {
        let Some(cfg) = server.config() else {
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

/// Starts this generation's daemon supervisor, then lets the previous one (on a
/// restart) drain: its daemons finish their requests while new connections
/// already reach the new ones.
fn start_daemons(pconf: Pool<'_>, main: Server<'_>, one: OneThread) -> Result<(), String> {
    let mut groups = parsed().groups.options();
    let counting = main.config().and_then(|c| c.status_counters) != Some(false);
    groups.iter_mut().for_each(|g| g.status_counters = counting);
    let process = main.process_pool(one);
    let lifeline = process.slot(&LIFELINE);
    let previous = lifeline.replace(-1);
    // The previous generation's server processes still finish their requests.
    let previous_generation = take_generation(&process).filter(|_| previous >= 0);
    if groups.is_empty() {
        launch::retire(previous);
        *SUPERVISOR.lock().unwrap_or_else(|e| e.into_inner()) = None;
        return Ok(());
    }
    let name = format!("gateway-{}", std::process::id());
    let run_dir = pconf.runtime_dir(&name).ok_or_else(|| {
        format!("httpd cannot tell the path of '{name}' in its runtime directory")
    })?;
    let generation = new_generation(main, &groups).map_err(|e| e.to_string())?;
    let config = supervisor_config(&run_dir, groups, generation, previous_generation);
    let exe = daemon_executable()?;
    let fd = launch::start_generation(&config, previous, |config| supervisor::start(&exe, config))
        .map_err(|e| format!("starting the daemon supervisor failed: {e}"))?;
    lifeline.set(fd);
    store_generation(&process, &config.generation);
    *SUPERVISOR.lock().unwrap_or_else(|e| e.into_inner()) = Some((exe, config));
    Ok(())
}

/// Runs in the parent about once a second: if the supervisor died (its end of
/// the lifeline is closed, so ours reports an error), starts a new one. Its
/// daemons died with it; requests meanwhile wait in the sockets' queues or get
/// a 503 if there is no socket.
#[no_mangle]
pub unsafe extern "C" fn gateway_monitor(_p: *mut apr_pool_t, s: *mut server_rec) -> c_int {
    guard("the monitor hook", DECLINED, || {
        // SAFETY: httpd runs the monitor in the parent's single thread, with the
        // live main server.
        let (s, one) = unsafe { (Server::from_raw(s), OneThread::assume()) };
        restart_dead_supervisor(s, one);
        DECLINED
    })
}

fn restart_dead_supervisor(main: Server<'_>, one: OneThread) {
    let lifeline = main.process_pool(one).slot(&LIFELINE);
    let fd = lifeline.get();
    if fd < 0 || !records::hung_up(fd) {
        return;
    }
    let current = SUPERVISOR.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some((exe, config)) = current else {
        return;
    };
    log::error!("the daemon supervisor is gone (its lifeline broke); starting a new one");
    match supervisor::start(&exe, &config) {
        Ok(new) => {
            supervisor::close_inherited(fd);
            lifeline.set(new.into_raw_fd());
        }
        Err(e) => {
            log::error!("restarting the daemon supervisor failed (next try in a second): {e}")
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn gateway_post_config(
    pconf: *mut apr_pool_t,
    _plog: *mut apr_pool_t,
    _ptemp: *mut apr_pool_t,
    s: *mut server_rec,
) -> c_int {
    guard("the post_config hook", CONFIG_FAILED, || {
        // SAFETY: httpd runs post_config in the parent's single thread, with its
        // live configuration pool and the main server of the configuration it
        // just read, which stays until its next reading (whose pre_config
        // forgets it).
        let (pconf, s, one) = unsafe {
            (
                Pool::from_raw(pconf),
                Server::from_raw(s),
                OneThread::assume(),
            )
        };
        // SAFETY: as above.
        unsafe { s.adopt_as_main() };
        crate::common::log::install(records::log_to_main_server);
        post_config(pconf, s, one)
    })
}

fn post_config(pconf: Pool<'_>, main: Server<'_>, one: OneThread) -> c_int {
    // httpd reads the configuration twice at start-up; act on the real pass only.
    if records::first_startup_pass() {
        return OK as c_int;
    }
    let mounts: usize = main
        .chain()
        .map(|s| s.config().map_or(0, |c| c.mounts.len()))
        .sum();
    if let Err(e) = start_daemons(pconf, main, one) {
        log::error!("daemon mode cannot start: {e}");
        return CONFIG_FAILED;
    }
    make_status_board(pconf, main);
    log::info!(
        "Gateway/{} ready, {} application(s) mounted",
        crate::common::VERSION,
        mounts
    );
    OK as c_int
}

/// This generation's embedded scoreboard, made before the children fork: a
/// slot for each child that may run at once, and as many again for children
/// that finish their requests while their replacements start. Unmapped with
/// the configuration (the children keep their own mapping).
fn make_status_board(pconf: Pool<'_>, main: Server<'_>) {
    if main.config().and_then(|c| c.status_counters) == Some(false) {
        scoreboard::install_embedded(None);
        return;
    }
    let children = records::mpm_query(AP_MPMQ_MAX_DAEMONS).max(1) as usize;
    let groups = parsed().groups.options();
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    match Board::anonymous((2 * children + 4).min(1024), true, &names) {
        Ok(board) => scoreboard::install_embedded(Some(board)),
        Err(e) => {
            log::warn!("the status page has no counters: its shared memory cannot be made: {e}");
            scoreboard::install_embedded(None);
        }
    }
    pconf.on_cleanup(|| scoreboard::install_embedded(None));
}

#[no_mangle]
pub unsafe extern "C" fn gateway_child_init(pchild: *mut apr_pool_t, s: *mut server_rec) {
    guard("the child_init hook", (), || {
        // SAFETY: httpd runs child_init in the new child before its threads
        // start, with the child's live pool and the main server.
        let (pchild, s, one) = unsafe {
            (
                Pool::from_raw(pchild),
                Server::from_raw(s),
                OneThread::assume(),
            )
        };
        // Only the parent keeps the supervisor's lifeline, so that its death (even
        // by kill -9) ends the daemons at once. fork copied the slot into this child.
        let lifeline = s.process_pool(one).slot(&LIFELINE).get();
        if lifeline >= 0 {
            supervisor::close_inherited(lifeline);
        }
        records::close_listeners_at_fork();
        // pchild lives until the child exits: then the atexit handlers run.
        pchild.on_cleanup(interpreter::run_exit_handlers);
        pchild.on_cleanup(log_drain);
        let threads = records::mpm_query(AP_MPMQ_MAX_THREADS).max(1) as u32;
        scoreboard::claim_embedded(threads);
        // The child's counters stay in the server's totals after it exits.
        pchild.on_cleanup(scoreboard::release_local);
        if s.config().and_then(|c| c.preload) == Some(true) {
            preload(s);
        }
    })
}

/// Requests this child's handler has ended, for the drain's report.
static SERVED: AtomicU64 = AtomicU64::new(0);

/// When this child was told to stop, and how many requests it had ended then.
static STOPPING: Mutex<Option<(std::time::Instant, u64)>> = Mutex::new(None);

/// httpd tells the child it stops (gracefully: its requests go on).
#[no_mangle]
pub extern "C" fn gateway_child_stopping(_pchild: *mut apr_pool_t, graceful: c_int) {
    // A stop that is not graceful ends the requests instead of draining them.
    if graceful == 0 {
        return;
    }
    guard("the child_stopping hook", (), || {
        let mut stopping = STOPPING.lock().unwrap_or_else(|e| e.into_inner());
        stopping.get_or_insert_with(|| (std::time::Instant::now(), SERVED.load(Ordering::Relaxed)));
    })
}

/// At the child's exit: how many requests it let finish since it was told to
/// stop, and how long that took.
fn log_drain() {
    let stopping = *STOPPING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((since, served)) = stopping {
        log::info!(
            "child {} drained {} request(s) in {:.2}s",
            std::process::id(),
            SERVED.load(Ordering::Relaxed) - served,
            since.elapsed().as_secs_f64()
        );
    }
}

/// `GatewayPreload On`: starts Python in this new child and imports the
/// applications its servers run embedded, before it takes a request. One that
/// fails is logged, and imported again at its first request.
fn preload(main: Server<'_>) {
    let Ok(info) = PYTHON.get_or_init(|| start_python(main)) else {
        return;
    };
    let started = std::time::Instant::now();
    let mut apps: Vec<&crate::common::config::AppSpec> = Vec::new();
    for cfg in main.chain().filter_map(|s| s.config()) {
        if matches!(cfg.mode, Some(Mode::Daemon(_))) {
            continue;
        }
        // Virtual hosts repeat the main server's mounts.
        for mount in &cfg.mounts {
            if !apps.contains(&&mount.app) {
                apps.push(&mount.app);
            }
        }
    }
    let loaded = apps
        .iter()
        .filter(|app| match crate::python::load(app, info) {
            Ok(()) => true,
            Err(e) => {
                log::error!(
                    "preloading {} failed; it is imported again at its first request:\n{e}",
                    app.file.display()
                );
                false
            }
        })
        .count();
    log::info!(
        "child {} preloaded {loaded} of {} application(s) in {:.2}s",
        std::process::id(),
        apps.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Starts Python in this child with the settings of `server`.
fn start_python(server: Server<'_>) -> Result<ServerInfo, String> {
    let cfg = server.config();
    let settings = PythonSettings {
        home: cfg.and_then(|c| c.python_home.clone()),
        path: cfg.map(|c| c.python_path.clone()).unwrap_or_default(),
    };
    if let Err(e) = interpreter::initialize(&settings) {
        log::error!("{e}");
        return Err(e.to_string());
    }
    crate::python::slow::configure(cfg.and_then(|c| c.slow_request).unwrap_or(0));
    let threads = records::mpm_query(AP_MPMQ_MAX_THREADS);
    let daemons = records::mpm_query(AP_MPMQ_MAX_DAEMONS);
    Ok(ServerInfo {
        server: "apache",
        mode: "embedded",
        process_group: String::new(),
        multithread: records::mpm_query(AP_MPMQ_IS_THREADED) != AP_MPMQ_NOT_SUPPORTED as c_int
            && threads > 1,
        multiprocess: daemons > 1,
        shared_interpreter: cfg.and_then(|c| c.shared_interpreter).unwrap_or(false),
    })
}

/// After a panic while serving `r`: a 500, or, if the headers went out, a
/// response cut short (the connection closes), plus a line in the log.
fn answer_panic(r: &mut Request<'_>, panic: &Panic) -> c_int {
    guard(
        "answering a panic",
        HTTP_INTERNAL_SERVER_ERROR as c_int,
        || {
            request::log(r, log::Level::Error, &panic.to_string());
            if r.headers_sent() {
                r.abort_response();
                OK as c_int
            } else {
                HTTP_INTERNAL_SERVER_ERROR as c_int
            }
        },
    )
}

/// Maps URLs below a GatewayScriptAlias to its script, so that `<Directory>`
/// access control of the script's directory applies, as for mod_wsgi.
#[no_mangle]
pub unsafe extern "C" fn gateway_translate_name(r: *mut request_rec) -> c_int {
    // SAFETY: httpd runs the hook with the live request, on the request's thread.
    let mut r = unsafe { Request::from_raw(r) };
    catch(|| translate_name(&mut r)).unwrap_or_else(|p| answer_panic(&mut r, &p))
}

fn translate_name(r: &mut Request<'_>) -> c_int {
    if !r.has_uri() {
        return DECLINED;
    }
    let Some(mount) = r.server().config().and_then(|c| c.mount_for(r.uri())) else {
        return DECLINED;
    };
    let file = mount.app.file.as_os_str().as_encoded_bytes();
    if file.contains(&0) {
        return DECLINED;
    }
    r.map_to(file, HANDLER);
    OK as c_int
}

#[no_mangle]
pub unsafe extern "C" fn gateway_handler(r: *mut request_rec) -> c_int {
    // SAFETY: httpd runs a content handler with the live request, on the request's thread.
    let mut r = unsafe { Request::from_raw(r) };
    catch(|| handle(&mut r)).unwrap_or_else(|p| answer_panic(&mut r, &p))
}

fn handle(r: &mut Request<'_>) -> c_int {
    if r.handler() == Some(STATUS_HANDLER) {
        return request::serve_status(r);
    }
    if r.handler() != Some(HANDLER) {
        return DECLINED;
    }
    let Some(cfg) = r.server().config() else {
        return DECLINED;
    };
    let Some(mount) = cfg.mount_for(r.uri()) else {
        return DECLINED;
    };
    fault_point("apache-handler");
    let dir_mode = r.dir_config().and_then(|c| c.mode.clone());
    let rc = match dispatch::route(dir_mode.or_else(|| cfg.mode.clone()).as_ref()) {
        Ok(Route::Daemon(endpoint)) => request::serve(r, mount, Runner::Daemon(&endpoint)),
        Ok(Route::Embedded) => embedded(r, mount),
        Err(not_running) => {
            request::log(r, log::Level::Error, &not_running.to_string());
            c_int::from(NotRunning::STATUS)
        }
    };
    SERVED.fetch_add(1, Ordering::Relaxed);
    rc
}

/// Serves `r` in this child's interpreter, started on its first request.
fn embedded(r: &mut Request<'_>, mount: &Mount) -> c_int {
    let server = r.server();
    match PYTHON.get_or_init(|| start_python(server)) {
        Ok(info) => {
            let ticket = scoreboard::begin(r.method(), r.unparsed_uri());
            let rc = request::serve(r, mount, Runner::Embedded(info));
            if let Some(ticket) = ticket {
                // OK: the response went out with the status it set, unless the
                // client left first (499, as nginx and daemon mode count it).
                ticket.finish(match rc == OK as c_int {
                    true if r.connection_aborted() => 499,
                    true => r.status(),
                    false => rc as u16,
                });
            }
            rc
        }
        Err(why) => {
            let msg = format!("Python is not available in this process: {why}");
            request::log(r, log::Level::Error, &msg);
            HTTP_INTERNAL_SERVER_ERROR as c_int
        }
    }
}
