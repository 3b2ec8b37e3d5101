//! Routes the `log` crate to the server's error log. Every line starts with
//! `gateway:`; lines about a request also name its method and URI (see
//! [`request_line`]).

use std::borrow::Cow;
use std::fmt::Write;

use std::sync::OnceLock;

/// Writes one finished line to the server's error log.
pub type Sink = fn(level: log::Level, line: &str);

static SINK: OnceLock<Sink> = OnceLock::new();

struct ServerLog;

impl log::Log for ServerLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if let Some(sink) = SINK.get() {
            let line = format!("gateway: {}", record.args());
            sink(record.level(), &escape_controls(&line));
        }
    }

    fn flush(&self) {}
}

/// Installs the server's sink as the process's logger. The server filters by its
/// own LogLevel, so everything is passed on. Later calls keep the first sink.
pub fn install(sink: Sink) {
    if SINK.set(sink).is_ok() {
        let _ = log::set_logger(&ServerLog);
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// Tells the supervisor and daemon processes what the error log they write to
/// on stderr looks like: `nginx:LEVEL` under nginx (LEVEL its `error_log`
/// level), unset under Apache. The supervisor's environment passes it on to its
/// daemon processes.
pub const STDERR_LOG_VAR: &str = "GATEWAY_ERROR_LOG";

/// The error log format of the server whose log is on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `[Tue Dec 01 23:12:11 2026] [gateway:info] [pid N] gateway: ...`
    Apache,
    /// `2026/12/01 23:12:11 [info] N#N: gateway: ...`
    Nginx,
}

static STDERR_FORMAT: OnceLock<Format> = OnceLock::new();

/// nginx's level names, by their number (`NGX_LOG_EMERG` is 1).
const NGINX_LEVELS: [&str; 8] = [
    "emerg", "alert", "crit", "error", "warn", "notice", "info", "debug",
];

/// The name of nginx's log level number `level` (`debug` turns on every debug bit).
pub fn nginx_level_name(level: usize) -> &'static str {
    NGINX_LEVELS[level.clamp(1, NGINX_LEVELS.len()) - 1]
}

/// The format and the most verbose level that a value of [`STDERR_LOG_VAR`]
/// asks for (Apache's format, every level, when unset or not understood: Apache
/// filters nothing that reaches its log through stderr either).
fn stderr_settings(value: Option<&str>) -> (Format, log::LevelFilter) {
    let Some(level) = value.and_then(|v| v.strip_prefix("nginx:")) else {
        return (Format::Apache, log::LevelFilter::Trace);
    };
    let max = match level {
        "emerg" | "alert" | "crit" | "error" => log::LevelFilter::Error,
        "warn" | "notice" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        // "debug", or a level name this build does not know: hide nothing.
        _ => log::LevelFilter::Trace,
    };
    (Format::Nginx, max)
}

/// Installs a sink that writes each line to stderr, which the server has pointed
/// at its error log, in the server's format and at its level (see [`STDERR_LOG_VAR`]).
pub fn install_stderr() {
    let value = std::env::var(STDERR_LOG_VAR).ok();
    let (format, max) = stderr_settings(value.as_deref());
    if STDERR_FORMAT.set(format).is_ok() {
        install(write_stderr_line);
        log::set_max_level(max);
    }
}

fn write_stderr_line(level: log::Level, line: &str) {
    let format = STDERR_FORMAT.get().copied().unwrap_or(Format::Apache);
    // SAFETY: getpid and gettid have no preconditions.
    let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
    let text = match format {
        Format::Apache => format!(
            "[{}] [gateway:{}] [pid {pid}] {line}\n",
            timestamp(c"%a %b %d %H:%M:%S %Y"),
            apache_level(level)
        ),
        Format::Nginx => format!(
            "{} [{}] {pid}#{tid}: {line}\n",
            timestamp(c"%Y/%m/%d %H:%M:%S"),
            nginx_level(level)
        ),
    };
    // One write per line keeps lines from concurrent threads and processes whole.
    // SAFETY: writes a buffer we own to fd 2.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

fn apache_level(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace1",
    }
}

fn nginx_level(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug | log::Level::Trace => "debug",
    }
}

/// The local time in `format` (strftime's).
fn timestamp(format: &std::ffi::CStr) -> String {
    // SAFETY: time/localtime_r/strftime write only into the buffers given.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&now, &mut tm);
        let mut buf = [0u8; 64];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), format.as_ptr(), &tm);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// A log line about one request: `gateway: METHOD URI: message`.
pub fn request_line(method: &[u8], uri: &[u8], message: &str) -> String {
    format!(
        "gateway: {} {}: {}",
        String::from_utf8_lossy(method),
        String::from_utf8_lossy(uri),
        message
    )
}

/// A log line with its control characters (an application's ESC sequences, CR,
/// a stray LF) written as `\xHH`, as httpd does: nothing an application prints
/// may forge log lines or drive the terminal of whoever reads the log.
pub fn escape_controls(line: &str) -> Cow<'_, str> {
    let is_control = |c: char| (c < ' ' && c != '\t') || c == '\x7f';
    if !line.contains(is_control) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        if is_control(c) {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A finished line for a C logging call: control characters escaped (NUL too,
/// so the conversion cannot fail).
pub fn c_line(line: &str) -> std::ffi::CString {
    std::ffi::CString::new(escape_controls(line).into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::{nginx_level_name, stderr_settings, Format};
    use log::LevelFilter;

    #[test]
    fn stderr_lines_follow_the_nginx_error_log_level() {
        assert_eq!(stderr_settings(None), (Format::Apache, LevelFilter::Trace));
        assert_eq!(
            stderr_settings(Some("nginx:warn")),
            (Format::Nginx, LevelFilter::Warn)
        );
        assert_eq!(
            stderr_settings(Some("nginx:notice")),
            (Format::Nginx, LevelFilter::Warn)
        );
        assert_eq!(
            stderr_settings(Some("nginx:crit")),
            (Format::Nginx, LevelFilter::Error)
        );
        assert_eq!(
            stderr_settings(Some("nginx:info")),
            (Format::Nginx, LevelFilter::Info)
        );
        assert_eq!((nginx_level_name(5), nginx_level_name(7)), ("warn", "info"));
        // `error_log ... debug` sets every debug bit: still "debug".
        assert_eq!(nginx_level_name(0x7fff_fff0), "debug");
        assert_eq!(nginx_level_name(0), "emerg");
    }

    #[test]
    fn request_lines_name_method_and_uri() {
        assert_eq!(
            super::request_line(b"GET", b"/a?b", "boom"),
            "gateway: GET /a?b: boom"
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(super::escape_controls("a\tb"), "a\tb");
        assert_eq!(
            super::escape_controls("x\x1b[31mred\r\nforged\x7f"),
            "x\\x1b[31mred\\x0d\\x0aforged\\x7f"
        );
    }
}
