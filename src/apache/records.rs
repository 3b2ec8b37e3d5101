//! Safe views of httpd's records: a request (`request_rec`), a server
//! (`server_rec`), a directive being read (`cmd_parms`) and a pool. Each raw
//! pointer from httpd enters through one `unsafe fn from_raw`, whose contract
//! the `extern "C"` entry point that received it vouches for; every method
//! above it is safe. Apart from those entry points, the Apache module's unsafe
//! code lives here.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

use super::config::{DirConfig, ServerConfig};
use super::ffi::*;
use crate::common::config::ConfigError;
use crate::common::panic::guard;

/// Bytes of a C string, empty for NULL.
///
/// # Safety
/// `s` must be NULL or a NUL-terminated string that outlives `'a`.
unsafe fn bytes<'a>(s: *const c_char) -> &'a [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { opt_bytes(s) }.unwrap_or_default()
}

/// Bytes of a C string, None for NULL.
///
/// # Safety
/// As [`bytes`].
unsafe fn opt_bytes<'a>(s: *const c_char) -> Option<&'a [u8]> {
    // SAFETY: s is non-NULL here and NUL-terminated (guaranteed by the caller).
    (!s.is_null()).then(|| unsafe { CStr::from_ptr(s) }.to_bytes())
}

/// This module's slot in a configuration vector (per-server or per-directory):
/// NULL or the record this module made for it.
///
/// # Safety
/// `vector` must be a live configuration vector.
unsafe fn module_slot(vector: *mut ap_conf_vector_t) -> *mut c_void {
    // SAFETY: a vector has one slot per module; ours is at the index httpd gave
    // this module (guaranteed live by the caller).
    unsafe {
        *vector
            .cast::<*mut c_void>()
            .add(gateway_ap_module_index() as usize)
    }
}

/// The record in this module's slot of a configuration vector, if it made one.
///
/// # Safety
/// `vector` must be a live configuration vector whose slot holds NULL or a `T`
/// made by this module, which nothing changes while `'a` lasts.
unsafe fn module_config<'a, T>(vector: *mut ap_conf_vector_t) -> Option<&'a T> {
    // SAFETY: guaranteed by the caller.
    unsafe { module_slot(vector).cast::<T>().as_ref() }
}

fn apr_result(rv: apr_status_t) -> io::Result<()> {
    if rv == APR_SUCCESS as apr_status_t {
        Ok(())
    } else {
        Err(io::Error::other(format!("APR error {rv}")))
    }
}

/// httpd's log level for a `log` level.
fn aplog_level(level: log::Level) -> c_int {
    (match level {
        log::Level::Error => APLOG_ERR,
        log::Level::Warn => APLOG_WARNING,
        log::Level::Info => APLOG_INFO,
        log::Level::Debug => APLOG_DEBUG,
        log::Level::Trace => APLOG_TRACE1,
    }) as c_int
}

/// A pool: memory, and cleanups that run when httpd clears or destroys it.
#[derive(Clone, Copy)]
pub struct Pool<'p> {
    raw: *mut apr_pool_t,
    _life: PhantomData<&'p apr_pool_t>,
}

impl<'p> Pool<'p> {
    /// # Safety
    /// `p` must be a live pool that outlives `'p`, which no other thread uses
    /// while `'p` lasts.
    pub unsafe fn from_raw(p: *mut apr_pool_t) -> Pool<'p> {
        Pool {
            raw: p,
            _life: PhantomData,
        }
    }

    /// A NUL-terminated copy of `s` in the pool (a NUL inside `s` ends it early).
    pub fn strdup(&self, s: &[u8]) -> &'p CStr {
        // SAFETY: the pool is live (from_raw); apr_pstrmemdup copies len bytes
        // and adds a NUL, in memory that lives as long as the pool.
        unsafe {
            let copy = apr_pstrmemdup(self.raw, s.as_ptr().cast(), s.len() as apr_size_t);
            CStr::from_ptr(copy)
        }
    }

    /// Moves `value` into memory the pool owns: it is dropped when the pool is
    /// cleared or destroyed. For records httpd keeps and hands back.
    pub fn own<T: 'static>(&self, value: T) -> *mut c_void {
        unsafe extern "C" fn drop_box<T>(data: *mut c_void) -> apr_status_t {
            guard("a pool cleanup", (), || {
                // SAFETY: data came from Box::into_raw below; the pool runs this cleanup once.
                drop(unsafe { Box::from_raw(data.cast::<T>()) })
            });
            APR_SUCCESS as apr_status_t
        }
        let ptr = Box::into_raw(Box::new(value)).cast::<c_void>();
        // SAFETY: the pool is live; the cleanup frees ptr with it, and no child
        // cleanup runs in a forked process (which must not run drops twice).
        unsafe {
            apr_pool_cleanup_register(
                self.raw,
                ptr,
                Some(drop_box::<T>),
                Some(apr_pool_cleanup_null),
            )
        };
        ptr
    }

    /// Runs `f` when the pool is cleared or destroyed.
    pub fn on_cleanup(&self, f: impl FnOnce() + 'static) {
        struct OnDrop<F: FnOnce()>(Option<F>);
        impl<F: FnOnce()> Drop for OnDrop<F> {
            fn drop(&mut self) {
                if let Some(f) = self.0.take() {
                    f()
                }
            }
        }
        self.own(OnDrop(Some(f)));
    }

    /// The path of `name` in httpd's runtime directory, or None if httpd cannot tell.
    pub fn runtime_dir(&self, name: &str) -> Option<String> {
        let name = CString::new(name).ok()?;
        // SAFETY: the pool is live; httpd returns NULL or a NUL-terminated path allocated in it.
        let path = unsafe { opt_bytes(ap_runtime_dir_relative(self.raw, name.as_ptr())) }?;
        Some(String::from_utf8_lossy(path).into_owned())
    }

    /// The value kept in this pool under `key`, made with the key's initial
    /// value the first time.
    pub fn slot<T: Copy>(&self, key: &Kept<T>) -> Slot<'p, T> {
        const { assert!(std::mem::align_of::<T>() <= 8) };
        let mut data: *mut c_void = std::ptr::null_mut();
        // SAFETY: the pool is live; userdata_get writes the stored pointer or NULL into data.
        unsafe { apr_pool_userdata_get(&mut data, key.name.as_ptr(), self.raw) };
        if data.is_null() {
            // SAFETY: apr_palloc returns memory for a T, aligned to 8 bytes
            // (enough for T, asserted above), that lives as long as the pool;
            // apr_pool_userdata_set copies the key.
            unsafe {
                data = apr_palloc(self.raw, std::mem::size_of::<T>() as apr_size_t);
                data.cast::<T>().write(key.initial);
                apr_pool_userdata_set(data, key.name.as_ptr(), None, self.raw);
            }
        }
        Slot {
            cell: data.cast(),
            _life: PhantomData,
        }
    }
}

/// A value that a pool keeps under a name (see [`Pool::slot`]). The keys are
/// declared here only, so that each name goes with one type.
pub struct Kept<T> {
    name: &'static CStr,
    initial: T,
}

/// A malloc'd buffer of a big-endian u32 length and that many bytes, or NULL:
/// memory in the process pool itself could never be freed.
#[derive(Clone, Copy)]
pub struct KeptBytes(*mut u8);

/// In the process pool: the lifeline descriptor of the current daemon supervisor, -1 for none.
pub const LIFELINE: Kept<c_int> = Kept {
    name: c"gateway-daemon-lifeline",
    initial: -1,
};

/// In the process pool: the encoding of the current daemon generation.
pub const GENERATION: Kept<KeptBytes> = Kept {
    name: c"gateway-daemon-generation",
    initial: KeptBytes(std::ptr::null_mut()),
};

/// A value a pool keeps (see [`Pool::slot`]), used on the pool's thread.
pub struct Slot<'p, T> {
    cell: *mut T,
    _life: PhantomData<&'p mut T>,
}

impl Slot<'_, c_int> {
    pub fn get(&self) -> c_int {
        // SAFETY: cell is the pool's c_int (Pool::slot), used by this thread only (Pool::from_raw).
        unsafe { self.cell.read() }
    }

    pub fn set(&self, value: c_int) {
        // SAFETY: as in get.
        unsafe { self.cell.write(value) }
    }

    pub fn replace(&self, value: c_int) -> c_int {
        let old = self.get();
        self.set(value);
        old
    }
}

impl Slot<'_, KeptBytes> {
    /// Takes the bytes out, leaving none; the buffer is wiped before it is freed.
    pub fn take(&self) -> Option<Vec<u8>> {
        // SAFETY: cell is the pool's KeptBytes (Pool::slot), used by this thread
        // only; a non-NULL buffer was made by store and holds its length and bytes.
        unsafe {
            let buf = self.cell.replace(KeptBytes(std::ptr::null_mut())).0;
            if buf.is_null() {
                return None;
            }
            let len = u32::from_be_bytes(buf.cast::<[u8; 4]>().read()) as usize;
            let bytes = std::slice::from_raw_parts_mut(buf.add(4), len);
            let copy = bytes.to_vec();
            bytes.fill(0);
            libc::free(buf.cast());
            Some(copy)
        }
    }

    /// Keeps a copy of `bytes`, in place of what was kept.
    pub fn store(&self, bytes: &[u8]) {
        if let Some(mut old) = self.take() {
            old.fill(0);
        }
        let Ok(len) = u32::try_from(bytes.len()) else {
            return;
        };
        // SAFETY: the buffer, when malloc gives one, has room for the length and
        // the bytes; cell is used by this thread only (as in take).
        unsafe {
            let buf = libc::malloc(4 + bytes.len()).cast::<u8>();
            if !buf.is_null() {
                std::ptr::copy_nonoverlapping(len.to_be_bytes().as_ptr(), buf, 4);
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.add(4), bytes.len());
                self.cell.write(KeptBytes(buf));
            }
        }
    }
}

/// Vouches that httpd runs no other thread of this process now: true in its
/// configuration hooks, in the parent's monitor and in a child's child_init.
/// The process pool, which is not locked, is reached with it only.
#[derive(Clone, Copy)]
pub struct OneThread(PhantomData<*const ()>);

impl OneThread {
    /// # Safety
    /// No other thread of this process may run httpd or Gateway code until the
    /// hook that calls this returns, and the value must not outlive that hook.
    pub unsafe fn assume() -> OneThread {
        OneThread(PhantomData)
    }
}

/// Tells server records apart (the address of the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerId(usize);

/// The main server or a virtual host.
#[derive(Clone, Copy)]
pub struct Server<'s> {
    raw: *mut server_rec,
    _life: PhantomData<&'s server_rec>,
}

/// The main server, for log lines that belong to no request.
static MAIN_SERVER: AtomicPtr<server_rec> = AtomicPtr::new(std::ptr::null_mut());

impl<'s> Server<'s> {
    /// # Safety
    /// `s` must be a live server record that outlives `'s`, whose configuration
    /// records nothing changes while `'s` lasts (httpd has read them).
    pub unsafe fn from_raw(s: *mut server_rec) -> Server<'s> {
        Server {
            raw: s,
            _life: PhantomData,
        }
    }

    pub fn id(&self) -> ServerId {
        ServerId(self.raw as usize)
    }

    /// This module's configuration of the server.
    pub fn config(&self) -> Option<&'s ServerConfig> {
        // SAFETY: the record is live (from_raw); its vector's slot holds the
        // ServerConfig made by gateway_create_server_config, or NULL.
        unsafe { module_config((*self.raw).module_config) }
    }

    /// This server and the ones that follow it: from the main server, every
    /// server of the configuration (the virtual hosts come after it).
    pub fn chain(self) -> impl Iterator<Item = Server<'s>> {
        std::iter::successors(Some(self), |s| {
            // SAFETY: httpd's server list is a NULL-terminated chain of records
            // that live as long as the configuration, as this one does.
            let next = unsafe { (*s.raw).next };
            // SAFETY: as above.
            (!next.is_null()).then(|| unsafe { Server::from_raw(next) })
        })
    }

    /// The pool of the httpd process, which outlives restarts and this module.
    pub fn process_pool(&self, _: OneThread) -> Pool<'s> {
        // SAFETY: the process record and its pool live as long as the process;
        // OneThread vouches that no other thread uses the pool now.
        unsafe { Pool::from_raw((*(*self.raw).process).pool) }
    }

    /// Sends log lines without a request to this server until
    /// [`forget_main_server`].
    ///
    /// # Safety
    /// This must be the main server of the configuration just read: it stays in
    /// use until httpd reads its configuration again, whose pre_config hook
    /// calls [`forget_main_server`].
    pub unsafe fn adopt_as_main(&self) {
        MAIN_SERVER.store(self.raw, Ordering::Relaxed);
    }
}

/// Sends log lines without a request to httpd's own error log until a main
/// server is adopted again: the previous one goes with its configuration.
pub fn forget_main_server() {
    MAIN_SERVER.store(std::ptr::null_mut(), Ordering::Relaxed);
}

/// Writes a line that belongs to no request to the main server's error log.
pub fn log_to_main_server(level: log::Level, line: &str) {
    let s = MAIN_SERVER.load(Ordering::Relaxed);
    let line = crate::common::log::c_line(line);
    // SAFETY: s is NULL (which ap_log_error accepts) or the live main server
    // (adopt_as_main); line is NUL-terminated.
    unsafe { gateway_ap_log(s, std::ptr::null(), aplog_level(level), line.as_ptr()) };
}

/// A directive being read: where it stands and what it configures.
pub struct Cmd<'c> {
    raw: *mut cmd_parms,
    section: *mut c_void,
    _life: PhantomData<&'c mut cmd_parms>,
}

impl<'c> Cmd<'c> {
    /// # Safety
    /// `cmd` must be the live cmd_parms of the directive httpd is reading and
    /// `dcfg` the per-directory record it passed with it (made by
    /// gateway_create_dir_config), both outliving `'c`; nothing else may touch
    /// this module's records of that server and section while `'c` lasts.
    pub unsafe fn from_raw(cmd: *mut cmd_parms, dcfg: *mut c_void) -> Cmd<'c> {
        Cmd {
            raw: cmd,
            section: dcfg,
            _life: PhantomData,
        }
    }

    /// Where the directive was written: `FILE:LINE`.
    pub fn origin(&self) -> String {
        // SAFETY: cmd is live (from_raw); its directive, when set, names a
        // NUL-terminated file.
        unsafe {
            let d = (*self.raw).directive;
            if d.is_null() || (*d).filename.is_null() {
                return "(unknown place)".into();
            }
            format!("{}:{}", bytes_lossy((*d).filename), (*d).line_num)
        }
    }

    /// httpd's message when the directive stands in a context `forbidden`
    /// names (`GLOBAL_ONLY`, ...).
    pub fn check_context(&self, forbidden: u32) -> Result<(), ConfigError> {
        // SAFETY: cmd is live; httpd returns NULL or a NUL-terminated static message.
        match unsafe { opt_bytes(ap_check_cmd_context(self.raw, forbidden)) } {
            None => Ok(()),
            Some(msg) => Err(ConfigError(String::from_utf8_lossy(msg).into_owned())),
        }
    }

    /// The path of the `<Directory>`, `<Location>` or similar section the
    /// directive stands in; None outside any.
    pub fn section_path(&self) -> Option<&'c CStr> {
        // SAFETY: cmd is live; its path is NULL or a NUL-terminated string of the configuration.
        let path = unsafe { (*self.raw).path };
        // SAFETY: as above.
        (!path.is_null()).then(|| unsafe { CStr::from_ptr(path) })
    }

    /// The server the directive configures.
    pub fn server_id(&self) -> ServerId {
        // SAFETY: cmd is live; its server is the record being configured.
        ServerId(unsafe { (*self.raw).server } as usize)
    }

    /// This module's record of the server the directive configures.
    pub fn server_config(&mut self) -> Option<&mut ServerConfig> {
        // SAFETY: cmd and its server are live; the server's vector holds the
        // ServerConfig made by gateway_create_server_config (or NULL), which
        // only this Cmd touches (from_raw).
        unsafe {
            module_slot((*(*self.raw).server).module_config)
                .cast::<ServerConfig>()
                .as_mut()
        }
    }

    /// This module's record of the section the directive stands in; None
    /// outside any section.
    pub fn section_config(&mut self) -> Option<&mut DirConfig> {
        self.section_path()?;
        // SAFETY: inside a section, dcfg is that section's DirConfig (from_raw),
        // which only this Cmd touches.
        unsafe { self.section.cast::<DirConfig>().as_mut() }
    }

    /// The configuration pool, which outlives the directive.
    pub fn pool(&self) -> Pool<'c> {
        // SAFETY: cmd is live; its pool is the configuration pool, used only by
        // the thread that reads the configuration.
        unsafe { Pool::from_raw((*self.raw).pool) }
    }
}

/// # Safety
/// `s` must be a NUL-terminated string.
unsafe fn bytes_lossy(s: *const c_char) -> String {
    // SAFETY: guaranteed by the caller.
    String::from_utf8_lossy(unsafe { bytes(s) }).into_owned()
}

/// A directive's argument as httpd passes it.
#[derive(Clone, Copy)]
pub struct Arg<'c>(&'c CStr);

impl<'c> Arg<'c> {
    /// # Safety
    /// `s` must be a NUL-terminated string that outlives `'c`.
    pub unsafe fn from_raw(s: *const c_char) -> Arg<'c> {
        // SAFETY: guaranteed by the caller.
        Arg(unsafe { CStr::from_ptr(s) })
    }

    pub fn to_str(self) -> Result<&'c str, ConfigError> {
        self.0
            .to_str()
            .map_err(|_| ConfigError("arguments must be UTF-8".into()))
    }
}

/// The arguments of a directive that takes a list.
pub struct Argv<'c>(Vec<Arg<'c>>);

impl<'c> Argv<'c> {
    /// # Safety
    /// `argv` must hold `argc` NUL-terminated strings that outlive `'c`.
    pub unsafe fn from_raw(argc: c_int, argv: *const *mut c_char) -> Argv<'c> {
        Argv(
            (0..argc.max(0) as usize)
                // SAFETY: each of the argc entries is such a string (guaranteed by the caller).
                .map(|i| unsafe { Arg::from_raw(*argv.add(i)) })
                .collect(),
        )
    }

    pub fn to_strs(&self) -> Result<Vec<&'c str>, ConfigError> {
        self.0.iter().map(|a| a.to_str()).collect()
    }
}

/// A request, on the thread of its handler (or one it lends it to, see [`Request::lend`]).
pub struct Request<'r> {
    raw: *mut request_rec,
    _life: PhantomData<&'r mut request_rec>,
}

impl<'r> Request<'r> {
    /// # Safety
    /// `r` must be a live request that outlives `'r`, which no other thread
    /// uses while `'r` lasts (except through [`Request::lend`]).
    pub unsafe fn from_raw(r: *mut request_rec) -> Request<'r> {
        Request {
            raw: r,
            _life: PhantomData,
        }
    }

    /// A string field of the request: it and its pool outlive `'r`.
    fn field(&self, f: impl FnOnce(&request_rec) -> *const c_char) -> Option<&'r [u8]> {
        // SAFETY: the request is live (from_raw); its string fields are NULL or
        // NUL-terminated strings in its pool.
        unsafe { opt_bytes(f(&*self.raw)) }
    }

    pub fn method(&self) -> &'r [u8] {
        self.field(|r| r.method).unwrap_or_default()
    }

    /// The path, decoded (`r->uri`); empty for none.
    pub fn uri(&self) -> &'r [u8] {
        self.field(|r| r.uri).unwrap_or_default()
    }

    pub fn has_uri(&self) -> bool {
        self.field(|r| r.uri).is_some()
    }

    /// The target as the client sent it.
    pub fn unparsed_uri(&self) -> &'r [u8] {
        self.field(|r| r.unparsed_uri).unwrap_or_default()
    }

    pub fn args(&self) -> &'r [u8] {
        self.field(|r| r.args).unwrap_or_default()
    }

    pub fn protocol(&self) -> &'r [u8] {
        self.field(|r| r.protocol).unwrap_or_default()
    }

    pub fn user(&self) -> Option<&'r [u8]> {
        self.field(|r| r.user)
    }

    pub fn auth_type(&self) -> Option<&'r [u8]> {
        self.field(|r| r.ap_auth_type)
    }

    pub fn useragent_ip(&self) -> &'r [u8] {
        self.field(|r| r.useragent_ip).unwrap_or_default()
    }

    pub fn handler(&self) -> Option<&'r CStr> {
        // SAFETY: the request is live; its handler is NULL or a NUL-terminated string.
        let h = unsafe { (*self.raw).handler };
        // SAFETY: as above.
        (!h.is_null()).then(|| unsafe { CStr::from_ptr(h) })
    }

    /// The client's port (0 when httpd does not know it).
    pub fn useragent_port(&self) -> u16 {
        // SAFETY: the request is live; useragent_addr is NULL or its client's address.
        unsafe { (*self.raw).useragent_addr.as_ref() }.map_or(0, |a| a.port)
    }

    /// The address the connection came in on.
    pub fn local_ip(&self) -> &'r [u8] {
        // SAFETY: the request and its connection are live; local_ip is NULL or
        // a NUL-terminated string in the connection's pool, which outlives the request.
        unsafe { bytes((*(*self.raw).connection).local_ip) }
    }

    /// The scheme httpd says the request came with (`http`, `https`).
    pub fn scheme(&self) -> &'r [u8] {
        // SAFETY: the request is live; the hook returns NULL or a static or pool string.
        unsafe { bytes(ap_run_http_scheme(self.raw)) }
    }

    /// The server name as `UseCanonicalName` says.
    pub fn server_name(&self) -> &'r [u8] {
        // SAFETY: the request is live; httpd returns a string of its configuration or pool.
        unsafe { bytes(ap_get_server_name(self.raw)) }
    }

    pub fn server_port(&self) -> u16 {
        // SAFETY: the request is live.
        unsafe { ap_get_server_port(self.raw) }
    }

    /// The request's headers, in order.
    pub fn headers_in(&self) -> Vec<(&'r [u8], &'r [u8])> {
        // SAFETY: the request is live; its headers_in is NULL or a table of its pool.
        unsafe { table((*self.raw).headers_in) }
    }

    /// The variables other modules set for the request (`SetEnv`, mod_ssl, ...).
    pub fn subprocess_env(&self) -> Vec<(&'r [u8], &'r [u8])> {
        // SAFETY: the request is live; its subprocess_env is NULL or a table of its pool.
        unsafe { table((*self.raw).subprocess_env) }
    }

    /// The server the request came to.
    pub fn server(&self) -> Server<'r> {
        // SAFETY: a live request's server record lives as long as the
        // configuration; nothing changes it while requests run.
        unsafe { Server::from_raw((*self.raw).server) }
    }

    /// This module's merged configuration of the request's `<Directory>`,
    /// `<Location>` and such sections.
    pub fn dir_config(&self) -> Option<&'r DirConfig> {
        // SAFETY: the request is live; its per_dir_config is the merged vector,
        // whose slot holds a DirConfig of this module or NULL.
        unsafe { module_config((*self.raw).per_dir_config) }
    }

    /// The request's pool, while the request is not lent.
    fn pool(&self) -> Pool<'_> {
        // SAFETY: the request and its pool are live; only this thread uses them now.
        unsafe { Pool::from_raw((*self.raw).pool) }
    }

    /// Maps the request to `file`, to be served by the content handler named `handler`.
    pub fn map_to(&mut self, file: &[u8], handler: &'static CStr) {
        let file = self.pool().strdup(file).as_ptr();
        // SAFETY: the request is live; the strings outlive it (pool, static).
        unsafe {
            (*self.raw).filename = file.cast_mut();
            (*self.raw).handler = handler.as_ptr();
        }
    }

    /// Writes a finished line to the error log, tagged with this request.
    pub fn log_line(&self, level: log::Level, line: &str) {
        let line = crate::common::log::c_line(line);
        // SAFETY: the request is live and line is NUL-terminated.
        unsafe {
            gateway_ap_log(
                std::ptr::null(),
                self.raw,
                aplog_level(level),
                line.as_ptr(),
            )
        };
    }
}

/// The entries of an APR table, in order.
///
/// # Safety
/// `t` must be NULL or a live APR table whose strings outlive `'a`.
unsafe fn table<'a>(t: *const apr_table_t) -> Vec<(&'a [u8], &'a [u8])> {
    if t.is_null() {
        return Vec::new();
    }
    // SAFETY: t is a live table (guaranteed by the caller).
    let elts = unsafe { &*apr_table_elts(t) };
    if elts.nelts <= 0 || elts.elts.is_null() {
        return Vec::new();
    }
    // SAFETY: the table's array holds nelts entries of apr_table_entry_t.
    let entries = unsafe {
        std::slice::from_raw_parts(elts.elts.cast::<apr_table_entry_t>(), elts.nelts as usize)
    };
    entries
        .iter()
        .filter(|e| !e.key.is_null())
        // SAFETY: keys and values of a live table are NUL-terminated strings.
        .map(|e| unsafe { (bytes(e.key), bytes(e.val)) })
        .collect()
}

/// The request body, read through httpd's input filters (which decode chunked bodies).
impl Request<'_> {
    /// Prepares to read the body; Err is the status to answer with.
    pub fn setup_body(&mut self) -> Result<(), c_int> {
        // SAFETY: the request is live.
        let rc = unsafe { ap_setup_client_block(self.raw, REQUEST_CHUNKED_DECHUNK as c_int) };
        if rc == OK as c_int {
            Ok(())
        } else {
            Err(rc)
        }
    }

    /// The client's socket, when the request has one of its own (not an HTTP/2
    /// stream): valid while the connection is.
    pub fn client_fd(&self) -> Option<RawFd> {
        // SAFETY: the request and its connection are live.
        let fd = unsafe { gateway_ap_client_fd(self.raw) };
        (fd >= 0).then_some(fd)
    }

    /// Whether the connection is known broken (an HTTP/2 stream the client reset).
    pub fn connection_aborted(&self) -> bool {
        // SAFETY: the request and its connection are live.
        unsafe { (*(*self.raw).connection).aborted != 0 }
    }

    /// Whether the request has a body at all (once [`Request::setup_body`] ran).
    pub fn has_body(&self) -> bool {
        // SAFETY: the request is live.
        unsafe { (*self.raw).read_chunked != 0 || (*self.raw).remaining > 0 }
    }

    /// Whether to read the body; sends "100 Continue" when the client waits for it.
    pub fn should_read_body(&mut self) -> bool {
        // SAFETY: the request is live.
        unsafe { ap_should_client_block(self.raw) != 0 }
    }

    /// Reads the next bytes of the body into `buf`; None when the body is broken
    /// or the client went away.
    pub fn read_body(&mut self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: the request is live; buf is valid for buf.len() bytes.
        let n = unsafe {
            ap_get_client_block(self.raw, buf.as_mut_ptr().cast(), buf.len() as apr_size_t)
        };
        usize::try_from(n).ok()
    }
}

/// The response, written through httpd's output filters.
impl Request<'_> {
    /// The response's status as set so far.
    pub fn status(&self) -> u16 {
        // SAFETY: the request is live (from_raw).
        u16::try_from(unsafe { (*self.raw).status }).unwrap_or(500)
    }

    pub fn set_status(&mut self, status: u16, line: &[u8]) {
        let line = self.pool().strdup(line).as_ptr();
        // SAFETY: the request is live; the line is in its pool.
        unsafe {
            (*self.raw).status = c_int::from(status);
            (*self.raw).status_line = line;
        }
    }

    pub fn set_content_type(&mut self, value: &[u8]) {
        let value = self.pool().strdup(value).as_ptr();
        // SAFETY: the request is live; httpd keeps the value, which is in its pool.
        unsafe { ap_set_content_type(self.raw, value) };
    }

    pub fn set_content_length(&mut self, len: u64) {
        // SAFETY: the request is live.
        unsafe { ap_set_content_length(self.raw, len as apr_off_t) };
    }

    pub fn add_header_out(&mut self, name: &[u8], value: &[u8]) {
        let pool = self.pool();
        let (name, value) = (pool.strdup(name).as_ptr(), pool.strdup(value).as_ptr());
        // SAFETY: the request and its headers_out table are live; the strings are in its pool.
        unsafe { apr_table_add((*self.raw).headers_out, name, value) };
    }

    /// Passes `data` down the output filters, pushing it to the client now with `flush`.
    pub fn write(&mut self, out: &mut Brigade, data: &[u8], flush: bool) -> io::Result<()> {
        let bb = &mut out.0;
        // SAFETY: the request is live; bb is NULL or a brigade the shim made for
        // it (a Brigade is lent with its request only); data stays valid during the call (a transient bucket, passed at once).
        apr_result(unsafe {
            gateway_ap_write(
                self.raw,
                bb,
                data.as_ptr().cast(),
                data.len() as apr_size_t,
                c_int::from(flush),
            )
        })
    }

    /// Sends `len` bytes of the open file `fd` from `offset` (with sendfile where
    /// httpd can), all before returning: the caller may close it then.
    pub fn send_file(
        &mut self,
        out: &mut Brigade,
        fd: RawFd,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let bb = &mut out.0;
        let mut file: *mut apr_file_t = std::ptr::null_mut();
        let mut osfd = fd;
        // SAFETY: the request is live; apr_os_file_put wraps fd without taking it
        // (no cleanup closes it); the shim sends the data with a flush before
        // returning, while fd is still open.
        apr_result(unsafe {
            let rv = apr_os_file_put(
                &mut file,
                &mut osfd,
                (APR_FOPEN_READ | APR_FOPEN_SENDFILE_ENABLED) as i32,
                (*self.raw).pool,
            );
            if rv != APR_SUCCESS as apr_status_t {
                rv
            } else {
                gateway_ap_send_file(self.raw, bb, file, offset as apr_off_t, len as apr_size_t)
            }
        })
    }

    /// Ends a response whose headers went out but whose body broke: the client
    /// sees it cut short and the connection closes.
    pub fn abort_response(&mut self) {
        // SAFETY: the request is live.
        unsafe { gateway_ap_abort_response(self.raw) };
    }

    /// Ends a complete response and pushes it out.
    pub fn finish(&mut self) {
        // SAFETY: the request is live; a client that went away shows in its
        // connection, not in the result.
        unsafe { gateway_ap_finish(self.raw) };
    }

    /// Whether the response's headers went out (the header filter ran).
    pub fn headers_sent(&self) -> bool {
        // SAFETY: the request is live.
        unsafe { (*self.raw).sent_bodyct != 0 }
    }
}

/// The output brigade of a response, made by the shim on first use and reused
/// for every pass. It exists only inside a lent request ([`SharedRequest::with`]),
/// so it can never outlive that request's pool.
pub struct Brigade(*mut apr_bucket_brigade);

impl<'r> Request<'r> {
    /// Lends the request, while `f` runs, to objects that may be called from
    /// other threads (the body and response handed to a runner). The request's
    /// lock keeps them to one thread at a time; once `f` returns (or unwinds)
    /// they find the request gone.
    pub fn lend<T>(&mut self, f: impl FnOnce(SharedRequest) -> T) -> T {
        struct Revoke(Arc<Mutex<Lent>>);
        impl Drop for Revoke {
            fn drop(&mut self) {
                let mut lent = self.0.lock().unwrap_or_else(|e| e.into_inner());
                *lent = Lent(std::ptr::null_mut(), Brigade(std::ptr::null_mut()));
            }
        }
        let shared = Arc::new(Mutex::new(Lent(self.raw, Brigade(std::ptr::null_mut()))));
        let _revoke = Revoke(shared.clone());
        f(SharedRequest(shared))
    }
}

/// The request as [`Request::lend`] lends it, with its output brigade; NULL
/// once taken back.
struct Lent(*mut request_rec, Brigade);

// SAFETY: the pointers are used only under the SharedRequest's lock, while the
// handler that lent the request runs and has lent it exclusively (Request::lend).
unsafe impl Send for Lent {}

/// A request lent by its handler (see [`Request::lend`]).
#[derive(Clone)]
pub struct SharedRequest(Arc<Mutex<Lent>>);

impl SharedRequest {
    /// Runs `f` with the request and its output brigade, holding its lock;
    /// None once the handler took it back.
    pub fn with<T>(&self, f: impl FnOnce(&mut Request<'_>, &mut Brigade) -> T) -> Option<T> {
        let mut lent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lent.0.is_null() {
            return None;
        }
        // SAFETY: the handler lent the live request for as long as it is not
        // NULL here, and the lock keeps other threads out.
        let mut r = unsafe { Request::from_raw(lent.0) };
        Some(f(&mut r, &mut lent.1))
    }
}

/// A value of httpd's MPM (`AP_MPMQ_*`).
pub fn mpm_query(code: u32) -> c_int {
    let mut value: c_int = 0;
    // SAFETY: ap_mpm_query writes one int into value.
    unsafe { ap_mpm_query(code as c_int, &mut value) };
    value
}

/// Whether httpd is in the first of its two start-up readings of the
/// configuration, whose result it throws away.
pub fn first_startup_pass() -> bool {
    // SAFETY: ap_state_query only reads httpd's state.
    unsafe { ap_state_query(AP_SQ_MAIN_STATE as c_int) == AP_SQ_MS_CREATE_PRE_CONFIG as c_int }
}

/// Whether the module with this source file name (`mod_wsgi.c`) is loaded.
pub fn module_loaded(name: &CStr) -> bool {
    // SAFETY: looks a module up by name in httpd's list of loaded modules.
    !unsafe { ap_find_linked_module(name.as_ptr()) }.is_null()
}

/// The user and group ids from `User`/`Group` read so far (-1 as u32 until then).
pub fn unixd_ids() -> (u32, u32) {
    // SAFETY: mod_unixd writes ap_unixd_config only while httpd reads its
    // configuration, on its single thread; only read here.
    unsafe { (ap_unixd_config.user_id, ap_unixd_config.group_id) }
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Makes every child forked from now on (by an application, without exec)
/// close httpd's listening sockets.
pub fn close_listeners_at_fork() {
    // SAFETY: registers a fork handler that only closes httpd's listening sockets.
    unsafe { gateway_ap_close_listeners_at_fork() };
}

/// Whether the other end of descriptor `fd` hung up (or it broke), without waiting.
pub fn hung_up(fd: RawFd) -> bool {
    let mut polled = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: polls one pollfd we own, without waiting.
    let n = unsafe { libc::poll(&mut polled, 1, 0) };
    n > 0 && polled.revents & (libc::POLLERR | libc::POLLHUP) != 0
}
