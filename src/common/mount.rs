//! Where an application is mounted in the URL space, and how a request's path
//! splits into SCRIPT_NAME and PATH_INFO there.

/// A mount point: a URL path prefix without its trailing slash (empty for `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(Vec<u8>);

impl Prefix {
    /// The mount point of `path` (`/app/` and `/app` are the same point).
    pub fn new(path: &[u8]) -> Prefix {
        let mut p = path.to_vec();
        while p.last() == Some(&b'/') {
            p.pop();
        }
        Prefix(p)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// SCRIPT_NAME and PATH_INFO for a request's decoded path, if the path is at
    /// or below this mount point. Only whole segments match: `/app` does not
    /// serve `/apple`, so PATH_INFO is always empty or starts with `/`.
    pub fn split<'a>(&'a self, path: &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
        let p = self.0.as_slice();
        let rest = path.strip_prefix(p)?;
        (rest.is_empty() || rest[0] == b'/').then_some((p, rest))
    }

    /// As [`Prefix::split`], but a path outside the mount point (a regex
    /// location of nginx may serve any path) gets an empty SCRIPT_NAME.
    pub fn split_or_root<'a>(&'a self, path: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        self.split(path).unwrap_or((b"", path))
    }
}

#[cfg(test)]
mod tests {
    use super::Prefix;

    #[test]
    fn splits_at_segment_boundaries_only() {
        let app = Prefix::new(b"/app/");
        assert_eq!(app.as_bytes(), b"/app");
        assert_eq!(app.split(b"/app"), Some((&b"/app"[..], &b""[..])));
        assert_eq!(app.split(b"/app/x/y"), Some((&b"/app"[..], &b"/x/y"[..])));
        assert_eq!(app.split(b"/apple"), None);
        assert_eq!(app.split(b"/ap"), None);
        assert_eq!(app.split_or_root(b"/apple"), (&b""[..], &b"/apple"[..]));
    }

    #[test]
    fn the_root_mount_serves_every_path() {
        let root = Prefix::new(b"/");
        assert_eq!(root.as_bytes(), b"");
        assert_eq!(root.split(b"/"), Some((&b""[..], &b"/"[..])));
        assert_eq!(root.split(b"/a/b"), Some((&b""[..], &b"/a/b"[..])));
    }
}
