//! Configuration values as both servers spell them, parsed and checked once.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

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

/// The protocol an application speaks, as `interface=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Interface {
    /// Not named: told from the callable when it is loaded (a coroutine
    /// function, or an object whose `__call__` is one, is ASGI).
    #[default]
    Detect,
    Wsgi,
    Asgi,
}

impl Interface {
    /// The value of an `interface=` option.
    pub fn parse(value: &str) -> Result<Interface, ConfigError> {
        match value {
            "wsgi" => Ok(Interface::Wsgi),
            "asgi" => Ok(Interface::Asgi),
            _ => err(format!(
                "interface={value} is not a protocol Gateway speaks: use interface=wsgi or interface=asgi"
            )),
        }
    }

    /// The number that stands for it on the daemon wire.
    pub fn code(self) -> u8 {
        match self {
            Interface::Detect => 0,
            Interface::Wsgi => 1,
            Interface::Asgi => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Interface> {
        [Interface::Detect, Interface::Wsgi, Interface::Asgi]
            .into_iter()
            .find(|i| i.code() == code)
    }
}

/// Where an application lives: `FILE[:CALLABLE]`, and the protocol it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppSpec {
    /// The Python script that defines the callable.
    pub file: PathBuf,
    /// The name of the callable in that script (`application` by default).
    pub callable: String,
    pub interface: Interface,
}

impl AppSpec {
    /// Parses `FILE[:CALLABLE]` and checks that the file can be read now, so that a
    /// typo fails the configuration test instead of every request.
    pub fn parse(spec: &str) -> Result<AppSpec, ConfigError> {
        AppSpec::parse_in(spec, Path::new(""))
    }

    /// As [`AppSpec::parse`], with a relative FILE taken relative to `base`
    /// (nginx's prefix, as for its own directives).
    pub fn parse_in(spec: &str, base: &Path) -> Result<AppSpec, ConfigError> {
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
        let file = base.join(file);
        if let Err(e) = File::open(&file) {
            return err(format!(
                "cannot read the WSGI script '{}': {e}",
                file.display()
            ));
        }
        Ok(AppSpec {
            file,
            callable: callable.to_string(),
            interface: Interface::Detect,
        })
    }

    /// As [`AppSpec::parse_in`], followed by the mount's options
    /// (`interface=wsgi|asgi`).
    pub fn parse_with(spec: &str, base: &Path, options: &[&str]) -> Result<AppSpec, ConfigError> {
        let mut app = AppSpec::parse_in(spec, base)?;
        for option in options {
            match option.split_once('=') {
                Some(("interface", value)) => app.interface = Interface::parse(value)?,
                _ => {
                    return err(format!(
                        "unknown option '{option}' after the application (expected interface=wsgi or interface=asgi)"
                    ))
                }
            }
        }
        Ok(app)
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

/// One script already holds an embedded interpreter and another would join it:
/// what to tell the operator. `at` places say where each is mounted, when known.
/// Applications in one interpreter share their modules and settings, which
/// breaks apps such as two Django projects (mod_wsgi gives each its own
/// sub-interpreter; PyO3 cannot run in more than one).
pub fn interpreter_clash(server: &str, first: (&Path, &str), second: (&Path, &str)) -> String {
    let (daemon, share) = if server == "nginx" {
        (
            "'gateway_daemon NAME ...;' and 'gateway_mode daemon NAME;'",
            "'gateway_shared_interpreter on;'",
        )
    } else {
        (
            "'GatewayDaemon NAME ...' and 'GatewayMode daemon NAME'",
            "'GatewaySharedInterpreter On'",
        )
    };
    let place = |(file, at): (&Path, &str)| {
        if at.is_empty() {
            file.display().to_string()
        } else {
            format!("{} ({at})", file.display())
        }
    };
    format!(
        "{} would share the embedded Python interpreter with {}: applications in one \
         interpreter share their modules and settings (two Django projects cannot). Run one \
         of them in its own daemon group ({daemon}), or, if they may share, say so with {share}",
        place(second),
        place(first)
    )
}

/// The daemon groups a configuration defines and the places that name them,
/// each with the `FILE:LINE` it was written at. Group names are global to the
/// server (a group defined in one virtual host or location serves any other),
/// so references are checked once the whole configuration is read.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    defined: Vec<(DaemonOptions, String)>,
    references: Vec<(String, String)>,
}

impl Groups {
    /// Adds a group defined at `at`, unless its name is taken.
    pub fn define(&mut self, options: DaemonOptions, at: String) -> Result<(), ConfigError> {
        if let Some((_, first)) = self.defined.iter().find(|(d, _)| d.name == options.name) {
            return err(format!(
                "daemon process group '{}' is already defined at {first}",
                options.name
            ));
        }
        self.defined.push((options, at));
        Ok(())
    }

    /// Notes that the configuration at `at` sends requests to group `name`.
    pub fn refer(&mut self, name: &str, at: String) {
        self.references.push((name.to_string(), at));
    }

    /// The references to groups that are not defined: name and place.
    pub fn undefined(&self) -> impl Iterator<Item = (&str, &str)> {
        self.references
            .iter()
            .filter(|(name, _)| !self.defined.iter().any(|(d, _)| &d.name == name))
            .map(|(name, at)| (name.as_str(), at.as_str()))
    }

    /// The groups with where each is defined, in the order they were.
    pub fn iter(&self) -> impl Iterator<Item = (&DaemonOptions, &str)> {
        self.defined.iter().map(|(d, at)| (d, at.as_str()))
    }

    /// The groups' options, in the order they were defined.
    pub fn options(&self) -> Vec<DaemonOptions> {
        self.defined.iter().map(|(d, _)| d.clone()).collect()
    }
}

/// Splits a `DIR[:DIR...]` list, dropping empty entries.
pub fn split_path_list(list: &str) -> Vec<PathBuf> {
    list.split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// The value of an `on|off` option.
fn on_off(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => err(format!("daemon option '{key}' is on or off, got '{value}'")),
    }
}

/// `processes=N` (a fixed pool) or `processes=MIN-MAX` (a pool that grows and
/// shrinks): (MIN, MAX).
fn process_range(value: &str) -> Result<(u32, u32), ConfigError> {
    let count = |v: &str| v.parse::<u32>().ok().filter(|&n| n >= 1);
    let range = match value.split_once('-') {
        Some((min, max)) => count(min).zip(count(max)).filter(|(min, max)| min <= max),
        None => count(value).map(|n| (n, n)),
    };
    range.ok_or_else(|| {
        ConfigError(format!(
            "daemon option 'processes' needs a number of at least 1 or a range MIN-MAX with 1 <= MIN <= MAX, got '{value}'"
        ))
    })
}

/// The options of one daemon process group (`GatewayDaemon` / `gateway_daemon`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonOptions {
    pub name: String,
    /// The most processes the group runs (`processes=N`, or MAX of `MIN-MAX`).
    pub processes: u32,
    /// The fewest: the pool grows from here while all threads are busy and
    /// shrinks back after `idle_timeout`; equal to `processes` for a fixed pool.
    pub min_processes: u32,
    /// Seconds a process of a growing pool may sit idle before it is stopped.
    pub idle_timeout: u64,
    pub threads: u32,
    pub python_home: Option<PathBuf>,
    pub python_path: Vec<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub max_requests: u64,
    pub request_timeout: u64,
    /// Seconds after which a request still running has its Python stack logged,
    /// once, and goes on (PHP-FPM's slowlog); 0 is off.
    pub slow_request: u64,
    /// MiB of resident memory past which a daemon process finishes its
    /// requests and is replaced (uWSGI's `reload-on-rss`); 0 is off.
    pub max_memory: u64,
    /// Import the applications when a process starts, not at their first request.
    pub preload: bool,
    /// Recycle the processes gracefully when the application's file or a
    /// module it imported from its directory or `python_path` changes.
    pub reload_on_change: bool,
    pub graceful_timeout: u64,
    pub socket_timeout: u64,
    /// Seconds a request may wait for a free daemon thread before it gets a 503;
    /// 0 waits as long as `socket_timeout`.
    pub queue_timeout: u64,
    /// Connections the group's socket holds before new ones are refused (503).
    pub listen_backlog: u32,
    /// Whether its processes count requests for the status page: the server's
    /// `GatewayStatusCounters` / `gateway_status_counters`, not a group option.
    pub status_counters: bool,
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
    "slow-request",
    "max-memory",
    "idle-timeout",
    "preload",
    "reload-on-change",
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
            min_processes: 1,
            idle_timeout: 10,
            threads: 15,
            python_home: None,
            python_path: Vec::new(),
            user: None,
            group: None,
            max_requests: 0,
            request_timeout: 0,
            slow_request: 0,
            max_memory: 0,
            preload: false,
            reload_on_change: false,
            graceful_timeout: 15,
            socket_timeout: 75,
            queue_timeout: 0,
            listen_backlog: 256,
            status_counters: true,
            display_name: None,
        };
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for option in options {
            let Some((key, value)) = option.split_once('=') else {
                return err(format!("daemon option '{option}' must be key=value"));
            };
            // A second value would silently win: say which two disagree.
            if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
                return err(format!(
                    "daemon option '{key}' is given twice ('{first}' and '{option}'): give it once"
                ));
            }
            seen.push((key, option));
            let seconds = |min: u64| {
                seconds(value, min).map_err(|e| ConfigError(format!("daemon option '{key}' {e}")))
            };
            let number = |min: u64| -> Result<u64, ConfigError> {
                match value.parse::<u64>() {
                    Ok(n) if n >= min => Ok(n),
                    _ => err(format!("daemon option '{key}' needs a whole number of at least {min}, got '{value}'")),
                }
            };
            match key {
                "processes" => (d.min_processes, d.processes) = process_range(value)?,
                "idle-timeout" => d.idle_timeout = seconds(1)?,
                "threads" => d.threads = number(1)?.min(u32::MAX as u64) as u32,
                "python-home" => d.python_home = Some(PathBuf::from(value)),
                "python-path" => d.python_path = split_path_list(value),
                "user" => d.user = Some(value.to_string()),
                "group" => d.group = Some(value.to_string()),
                "max-requests" => d.max_requests = number(0)?,
                "request-timeout" => d.request_timeout = seconds(0)?,
                "slow-request" => d.slow_request = seconds(0)?,
                "max-memory" => d.max_memory = number(0)?,
                "graceful-timeout" => d.graceful_timeout = seconds(0)?,
                "socket-timeout" => d.socket_timeout = seconds(1)?,
                "queue-timeout" => d.queue_timeout = seconds(0)?,
                "listen-backlog" => d.listen_backlog = number(1)?.min(65535) as u32,
                "display-name" => d.display_name = Some(value.to_string()),
                "preload" => d.preload = on_off(key, value)?,
                "reload-on-change" => d.reload_on_change = on_off(key, value)?,
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

/// Parses the value of a time option or directive: a whole number of seconds,
/// bare or with one of nginx's units `s`, `m`, `h`, or `ms` when it makes whole
/// seconds. The message says what is wrong with the value; the caller names it.
pub fn seconds(value: &str, min: u64) -> Result<u64, ConfigError> {
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits);
    let scale = match unit {
        "" | "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        "ms" => None,
        _ => {
            return err(format!(
                "needs a time such as 30, 30s, 5m or 1h, got '{value}' (known units: s, m, h, ms)"
            ))
        }
    };
    let Ok(n) = number.parse::<u64>() else {
        return err(format!(
            "needs a time such as 30, 30s, 5m or 1h, got '{value}'"
        ));
    };
    let secs = match scale {
        Some(scale) => n.checked_mul(scale),
        None if n % 1000 == 0 => Some(n / 1000),
        None => {
            return err(format!(
                "counts whole seconds: '{value}' is not a whole number of seconds"
            ))
        }
    };
    match secs {
        Some(s) if s >= min => Ok(s),
        Some(_) => err(format!("needs a time of at least {min}s, got '{value}'")),
        None => err(format!("needs a shorter time than '{value}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_a_number_or_a_range() {
        let d = DaemonOptions::parse(&["g", "processes=3"]).unwrap();
        assert_eq!((d.min_processes, d.processes), (3, 3));
        let d = DaemonOptions::parse(&["g", "processes=2-6", "idle-timeout=30"]).unwrap();
        assert_eq!((d.min_processes, d.processes, d.idle_timeout), (2, 6, 30));
        let d = DaemonOptions::parse(&["g"]).unwrap();
        assert_eq!((d.min_processes, d.processes, d.idle_timeout), (1, 1, 10));
        for bad in [
            "processes=0",
            "processes=4-2",
            "processes=0-2",
            "processes=1-",
            "processes=x",
        ] {
            let e = DaemonOptions::parse(&["g", bad]).unwrap_err();
            assert!(e.0.contains("MIN-MAX"), "{bad}: {e}");
        }
    }

    #[test]
    fn interface_option_after_the_application() {
        let file = std::env::current_exe().unwrap();
        let spec = file.to_str().unwrap();
        let base = Path::new("");
        let app = AppSpec::parse_with(spec, base, &[]).unwrap();
        assert_eq!(app.interface, Interface::Detect);
        let app = AppSpec::parse_with(spec, base, &["interface=asgi"]).unwrap();
        assert_eq!(app.interface, Interface::Asgi);
        let app = AppSpec::parse_with(spec, base, &["interface=wsgi"]).unwrap();
        assert_eq!(app.interface, Interface::Wsgi);
        let e = AppSpec::parse_with(spec, base, &["interface=rsgi"]).unwrap_err();
        assert!(e.0.contains("interface=rsgi is not a protocol"), "{e}");
        let e = AppSpec::parse_with(spec, base, &["threads=4"]).unwrap_err();
        assert!(e.0.contains("unknown option 'threads=4'"), "{e}");
        for i in [Interface::Detect, Interface::Wsgi, Interface::Asgi] {
            assert_eq!(Interface::from_code(i.code()), Some(i));
        }
        assert_eq!(Interface::from_code(9), None);
    }

    #[test]
    fn app_spec_takes_relative_files_from_the_base() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR"));
        let spec = AppSpec::parse_in("Cargo.toml:app", base).unwrap();
        assert_eq!(
            (spec.file, spec.callable.as_str()),
            (base.join("Cargo.toml"), "app")
        );
        let spec = AppSpec::parse_in("/etc/hostname", base).unwrap();
        assert_eq!(spec.file, PathBuf::from("/etc/hostname"));
        assert!(AppSpec::parse_in("Cargo.toml:1app", base).is_err());
    }

    #[test]
    fn groups_are_defined_once_and_references_checked() {
        let options = |name: &str| DaemonOptions::parse(&[name]).unwrap();
        let mut groups = Groups::default();
        groups.define(options("a"), "x.conf:1".into()).unwrap();
        let again = groups.define(options("a"), "x.conf:9".into()).unwrap_err();
        assert_eq!(
            again.0,
            "daemon process group 'a' is already defined at x.conf:1"
        );
        groups.refer("a", "x.conf:2".into());
        groups.refer("b", "x.conf:3".into());
        assert_eq!(groups.undefined().collect::<Vec<_>>(), [("b", "x.conf:3")]);
        assert_eq!(groups.options().len(), 1);
    }

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

    #[test]
    fn daemon_options_given_twice_are_an_error() {
        let e =
            DaemonOptions::parse(&["g", "processes=3", "threads=2", "processes=2"]).unwrap_err();
        assert_eq!(
            e.0,
            "daemon option 'processes' is given twice ('processes=3' and 'processes=2'): give it once"
        );
        let e = DaemonOptions::parse(&["g", "python-home=/a", "python-home=/a"]).unwrap_err();
        assert!(e.0.contains("'python-home' is given twice"), "{e}");
    }

    #[test]
    fn time_options_take_nginx_units() {
        let d = DaemonOptions::parse(&[
            "g",
            "request-timeout=5s",
            "graceful-timeout=2m",
            "socket-timeout=1h",
            "queue-timeout=3000ms",
        ])
        .unwrap();
        assert_eq!(
            (
                d.request_timeout,
                d.graceful_timeout,
                d.socket_timeout,
                d.queue_timeout
            ),
            (5, 120, 3600, 3)
        );
        assert_eq!(
            DaemonOptions::parse(&["g", "request-timeout=7"])
                .unwrap()
                .request_timeout,
            7
        );
        assert_eq!(
            DaemonOptions::parse(&["g", "slow-request=2m"])
                .unwrap()
                .slow_request,
            120
        );
    }

    #[test]
    fn time_options_reject_other_units_clearly() {
        let e = DaemonOptions::parse(&["g", "request-timeout=5d"]).unwrap_err();
        assert_eq!(
            e.0,
            "daemon option 'request-timeout' needs a time such as 30, 30s, 5m or 1h, got '5d' (known units: s, m, h, ms)"
        );
        let e = DaemonOptions::parse(&["g", "queue-timeout=1500ms"]).unwrap_err();
        assert!(
            e.0.contains("'1500ms' is not a whole number of seconds"),
            "{e}"
        );
        let e = DaemonOptions::parse(&["g", "socket-timeout=0s"]).unwrap_err();
        assert!(e.0.contains("at least 1s"), "{e}");
        for bad in ["s", "-5s", "5 s", "5S", "1.5h", "m5"] {
            let option = format!("graceful-timeout={bad}");
            assert!(DaemonOptions::parse(&["g", &option]).is_err(), "{bad}");
        }
        let e = DaemonOptions::parse(&["g", "request-timeout=99999999999999999h"]).unwrap_err();
        assert!(e.0.contains("needs a shorter time than"), "{e}");
    }
}
