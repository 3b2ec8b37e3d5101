//! What a response may say, and how much body it may carry: the checks every
//! response passes before it reaches a client, in embedded mode (the
//! application's `start_response`), in a daemon process, and again in the server
//! for what a daemon sends.
//!
//! The head must not be able to split the response (CR, LF or other control
//! bytes), nor be an interim (1xx) status that the client would take for a
//! final one. The body is framed by what the head declares: no more than its
//! Content-Length (the excess would be read as the next response on a
//! keep-alive connection), nothing at all for HEAD, 204 and 304.

use std::fmt;

/// A response header: a token name and a latin-1 value without control bytes.
pub type Header = (String, Vec<u8>);

/// The most bytes a response head may take (names, values and separators): far
/// beyond what any client accepts, and below the daemon protocol's frame limit.
pub const MAX_HEAD: usize = 256 * 1024;

/// Why a response head was refused, in words for the application's author.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Not `NNN` or `NNN reason`, or a reason with control bytes.
    Status(String),
    /// 1xx: an interim status, never the final one of a response.
    Informational(u16),
    /// A status code that its status line contradicts.
    Mismatch(u16, String),
    /// A header name that is not an HTTP token.
    Name(String),
    /// A header value with CR, LF, NUL or another control byte.
    Value(String),
    /// A Content-Length that is not a number, or two that differ.
    ContentLength(String),
    /// More than [`MAX_HEAD`] bytes.
    TooLarge(usize),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Status(s) => write!(f, "status must look like '200 OK', got {s:?}"),
            HeadError::Informational(code) => write!(
                f,
                "status {code} is an interim (1xx) status, which cannot end a response: \
                 the server sends 100 Continue itself, and 101 belongs to WebSocket upgrades"
            ),
            HeadError::Mismatch(code, line) => {
                write!(f, "status {code} with the status line {line:?}")
            }
            HeadError::Name(name) => write!(f, "invalid response header name {name:?}"),
            HeadError::Value(name) => write!(
                f,
                "response header {name} contains CR, LF, NUL or another control character, refused (header injection)"
            ),
            HeadError::ContentLength(v) => write!(f, "invalid Content-Length {v}"),
            HeadError::TooLarge(n) => write!(
                f,
                "the response head takes {n} bytes, more than the limit of {MAX_HEAD}"
            ),
        }
    }
}

impl std::error::Error for HeadError {}

/// Checks a status line such as `200 OK` and returns its code.
pub fn check_status(line: &str) -> Result<u16, HeadError> {
    let b = line.as_bytes();
    let valid = b.len() >= 3
        && b[..3].iter().all(u8::is_ascii_digit)
        && b[0] != b'0'
        && (b.len() == 3 || b[3] == b' ')
        && !b.iter().any(|&c| c < 0x20 || c == 0x7f);
    if !valid {
        return Err(HeadError::Status(line.to_string()));
    }
    let code: u16 = line[..3].parse().expect("three digits");
    if code < 200 {
        return Err(HeadError::Informational(code));
    }
    Ok(code)
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// Checks one header: a token name, and a value of visible characters, spaces
/// and tabs (obs-text bytes 0x80-0xff allowed).
pub fn check_header(name: &str, value: &[u8]) -> Result<(), HeadError> {
    if !is_token(name) {
        return Err(HeadError::Name(name.to_string()));
    }
    if value.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f) {
        return Err(HeadError::Value(name.to_string()));
    }
    Ok(())
}

/// The body length the headers declare: `None` without Content-Length. Repeats
/// must agree; the value is digits only (no sign, no list), and fits the
/// servers' signed file offsets (`off_t`), as nginx and httpd require of a
/// Content-Length they parse themselves.
pub fn declared_length(headers: &[Header]) -> Result<Option<u64>, HeadError> {
    let mut declared = None;
    for (name, value) in headers {
        if !name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let text = String::from_utf8_lossy(value);
        let digits = text.trim_matches([' ', '\t']);
        let n = (!digits.is_empty()
            && digits.len() <= 19
            && digits.bytes().all(|c| c.is_ascii_digit()))
        .then(|| digits.parse::<u64>().ok())
        .flatten()
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| HeadError::ContentLength(format!("{text:?}")))?;
        match declared {
            Some(prev) if prev != n => {
                return Err(HeadError::ContentLength(format!(
                    "{n}: another Content-Length says {prev}"
                )))
            }
            _ => declared = Some(n),
        }
    }
    Ok(declared)
}

/// Checks a whole response head and returns how its body is framed: `status`
/// is the code the server sends, which `status_line` must agree with (the body
/// rules follow the code). `head_request`: the request's method is HEAD.
pub fn check_head(
    status: u16,
    status_line: &str,
    headers: &[Header],
    head_request: bool,
) -> Result<BodyFraming, HeadError> {
    if check_status(status_line)? != status {
        return Err(HeadError::Mismatch(status, status_line.to_string()));
    }
    let mut size = status_line.len();
    for (name, value) in headers {
        check_header(name, value)?;
        size += name.len() + value.len() + 4;
    }
    if size > MAX_HEAD {
        return Err(HeadError::TooLarge(size));
    }
    let declared = declared_length(headers)?;
    Ok(BodyFraming::new(status, declared, head_request))
}

/// Whether a response with this status has no body, whatever its headers say.
pub fn status_has_no_body(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

/// A `Content-Type` value split as servers' type filters see it: the length
/// of the media type, and where the `charset` parameter's value is. As nginx's
/// upstream module does, the type is cut short only when a charset follows it,
/// and quotes around the charset are dropped.
pub fn content_type_parts(value: &[u8]) -> (usize, Option<std::ops::Range<usize>>) {
    let mut semicolons = value.iter().enumerate().filter(|(_, &b)| b == b';');
    for (at, _) in semicolons.by_ref() {
        let start = at + 1 + value[at + 1..].iter().take_while(|&&b| b == b' ').count();
        let param = &value[start..];
        if param.len() < 8 || !param[..8].eq_ignore_ascii_case(b"charset=") {
            continue;
        }
        let mut range = start + 8..value.len();
        if value.get(range.start) == Some(&b'"') {
            range.start += 1;
        }
        if range.end > range.start && value[range.end - 1] == b'"' {
            range.end -= 1;
        }
        return (at, Some(range));
    }
    (value.len(), None)
}

/// Counts a response's body against what its head declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyFraming {
    /// The declared Content-Length, if any.
    limit: Option<u64>,
    /// Body bytes let through so far.
    sent: u64,
    /// HEAD, 204 or 304: the body is dropped.
    no_body: bool,
    /// Bytes beyond the limit that were dropped.
    excess: u64,
}

impl BodyFraming {
    pub fn new(status: u16, declared: Option<u64>, head_request: bool) -> BodyFraming {
        BodyFraming {
            limit: declared,
            sent: 0,
            no_body: head_request || status_has_no_body(status),
            excess: 0,
        }
    }

    /// Declares the length of a body the caller has whole (when the head had none).
    pub fn declare(&mut self, len: u64) {
        self.limit.get_or_insert(len);
    }

    /// How many of the next `len` bytes may go to the client. The rest is
    /// dropped; [`BodyFraming::first_excess`] says when that starts.
    pub fn admit(&mut self, len: usize) -> usize {
        if self.no_body {
            return 0;
        }
        let room = self.limit.map_or(u64::MAX, |l| l - self.sent);
        let n = (len as u64).min(room);
        self.sent += n;
        self.excess += len as u64 - n;
        n as usize
    }

    /// The bytes beyond the declared length dropped by the last [`admit`]
    /// call, when they are the first ones (so that it is logged once).
    ///
    /// [`admit`]: BodyFraming::admit
    pub fn first_excess(&self, dropped_now: usize) -> Option<u64> {
        (dropped_now > 0 && self.excess == dropped_now as u64).then_some(self.limit.unwrap_or(0))
    }

    /// At the end of the body: the declared length and what was sent, when
    /// less was sent (the client would wait for the rest, or read the next
    /// response as body: the connection must be closed).
    pub fn shortfall(&self) -> Option<(u64, u64)> {
        match self.limit {
            Some(limit) if !self.no_body && self.sent < limit => Some((limit, self.sent)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charset_is_split_from_the_media_type() {
        fn parts(v: &str) -> (&str, Option<&str>) {
            let (len, charset) = content_type_parts(v.as_bytes());
            (&v[..len], charset.map(|r| &v[r]))
        }
        assert_eq!(parts("text/html"), ("text/html", None));
        assert_eq!(
            parts("text/html; charset=utf-8"),
            ("text/html", Some("utf-8"))
        );
        assert_eq!(
            parts("text/html;charset=\"UTF-8\""),
            ("text/html", Some("UTF-8"))
        );
        assert_eq!(
            parts("text/plain; format=flowed; Charset=latin1"),
            ("text/plain; format=flowed", Some("latin1"))
        );
        assert_eq!(
            parts("text/plain; format=flowed"),
            ("text/plain; format=flowed", None)
        );
        assert_eq!(parts("text/plain; charset="), ("text/plain", Some("")));
        assert_eq!(parts("a; charset=\""), ("a", Some("")));
    }

    fn h(name: &str, value: &str) -> Header {
        (name.to_string(), value.as_bytes().to_vec())
    }

    #[test]
    fn statuses() {
        assert_eq!(check_status("200 OK"), Ok(200));
        assert_eq!(check_status("204"), Ok(204));
        assert_eq!(check_status("599 Whatever it says"), Ok(599));
        for bad in [
            "20 OK",
            "2000 OK",
            "abc",
            "200OK",
            "200 OK\r\nX: y",
            "099 x",
            "",
        ] {
            assert!(
                matches!(check_status(bad), Err(HeadError::Status(_))),
                "{bad}"
            );
        }
        for interim in ["100 Continue", "101 Switching Protocols", "103 Early Hints"] {
            assert!(matches!(
                check_status(interim),
                Err(HeadError::Informational(_))
            ));
        }
    }

    #[test]
    fn header_values_refuse_every_control_byte_but_tab() {
        assert!(check_header("X-A", b"a\tb \xe9").is_ok());
        for c in (0u8..0x20).filter(|&c| c != b'\t').chain([0x7f]) {
            assert_eq!(
                check_header("X-A", &[b'a', c, b'b']),
                Err(HeadError::Value("X-A".into())),
                "byte {c:#x}"
            );
        }
        assert!(matches!(check_header("X A", b"v"), Err(HeadError::Name(_))));
        assert!(matches!(check_header("", b"v"), Err(HeadError::Name(_))));
    }

    #[test]
    fn content_length_must_be_one_number() {
        assert_eq!(
            declared_length(&[h("Content-Length", " 12 ")]),
            Ok(Some(12))
        );
        assert_eq!(declared_length(&[h("X", "1")]), Ok(None));
        assert_eq!(
            declared_length(&[h("content-length", "5"), h("Content-Length", "5")]),
            Ok(Some(5))
        );
        for bad in [
            "",
            "-1",
            "+5",
            "5, 5",
            "0x10",
            "1e3",
            "99999999999999999999",
            // Beyond i64::MAX: a server's off_t would read it as negative.
            "9223372036854775808",
        ] {
            assert!(
                declared_length(&[h("Content-Length", bad)]).is_err(),
                "{bad:?}"
            );
        }
        assert!(declared_length(&[h("Content-Length", "5"), h("Content-Length", "6")]).is_err());
        assert_eq!(
            declared_length(&[h("Content-Length", "9223372036854775807")]),
            Ok(Some(i64::MAX as u64))
        );
    }

    #[test]
    fn heads_are_bounded() {
        let big = vec![h("X", &"v".repeat(MAX_HEAD))];
        assert!(matches!(
            check_head(200, "200 OK", &big, false),
            Err(HeadError::TooLarge(_))
        ));
        let many: Vec<Header> = (0..10_000).map(|i| h(&format!("X-{i}"), "v")).collect();
        assert!(check_head(200, "200 OK", &many, false).is_ok());
    }

    #[test]
    fn body_is_cut_at_the_declared_length() {
        let mut f = check_head(200, "200 OK", &[h("Content-Length", "5")], false).unwrap();
        assert_eq!(f.admit(3), 3);
        assert_eq!(f.first_excess(0), None);
        assert_eq!(f.shortfall(), Some((5, 3)));
        assert_eq!(f.admit(4), 2);
        assert_eq!(f.first_excess(2), Some(5));
        assert_eq!(f.admit(4), 0);
        assert_eq!(f.first_excess(4), None);
        assert_eq!(f.shortfall(), None);
    }

    #[test]
    fn no_body_for_head_204_and_304() {
        for (status, head) in [
            ("204 No Content", false),
            ("304 Not Modified", false),
            ("200 OK", true),
        ] {
            let mut f = check_head(
                status[..3].parse().unwrap(),
                status,
                &[h("Content-Length", "10")],
                head,
            )
            .unwrap();
            assert_eq!(f.admit(10), 0);
            assert_eq!(f.shortfall(), None, "{status} {head}");
        }
        // The code the server sends and the line it frames by must agree.
        assert_eq!(
            check_head(204, "200 OK", &[], false),
            Err(HeadError::Mismatch(204, "200 OK".into()))
        );
        let mut open = check_head(200, "200 OK", &[], false).unwrap();
        assert_eq!(open.admit(1 << 20), 1 << 20);
        open.declare(1 << 20);
        assert_eq!(open.shortfall(), None);
    }
}
