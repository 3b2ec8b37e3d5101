//! Routes the `log` crate to the server's error log. Every line starts with
//! `gateway:`; lines about a request also name its method and URI (see
//! [`request_line`]).

use std::borrow::Cow;
use std::fmt::Write;

use once_cell::sync::OnceCell;

/// Writes one finished line to the server's error log.
pub type Sink = fn(level: log::Level, line: &str);

static SINK: OnceCell<Sink> = OnceCell::new();

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
