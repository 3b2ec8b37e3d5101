//! Who a user id is, from the password database: for messages that name the
//! user and for the environment of a process that runs as it.

/// A user's name and home directory, as the password database has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: Vec<u8>,
    pub home: Vec<u8>,
}

/// The password database entry of `uid`, if there is one.
pub fn account(uid: u32) -> Option<Account> {
    // SAFETY: passwd is plain data; all zeroes is a valid value that getpwuid_r overwrites.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r fills pw from buf, both owned here; on success its strings point
    // into buf, which outlives their copies below.
    unsafe {
        libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result);
        if result.is_null() || pw.pw_name.is_null() || pw.pw_dir.is_null() {
            return None;
        }
        Some(Account {
            name: std::ffi::CStr::from_ptr(pw.pw_name).to_bytes().to_vec(),
            home: std::ffi::CStr::from_ptr(pw.pw_dir).to_bytes().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_is_root() {
        let root = super::account(0).expect("uid 0 has an entry");
        assert_eq!(root.name, b"root");
    }
}
