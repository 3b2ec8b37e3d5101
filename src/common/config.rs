//! Configuration values as both servers spell them, parsed and checked once.

use std::fmt;
use std::fs::File;
use std::path::PathBuf;

/// A configuration mistake, worded for the person who wrote the configuration.
/// The server adds the directive's file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Where a WSGI application lives: `FILE[:CALLABLE]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppSpec {
    /// The Python script that defines the callable.
    pub file: PathBuf,
    /// The name of the callable in that script (`application` by default).
    pub callable: String,
}

impl AppSpec {
    /// Parses `FILE[:CALLABLE]` and checks that the file can be read now, so that a
    /// typo fails the configuration test instead of every request.
    pub fn parse(spec: &str) -> Result<AppSpec, ConfigError> {
        let (file, callable) = match spec.rsplit_once(':') {
            Some((file, name)) if is_identifier(name) => (file, name),
            Some((_, name)) if !name.contains('/') => {
                return err(format!(
                    "'{name}' is not a valid Python name for the callable in '{spec}'"
                ))
            }
            _ => (spec, "application"),
        };
        if file.is_empty() {
            return err("the application file is missing (expected FILE[:CALLABLE])");
        }
        if let Err(e) = File::open(file) {
            return err(format!("cannot read the WSGI script '{file}': {e}"));
        }
        Ok(AppSpec {
            file: PathBuf::from(file),
            callable: callable.to_string(),
        })
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
}

/// Where the requests of a virtual host or location run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// In the server's own worker processes.
    #[default]
    Embedded,
    /// In the named daemon process group.
    Daemon(String),
}

impl Mode {
    /// Parses the arguments of `GatewayMode` / `gateway_mode`.
    pub fn parse(args: &[&str]) -> Result<Mode, ConfigError> {
        match args {
            ["embedded"] => Ok(Mode::Embedded),
            ["daemon", name] => Ok(Mode::Daemon(name.to_string())),
            ["daemon"] => err("'daemon' needs the name of a daemon process group"),
            _ => err(format!(
                "expected 'embedded' or 'daemon NAME', got '{}'",
                args.join(" ")
            )),
        }
    }
}

/// Splits a `DIR[:DIR...]` list, dropping empty entries.
pub fn split_path_list(list: &str) -> Vec<PathBuf> {
    list.split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// The options of one daemon process group (`GatewayDaemon` / `gateway_daemon`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonOptions {
    pub name: String,
    pub processes: u32,
    pub threads: u32,
    pub python_home: Option<PathBuf>,
    pub python_path: Vec<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub max_requests: u64,
    pub request_timeout: u64,
    pub graceful_timeout: u64,
    pub socket_timeout: u64,
    /// Seconds a request may wait for a free daemon thread before it gets a 503;
    /// 0 waits as long as `socket_timeout`.
    pub queue_timeout: u64,
    /// Connections the group's socket holds before new ones are refused (503).
    pub listen_backlog: u32,
    pub display_name: Option<String>,
}

/// The option keys a daemon group accepts.
pub const DAEMON_OPTION_KEYS: &[&str] = &[
    "processes",
    "threads",
    "python-home",
    "python-path",
    "user",
    "group",
    "max-requests",
    "request-timeout",
    "graceful-timeout",
    "socket-timeout",
    "queue-timeout",
    "listen-backlog",
    "display-name",
];

impl DaemonOptions {
    /// Parses `NAME [key=value ...]`.
    pub fn parse(args: &[&str]) -> Result<DaemonOptions, ConfigError> {
        let Some((name, options)) = args.split_first() else {
            return err("a daemon process group needs a name");
        };
        if name.contains('=') || name.is_empty() {
            return err(format!(
                "the first argument must be the group's name, got '{name}'"
            ));
        }
        let mut d = DaemonOptions {
            name: name.to_string(),
            processes: 1,
            threads: 15,
            python_home: None,
            python_path: Vec::new(),
            user: None,
            group: None,
            max_requests: 0,
            request_timeout: 0,
            graceful_timeout: 15,
            socket_timeout: 75,
            queue_timeout: 0,
            listen_backlog: 256,
            display_name: None,
        };
        for option in options {
            let Some((key, value)) = option.split_once('=') else {
                return err(format!("daemon option '{option}' must be key=value"));
            };
            let number = |min: u64| -> Result<u64, ConfigError> {
                match value.parse::<u64>() {
                    Ok(n) if n >= min => Ok(n),
                    _ => err(format!("daemon option '{key}' needs a whole number of at least {min}, got '{value}'")),
                }
            };
            match key {
                "processes" => d.processes = number(1)?.min(u32::MAX as u64) as u32,
                "threads" => d.threads = number(1)?.min(u32::MAX as u64) as u32,
                "python-home" => d.python_home = Some(PathBuf::from(value)),
                "python-path" => d.python_path = split_path_list(value),
                "user" => d.user = Some(value.to_string()),
                "group" => d.group = Some(value.to_string()),
                "max-requests" => d.max_requests = number(0)?,
                "request-timeout" => d.request_timeout = number(0)?,
                "graceful-timeout" => d.graceful_timeout = number(0)?,
                "socket-timeout" => d.socket_timeout = number(1)?,
                "queue-timeout" => d.queue_timeout = number(0)?,
                "listen-backlog" => d.listen_backlog = number(1)?.min(65535) as u32,
                "display-name" => d.display_name = Some(value.to_string()),
                _ => {
                    return err(format!(
                        "unknown daemon option '{key}' (known options: {})",
                        DAEMON_OPTION_KEYS.join(", ")
                    ))
                }
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_spec_defaults_to_application() {
        let spec = AppSpec::parse("Cargo.toml").unwrap();
        assert_eq!(spec.callable, "application");
        assert_eq!(spec.file, PathBuf::from("Cargo.toml"));
        let spec = AppSpec::parse("Cargo.toml:app").unwrap();
        assert_eq!(spec.callable, "app");
    }

    #[test]
    fn app_spec_rejects_missing_file_and_bad_names() {
        let e = AppSpec::parse("/nonexistent/app.py").unwrap_err();
        assert!(
            e.0.contains("cannot read the WSGI script '/nonexistent/app.py'"),
            "{e}"
        );
        assert!(AppSpec::parse("Cargo.toml:1app").is_err());
    }

    #[test]
    fn mode_parses_both_forms() {
        assert_eq!(Mode::parse(&["embedded"]), Ok(Mode::Embedded));
        assert_eq!(Mode::parse(&["daemon", "g"]), Ok(Mode::Daemon("g".into())));
        assert!(Mode::parse(&["daemon"]).is_err());
        assert!(Mode::parse(&["threaded"]).is_err());
    }

    #[test]
    fn daemon_options_reject_unknown_keys_and_bad_numbers() {
        let d =
            DaemonOptions::parse(&["g", "processes=2", "threads=4", "python-path=/a:/b"]).unwrap();
        assert_eq!((d.processes, d.threads, d.python_path.len()), (2, 4, 2));
        assert_eq!((d.queue_timeout, d.listen_backlog), (0, 256));
        let d = DaemonOptions::parse(&["g", "queue-timeout=5", "listen-backlog=10"]).unwrap();
        assert_eq!((d.queue_timeout, d.listen_backlog), (5, 10));
        assert!(DaemonOptions::parse(&["g", "listen-backlog=0"]).is_err());
        let e = DaemonOptions::parse(&["g", "colour=red"]).unwrap_err();
        assert!(e.0.contains("unknown daemon option 'colour'"), "{e}");
        assert!(DaemonOptions::parse(&["g", "processes=0"]).is_err());
        assert!(DaemonOptions::parse(&["g", "threads"]).is_err());
        assert!(DaemonOptions::parse(&[]).is_err());
    }
}
