//! The CGI view of a request (PEP 3333's environ variables), independent of the
//! server it came from.

use std::borrow::Cow;

/// What a server knows about a request, borrowed from its own request record.
/// All values are raw bytes; the WSGI layer decodes them as latin-1.
#[derive(Debug, Default)]
pub struct RequestHead<'a> {
    pub method: &'a [u8],
    /// The mount point, already decoded; empty for an application at the root.
    pub script_name: &'a [u8],
    /// The rest of the decoded path, empty or starting with `/`.
    pub path_info: &'a [u8],
    pub query_string: &'a [u8],
    /// The request target exactly as the client sent it.
    pub request_uri: &'a [u8],
    pub protocol: &'a [u8],
    pub server_name: &'a [u8],
    pub server_port: u16,
    pub server_addr: &'a [u8],
    pub remote_addr: &'a [u8],
    pub remote_port: u16,
    pub https: bool,
    /// Set by the server's authentication, if any.
    pub remote_user: Option<&'a [u8]>,
    pub auth_type: Option<&'a [u8]>,
    /// Request headers in arrival order, repeated names included.
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    /// Server-defined variables (Apache's `SetEnv`, mod_ssl's variables, ...).
    pub server_vars: Vec<(&'a [u8], &'a [u8])>,
}

/// The environ key for a request header, or None when the header must not reach
/// the application: names with `_` (they could pose as `Remote-User` and other
/// variables set by the server), `Proxy` (httpoxy), and `Transfer-Encoding`.
///
/// The servers de-chunk the body before `wsgi.input` (which says so with
/// `wsgi.input_terminated`): the hop-by-hop `Transfer-Encoding` no longer
/// describes it, and applications that see `chunked` there (dulwich) would
/// de-chunk it a second time.
pub fn header_key(name: &[u8]) -> Option<Cow<'static, str>> {
    if name.contains(&b'_') || name.is_empty() || name.eq_ignore_ascii_case(b"transfer-encoding") {
        return None;
    }
    if name.eq_ignore_ascii_case(b"content-type") {
        return Some(Cow::Borrowed("CONTENT_TYPE"));
    }
    if name.eq_ignore_ascii_case(b"content-length") {
        return Some(Cow::Borrowed("CONTENT_LENGTH"));
    }
    if name.eq_ignore_ascii_case(b"proxy") {
        return None;
    }
    if !name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-') {
        return None;
    }
    let mut key = String::with_capacity(5 + name.len());
    key.push_str("HTTP_");
    key.extend(name.iter().map(|&c| {
        if c == b'-' {
            '_'
        } else {
            c.to_ascii_uppercase() as char
        }
    }));
    Some(Cow::Owned(key))
}

/// How repeated headers are folded into one environ value.
pub fn header_separator(key: &str) -> &'static str {
    if key == "HTTP_COOKIE" {
        "; "
    } else {
        ", "
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_map_to_cgi_keys() {
        assert_eq!(
            header_key(b"User-Agent").as_deref(),
            Some("HTTP_USER_AGENT")
        );
        assert_eq!(header_key(b"content-type").as_deref(), Some("CONTENT_TYPE"));
        assert_eq!(
            header_key(b"Content-Length").as_deref(),
            Some("CONTENT_LENGTH")
        );
        assert_eq!(
            header_key(b"X-Forwarded-For").as_deref(),
            Some("HTTP_X_FORWARDED_FOR")
        );
    }

    #[test]
    fn spoofable_and_dangerous_headers_are_dropped() {
        assert_eq!(header_key(b"Remote_User"), None);
        assert_eq!(header_key(b"X_Forwarded_For"), None);
        assert_eq!(header_key(b"Proxy"), None);
        assert_eq!(header_key(b"bad header"), None);
        assert_eq!(header_key(b""), None);
    }

    #[test]
    fn the_body_is_not_described_as_still_chunked() {
        assert_eq!(header_key(b"Transfer-Encoding"), None);
        assert_eq!(header_key(b"transfer-encoding"), None);
        assert_eq!(header_key(b"TE").as_deref(), Some("HTTP_TE"));
    }

    #[test]
    fn cookies_fold_with_semicolons() {
        assert_eq!(header_separator("HTTP_COOKIE"), "; ");
        assert_eq!(header_separator("HTTP_ACCEPT"), ", ");
    }
}
