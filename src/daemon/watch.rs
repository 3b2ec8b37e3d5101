//! reload-on-change: files watched with inotify, through the directories that
//! hold them, so that an editor that replaces a file (a new file renamed over
//! the old one) is seen as well as one that writes it in place.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What makes a watched file count as changed.
const EVENTS: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_ATTRIB
    | libc::IN_MODIFY;

/// Watched files, by the directory watch that sees them.
pub struct Watch {
    fd: OwnedFd,
    dirs: HashMap<i32, (PathBuf, HashSet<OsString>)>,
    files: HashSet<PathBuf>,
}

impl Watch {
    pub fn new() -> io::Result<Watch> {
        // SAFETY: creates a descriptor owned by the returned value.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watch {
            // SAFETY: just created, owned from here on.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            dirs: HashMap::new(),
            files: HashSet::new(),
        })
    }

    /// The descriptor that becomes readable when something changed.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Watches `file` (once); Err when its directory cannot be watched.
    pub fn add(&mut self, file: &Path) -> io::Result<()> {
        if self.files.contains(file) {
            return Ok(());
        }
        let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
            return Ok(());
        };
        let c_dir = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated path; adding the same directory again returns its watch.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c_dir.as_ptr(), EVENTS) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs
            .entry(wd)
            .or_insert_with(|| (dir.to_path_buf(), HashSet::new()))
            .1
            .insert(name.to_os_string());
        self.files.insert(file.to_path_buf());
        Ok(())
    }

    /// How many files are watched.
    pub fn count(&self) -> usize {
        self.files.len()
    }

    /// Reads what happened, without waiting: the first watched file that changed.
    pub fn changed(&self) -> Option<PathBuf> {
        let mut buf = [0u8; 8192];
        let mut found = None;
        loop {
            // SAFETY: reads into a local buffer, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return found;
            }
            found = found.or_else(|| self.first_watched(&buf[..n as usize]));
        }
    }

    /// The first event in `events` about a watched file.
    fn first_watched(&self, mut events: &[u8]) -> Option<PathBuf> {
        const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
        while events.len() >= HEAD {
            // SAFETY: the kernel wrote whole events; read_unaligned copes with the buffer's alignment.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(events.as_ptr().cast()) };
            if event.mask & libc::IN_Q_OVERFLOW != 0 {
                // Events were lost: any watched file may have changed.
                return self.files.iter().next().cloned();
            }
            let end = (HEAD + event.len as usize).min(events.len());
            let name = &events[HEAD..end];
            let name = OsStr::from_bytes(name.split(|&b| b == 0).next().unwrap_or(b""));
            if let Some((dir, names)) = self.dirs.get(&event.wd) {
                if names.contains(name) {
                    return Some(dir.join(name));
                }
            }
            events = &events[end..];
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replacements_of_watched_files_are_seen() {
        let dir = std::env::temp_dir().join(format!("gateway-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (app, other) = (dir.join("app.py"), dir.join("other.py"));
        std::fs::write(&app, "a = 1\n").unwrap();
        std::fs::write(&other, "b = 1\n").unwrap();
        let mut watch = Watch::new().unwrap();
        watch.add(&app).unwrap();
        assert_eq!(watch.count(), 1);
        assert_eq!(watch.changed(), None);
        std::fs::write(&other, "b = 2\n").unwrap();
        assert_eq!(watch.changed(), None, "an unwatched neighbour");
        std::fs::write(&app, "a = 2\n").unwrap();
        assert_eq!(watch.changed(), Some(app.clone()));
        std::fs::write(dir.join("app.py.new"), "a = 3\n").unwrap();
        let _ = watch.changed();
        std::fs::rename(dir.join("app.py.new"), &app).unwrap();
        assert_eq!(watch.changed(), Some(app.clone()), "replaced by a rename");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
