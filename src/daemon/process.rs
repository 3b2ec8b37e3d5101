//! Process plumbing for the supervisor and daemon processes: logging to the
//! server's error log through stderr, privileges, the process title, signals.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

use crate::common::account::Account;

/// Installs a `log` sink that writes each line to stderr, which the server has
/// pointed at its error log, in the server's own format.
pub fn log_to_stderr() {
    crate::common::log::install_stderr();
}

/// The conventional name of a signal.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// How a process ended, from its wait status, in words.
pub fn describe_status(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let core = if libc::WCOREDUMP(status) {
            ", core dumped"
        } else {
            ""
        };
        format!("was killed by signal {sig} ({}{core})", signal_name(sig))
    } else {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    }
}

/// Whether `how` (the words of [`describe_status`], as the supervisor records a
/// daemon's end) tells of a clean exit: a daemon that drained.
pub fn is_clean_exit(how: &str) -> bool {
    how == describe_status(0)
}

/// The user and group a daemon process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// The user's name, for its supplementary groups.
    pub name: Option<CString>,
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// Looks up a user by name or number.
pub fn lookup_user(user: &str) -> Result<Identity, String> {
    let name = CString::new(user).map_err(|_| format!("user name '{user}' contains NUL"))?;
    // SAFETY: passwd is plain data; all zeroes is a valid value that getpwnam_r overwrites.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r fills pw from buf, both owned here and large enough for /etc/passwd entries.
    unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if !result.is_null() {
        return Ok(Identity {
            uid: pw.pw_uid,
            gid: pw.pw_gid,
            name: Some(name),
        });
    }
    match user.parse::<u32>() {
        Ok(uid) => Ok(Identity {
            uid,
            gid: uid,
            name: None,
        }),
        Err(_) => Err(format!("user '{user}' does not exist")),
    }
}

/// Looks up a group by name or number.
pub fn lookup_group(group: &str) -> Result<u32, String> {
    let name = CString::new(group).map_err(|_| format!("group name '{group}' contains NUL"))?;
    // SAFETY: group is plain data; all zeroes is a valid value that getgrnam_r overwrites.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r fills gr from buf, both owned here.
    unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if !result.is_null() {
        return Ok(gr.gr_gid);
    }
    group
        .parse::<u32>()
        .map_err(|_| format!("group '{group}' does not exist"))
}

/// Who a daemon group runs as: its `user`/`group` options, else the server's
/// worker user. Root only when `user=root` says so explicitly.
pub fn daemon_identity(
    user: Option<&str>,
    group: Option<&str>,
    server_uid: u32,
    server_gid: u32,
) -> Result<Identity, String> {
    let mut id = match user {
        Some(u) => lookup_user(u)?,
        None => Identity {
            uid: server_uid,
            gid: server_gid,
            name: None,
        },
    };
    if let Some(g) = group {
        id.gid = lookup_group(g)?;
    }
    if id.uid == 0 && user != Some("root") {
        return Err(
            "refusing to run a daemon process as root: set user=NAME (or user=root to insist)"
                .into(),
        );
    }
    Ok(id)
}

/// The search path of a daemon process whose server passed none (nginx keeps only
/// `TZ` unless told otherwise): an unprivileged user's usual one.
const DEFAULT_PATH: &[u8] = b"/usr/local/bin:/usr/bin:/bin";

/// The variables identifying a daemon's user, always set from its account.
const IDENTITY_VARS: [&[u8]; 4] = [b"HOME", b"USER", b"USERNAME", b"LOGNAME"];

/// Whether Apache's process environment passes `name` on to daemon processes: the
/// locale, the time zone, the search path and Apache's own settings (`APACHE_*`,
/// from envvars or systemd). The rest belongs to whoever started Apache: a root
/// shell's `HOME`, `OLDPWD`, `SUDO_*`, tokens.
fn apache_passes(name: &[u8]) -> bool {
    matches!(name, b"PATH" | b"TZ" | b"LANG" | b"LANGUAGE")
        || name.starts_with(b"LC_")
        || name.starts_with(b"APACHE_")
}

/// Whether `name` is the variable that names a test fault: a fault-injection
/// build passes it on, so that its daemons fail where the tests ask.
#[cfg(feature = "fault-injection")]
fn is_fault_var(name: &[u8]) -> bool {
    name == crate::common::panic::FAULT_VAR.as_bytes()
}

/// Whether `name` is the variable of test faults: never passed on without them.
#[cfg(not(feature = "fault-injection"))]
fn is_fault_var(_name: &[u8]) -> bool {
    false
}

/// The environment of a daemon process that runs as the user of `account`:
/// what the server passes on purpose from `inherited` (under nginx the
/// supervisor already has only what nginx's `env` directives keep; under Apache
/// [`apache_passes`] chooses; a fault-injection build adds the test fault), a
/// default `PATH` if there is none, and `HOME`, `USER`, `USERNAME` and
/// `LOGNAME` of the user, as mod_wsgi sets them (none of them for a user
/// without an account).
pub fn daemon_environment(
    server: &str,
    inherited: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    account: Option<&Account>,
) -> Vec<CString> {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = inherited
        .into_iter()
        .map(|(k, v)| (k.into_encoded_bytes(), v.into_encoded_bytes()))
        .filter(|(k, _)| !IDENTITY_VARS.contains(&k.as_slice()))
        .filter(|(k, _)| server != "apache" || apache_passes(k) || is_fault_var(k))
        .collect();
    if !env.iter().any(|(k, _)| k == b"PATH") {
        env.push((b"PATH".to_vec(), DEFAULT_PATH.to_vec()));
    }
    if let Some(a) = account {
        env.push((b"HOME".to_vec(), a.home.clone()));
        for var in &IDENTITY_VARS[1..] {
            env.push((var.to_vec(), a.name.clone()));
        }
    }
    env.into_iter()
        .filter_map(|(mut k, v)| {
            k.push(b'=');
            k.extend_from_slice(&v);
            CString::new(k).ok()
        })
        .collect()
}

/// Switches this process to `id` for good. Must run before any thread starts.
pub fn drop_privileges(id: &Identity) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // SAFETY: as above.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        if uid == id.uid && gid == id.gid {
            return Ok(());
        }
        return Err(format!(
            "cannot switch to uid {} / gid {}: the server does not run as root",
            id.uid, id.gid
        ));
    }
    // SAFETY: plain system calls on this single-threaded process.
    unsafe {
        let groups = match &id.name {
            Some(name) => libc::initgroups(name.as_ptr(), id.gid),
            None => libc::setgroups(1, &id.gid),
        };
        if groups != 0 {
            return Err(last_error("setting the supplementary groups failed"));
        }
        if libc::setgid(id.gid) != 0 {
            return Err(last_error(&format!("setgid({}) failed", id.gid)));
        }
        if libc::setuid(id.uid) != 0 {
            return Err(last_error(&format!("setuid({}) failed", id.uid)));
        }
        if id.uid != 0 && libc::setuid(0) == 0 {
            return Err("privileges could be regained after setuid: refusing to continue".into());
        }
    }
    Ok(())
}

/// Asks the kernel to send `sig` to this process when its parent dies, and
/// exits at once if that already happened (the parent is then not `parent`).
pub fn die_with_parent(sig: i32, parent: u32) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid have no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong);
        if libc::getppid() as u32 != parent {
            libc::_exit(0);
        }
    }
}

/// The memory holding this process's argv strings, which `ps` shows.
#[derive(Debug, Clone, Copy)]
pub struct ArgvArea {
    pub start: *mut u8,
    pub len: usize,
}

/// Sets the process title: the thread name (`top`, `ps -o comm`) and the
/// command line (`ps`), by overwriting the argv strings.
pub fn set_title(area: Option<ArgvArea>, title: &str) {
    if let Ok(name) = CString::new(
        title
            .as_bytes()
            .iter()
            .copied()
            .take(15)
            .collect::<Vec<u8>>(),
    ) {
        // SAFETY: PR_SET_NAME copies at most 16 bytes from a NUL-terminated string.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
    }
    let Some(area) = area.filter(|a| a.len > 1 && !a.start.is_null()) else {
        return;
    };
    let n = title.len().min(area.len - 1);
    // SAFETY: the area is this process's own argv strings (contiguous, len bytes), which
    // nothing reads any more once the program has parsed its arguments.
    unsafe {
        std::ptr::write_bytes(area.start, 0, area.len);
        std::ptr::copy_nonoverlapping(title.as_ptr(), area.start, n);
    }
}

/// Closes every file descriptor from `first` up (in a child about to exec).
pub fn close_from(first: RawFd) {
    // SAFETY: close_range only closes descriptors; the caller owns all of them.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
}

/// Makes `fd` become descriptor `target` in this process, inherited across exec.
///
/// # Safety
/// Only in a child between fork and exec, with `fd` open.
pub unsafe fn move_fd(fd: RawFd, target: RawFd) {
    // SAFETY: fcntl/dup2 on descriptors the caller owns, per the contract above.
    unsafe {
        if fd == target {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
        } else {
            libc::dup2(fd, target);
        }
    }
}

/// Unblocks every signal and restores default dispositions (in a child about to exec:
/// the server's signal mask would otherwise be inherited).
///
/// # Safety
/// Only in a child between fork and exec.
pub unsafe fn reset_signals() {
    // SAFETY: async-signal-safe calls on a signal set we own, per the contract above.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGCHLD,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGQUIT,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Blocks `signals` in this thread (and the threads it starts) and returns a
/// signalfd that reports them.
pub fn signal_fd(signals: &[i32]) -> io::Result<RawFd> {
    // SAFETY: builds a signal set we own and hands it to the kernel.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reads the pending signals of a signalfd.
pub fn read_signals(fd: RawFd) -> Vec<i32> {
    let mut out = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain data; all zeroes is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads one siginfo into a buffer of its size.
        let n = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        if n as usize != size {
            return out;
        }
        out.push(info.ssi_signo as i32);
    }
}

/// This process's resident memory in MiB, from `/proc/self/statm`.
pub fn resident_mib() -> Option<u64> {
    resident_bytes().map(|b| b / (1024 * 1024))
}

/// This process's resident memory in bytes, from `/proc/self/statm`.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(pages * page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_like_sentences() {
        assert_eq!(describe_status(9), "was killed by signal 9 (SIGKILL)");
        assert_eq!(describe_status(3 << 8), "exited with status 3");
        assert!(is_clean_exit("exited with status 0"));
        assert!(!is_clean_exit(&describe_status(9)));
    }

    fn environment(
        server: &str,
        inherited: &[(&str, &str)],
        account: Option<&Account>,
    ) -> Vec<String> {
        let inherited = inherited.iter().map(|(k, v)| (k.into(), v.into()));
        daemon_environment(server, inherited, account)
            .into_iter()
            .map(|v| v.into_string().unwrap())
            .collect()
    }

    #[test]
    fn daemons_get_their_users_identity_and_not_the_shells() {
        let www = Account {
            name: b"www-data".to_vec(),
            home: b"/var/www".to_vec(),
        };
        let shell = [
            ("HOME", "/root"),
            ("USER", "root"),
            ("OLDPWD", "/x"),
            ("SECRET_TOKEN", "y"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C"),
            ("TZ", "UTC"),
            ("APACHE_RUN_USER", "www-data"),
            ("PATH", "/sbin:/bin"),
        ];
        assert_eq!(
            environment("apache", &shell, Some(&www)),
            [
                "LANG=C.UTF-8",
                "LC_ALL=C",
                "TZ=UTC",
                "APACHE_RUN_USER=www-data",
                "PATH=/sbin:/bin",
                "HOME=/var/www",
                "USER=www-data",
                "USERNAME=www-data",
                "LOGNAME=www-data",
            ]
        );
        // nginx's own `env` directives chose the supervisor's variables already.
        let kept = environment(
            "nginx",
            &[("TZ", "UTC"), ("KEPT", "1"), ("HOME", "/root")],
            None,
        );
        assert_eq!(
            kept,
            ["TZ=UTC", "KEPT=1", "PATH=/usr/local/bin:/usr/bin:/bin"]
        );
    }

    #[test]
    fn the_fault_variable_passes_only_in_fault_injection_builds() {
        let env = environment("apache", &[("GATEWAY_FAULT", "daemon-job")], None);
        let passed = env.contains(&"GATEWAY_FAULT=daemon-job".to_string());
        assert_eq!(passed, cfg!(feature = "fault-injection"));
    }

    #[test]
    fn root_needs_to_be_asked_for() {
        assert!(daemon_identity(None, None, 0, 0).is_err());
        assert!(daemon_identity(Some("root"), None, 33, 33).is_ok());
        assert!(daemon_identity(Some("no-such-user-here"), None, 33, 33)
            .unwrap_err()
            .contains("does not exist"));
        assert_eq!(daemon_identity(None, None, 33, 33).unwrap().uid, 33);
    }
}
