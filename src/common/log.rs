//! Routes the `log` crate to the server's error log. Every line starts with
//! `gateway:`; lines about a request also name its method and URI (see
//! [`request_line`]).

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
            sink(record.level(), &format!("gateway: {}", record.args()));
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

#[cfg(test)]
mod tests {
    #[test]
    fn request_lines_name_method_and_uri() {
        assert_eq!(
            super::request_line(b"GET", b"/a?b", "boom"),
            "gateway: GET /a?b: boom"
        );
    }
}
