//! The run directory as the supervisor holds it: a directory descriptor opened
//! once, without following symbolic links, through which the supervisor (root)
//! writes exit records and names sockets. The directory belongs to root and to
//! the server's worker group, mode 0710: the workers can reach the sockets and
//! read exit records by name, but cannot list, create or replace entries, so
//! nothing root writes there can be redirected by them.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The mode of the run directory when the supervisor runs as root.
pub const MODE: u32 = 0o710;

/// An open run directory.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// What [`RunDir::entry`] tells about one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Device and inode: which file the name refers to.
    pub id: (u64, u64),
    pub modified: SystemTime,
}

fn c_name(name: &str) -> io::Result<CString> {
    if name.contains('/') {
        return Err(io::Error::other(format!(
            "'{name}' is not a plain file name"
        )));
    }
    CString::new(name).map_err(io::Error::other)
}

/// The result of a libc call that returns -1 on failure.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl RunDir {
    /// Creates `path` or takes it over: afterwards it belongs to this process's
    /// user and, for root, to group `worker_gid` with mode [`MODE`] (0700
    /// otherwise: the workers then run as this same user). A symbolic link or
    /// another file at `path` is refused rather than followed.
    pub fn prepare(path: &Path, worker_gid: u32) -> io::Result<RunDir> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        match fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::other(format!(
                    "cannot create {}: {e}",
                    path.display()
                )))
            }
        }
        let fd = open_dir(path)?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let owner = fstat(&fd)?.st_uid;
        if euid == 0 {
            if owner != 0 {
                log::warn!(
                    "the run directory {} belonged to uid {owner}; it now belongs to root",
                    path.display()
                );
            }
            // SAFETY: changes the owner and mode of the directory we hold open.
            check(unsafe { libc::fchown(fd.as_raw_fd(), 0, worker_gid) })?;
            // SAFETY: as above.
            check(unsafe { libc::fchmod(fd.as_raw_fd(), MODE) })?;
        } else if owner != euid {
            return Err(io::Error::other(format!(
                "the run directory {} belongs to uid {owner}, not to the server's user (uid {euid}): remove it",
                path.display()
            )));
        } else {
            // SAFETY: changes the mode of the directory we hold open.
            check(unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) })?;
        }
        Ok(RunDir {
            path: path.to_path_buf(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` into the file `name` (mode 0644) as a new file: an entry
    /// already there (a reused pid's record) is removed, never opened.
    pub fn write_new(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let c = c_name(name)?;
        self.remove(name)?;
        // SAFETY: opens a new entry of the directory we hold; O_EXCL and
        // O_NOFOLLOW refuse anything that is already there.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644 as libc::c_uint,
            )
        };
        check(fd)?;
        // SAFETY: fd was just opened and is owned by nobody else.
        let file = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // The umask inherited from the server may have narrowed the mode.
        // SAFETY: changes the mode of the file we hold open.
        check(unsafe { libc::fchmod(file.as_raw_fd(), 0o644) })?;
        (&file).write_all(data)
    }

    /// Makes the file `name` anew for reading and writing, mode 0640 and, for
    /// root, group `reader_gid` (the server's workers read it; only
    /// descriptors handed out write it). It is made under a temporary name and
    /// renamed into place: a previous generation keeps its own file.
    pub fn create_shared(&self, name: &str, reader_gid: u32) -> io::Result<OwnedFd> {
        let tmp = format!(".{name}.{}", std::process::id());
        let c = c_name(&tmp)?;
        self.remove(&tmp)?;
        // SAFETY: opens a new entry of the directory we hold; O_EXCL and
        // O_NOFOLLOW refuse anything that is already there.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        check(fd)?;
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // SAFETY: changes the owner and mode of the file we hold open.
            check(unsafe { libc::fchown(fd.as_raw_fd(), 0, reader_gid) })?;
            // SAFETY: as above.
            check(unsafe { libc::fchmod(fd.as_raw_fd(), 0o640) })?;
        }
        self.rename(&tmp, name)?;
        Ok(fd)
    }

    /// Removes the entry `name` (not what a link points to); a missing one is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let c = c_name(name)?;
        // SAFETY: removes an entry of the directory we hold.
        match check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Which file `name` is, without following a symbolic link.
    pub fn entry(&self, name: &str) -> io::Result<Entry> {
        let c = c_name(name)?;
        // SAFETY: stat is plain data; all zeroes is a valid value that fstatat overwrites.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: stats an entry of the directory we hold into st.
        check(unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(st.st_mtime.max(0) as u64);
        Ok(Entry {
            id: (st.st_dev, st.st_ino),
            modified,
        })
    }

    /// Gives the entry `name` (not what a link points to) to `uid`/`gid`.
    pub fn set_owner(&self, name: &str, uid: u32, gid: u32) -> io::Result<()> {
        let c = c_name(name)?;
        // SAFETY: changes the owner of an entry of the directory we hold.
        check(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    /// Renames `from` to `to` within the directory, replacing `to`.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (c_name(from)?, c_name(to)?);
        let dir = self.fd.as_raw_fd();
        // SAFETY: renames between entries of the directory we hold.
        check(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) })
    }

    /// Whether the directory was removed since it was opened.
    pub fn is_removed(&self) -> bool {
        fstat(&self.fd).is_ok_and(|st| st.st_nlink == 0)
    }

    /// The names of the entries that start with `prefix`.
    pub fn names_starting(&self, prefix: &str) -> Vec<String> {
        // Only names come from the path; every change goes through the descriptor.
        let Ok(entries) = fs::read_dir(&self.path) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: opens a directory by a NUL-terminated path, refusing a symbolic link.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => io::Error::other(format!(
                "the run directory {} is a symbolic link or not a directory: remove it",
                path.display()
            )),
            _ => io::Error::other(format!("cannot open {}: {e}", path.display())),
        });
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; all zeroes is a valid value that fstat overwrites.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: stats a descriptor we hold into st.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gateway-rundir-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_symbolic_link_is_refused_not_followed() {
        let base = scratch("link");
        let target = base.join("elsewhere");
        fs::create_dir(&target).unwrap();
        let before = fs::metadata(&target).unwrap();
        std::os::unix::fs::symlink(&target, base.join("run")).unwrap();
        let err = RunDir::prepare(&base.join("run"), 0).unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        let after = fs::metadata(&target).unwrap();
        assert_eq!((after.mode(), after.uid()), (before.mode(), before.uid()));
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn records_replace_planted_links_without_following_them() {
        let base = scratch("records");
        let victim = base.join("victim");
        fs::write(&victim, "keep").unwrap();
        let dir = RunDir::prepare(&base.join("run"), 0).unwrap();
        std::os::unix::fs::symlink(&victim, base.join("run/exit-1")).unwrap();
        dir.write_new("exit-1", b"was killed").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(
            fs::read_to_string(base.join("run/exit-1")).unwrap(),
            "was killed"
        );
        let meta = fs::symlink_metadata(base.join("run/exit-1")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(dir.names_starting("exit-"), vec!["exit-1".to_string()]);
        dir.remove("exit-1").unwrap();
        assert!(dir.entry("exit-1").is_err());
        assert!(dir.write_new("../x", b"").is_err());
        assert!(!dir.is_removed());
        fs::remove_dir_all(base).unwrap();
        assert!(dir.is_removed());
    }

    #[test]
    fn a_directory_of_another_user_is_taken_over_by_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let base = scratch("owner");
        let run = base.join("run");
        fs::create_dir(&run).unwrap();
        std::os::unix::fs::chown(&run, Some(33), Some(33)).unwrap();
        fs::set_permissions(&run, fs::Permissions::from_mode(0o777)).unwrap();
        RunDir::prepare(&run, 33).unwrap();
        let meta = fs::metadata(&run).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (0, 33, MODE));
        fs::remove_dir_all(base).unwrap();
    }
}
