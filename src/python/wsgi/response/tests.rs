//! `start_response` and `write()` as an application calls them: what it is
//! refused (the exception type and message) and what reaches the client.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::StartResponse;
use crate::python::test_support::{eval, raised, run, with_py, Record, RecordingChannel};

/// A `start_response` for `method /path?q=1` over `channel`.
fn responder<'py>(
    py: Python<'py>,
    method: &str,
    channel: RecordingChannel,
) -> Bound<'py, StartResponse> {
    let sr = StartResponse::new(Box::new(channel), method.as_bytes(), b"/path?q=1");
    Bound::new(py, sr).unwrap()
}

/// A GET's `start_response` and what reaches its client.
fn get(py: Python<'_>) -> (Bound<'_, StartResponse>, Record) {
    let (channel, record) = RecordingChannel::new();
    (responder(py, "GET", channel), record)
}

/// Evaluates `expr` with the start_response callable as `sr`.
fn call<'py>(sr: &Bound<'py, StartResponse>, expr: &str) -> PyResult<Bound<'py, PyAny>> {
    eval(sr.py(), expr, &[("sr", sr.as_any())])
}

fn h(name: &str, value: &[u8]) -> (String, Vec<u8>) {
    (name.to_string(), value.to_vec())
}

#[test]
fn status_and_headers_go_out_with_the_first_body_bytes() {
    with_py(|py| {
        let (sr, record) = get(py);
        let write = call(
            &sr,
            "sr('200 OK', [('Content-Type', 'text/plain'), ('X-Trace', 'a b')])",
        )
        .unwrap();
        assert!(record.get().starts.is_empty(), "nothing is sent yet");
        write.call1((PyBytes::new(py, b"hello"),)).unwrap();
        let sent = record.get();
        assert_eq!(
            sent.starts,
            [(
                200,
                "200 OK".to_string(),
                vec![h("Content-Type", b"text/plain"), h("X-Trace", b"a b")]
            )]
        );
        assert_eq!(sent.writes, [(b"hello".to_vec(), true)]);
    });
}

#[test]
fn a_status_that_is_not_a_str_is_a_type_error() {
    with_py(|py| {
        let (sr, _) = get(py);
        assert_eq!(
            raised(py, call(&sr, "sr(b'200 OK', [])")),
            "TypeError: status must be a str like '200 OK', got bytes"
        );
        assert_eq!(
            raised(py, call(&sr, "sr(200, [])")),
            "TypeError: status must be a str like '200 OK', got int"
        );
    });
}

#[test]
fn a_malformed_status_is_a_value_error() {
    with_py(|py| {
        let (sr, _) = get(py);
        for (status, shown) in [
            ("'200OK'", r#""200OK""#),
            ("'20 OK'", r#""20 OK""#),
            ("'OK'", r#""OK""#),
            ("''", r#""""#),
            ("'099 Low'", r#""099 Low""#),
        ] {
            assert_eq!(
                raised(py, call(&sr, &format!("sr({status}, [])"))),
                format!("ValueError: status must look like '200 OK', got {shown}")
            );
        }
    });
}

#[test]
fn a_status_with_cr_or_lf_is_refused_and_start_response_may_be_called_again() {
    with_py(|py| {
        let (sr, record) = get(py);
        assert_eq!(
            raised(py, call(&sr, r"sr('200 OK\r\nSet-Cookie: a=b', [])")),
            r#"ValueError: status must look like '200 OK', got "200 OK\r\nSet-Cookie: a=b""#
        );
        assert_eq!(
            raised(py, call(&sr, r"sr('200 OK\nX: y', [])")),
            r#"ValueError: status must look like '200 OK', got "200 OK\nX: y""#
        );
        // The refused call did not count as the one call allowed without exc_info.
        call(&sr, "sr('404 Not Found', [])(b'')").unwrap();
        assert_eq!(record.get().starts[0].1, "404 Not Found");
    });
}

#[test]
fn an_interim_status_is_refused() {
    with_py(|py| {
        let (sr, _) = get(py);
        let err = raised(py, call(&sr, "sr('100 Continue', [])"));
        assert!(
            err.starts_with(
                "ValueError: status 100 is an interim (1xx) status, which cannot end a response"
            ),
            "{err}"
        );
    });
}

#[test]
fn headers_must_be_an_iterable_of_str_pairs() {
    with_py(|py| {
        let (sr, _) = get(py);
        for (headers, error) in [
            (
                "None",
                "TypeError: headers must be a list of (name, value) tuples, got NoneType",
            ),
            (
                "[['X-A', 'b']]",
                "TypeError: each header must be a (name, value) tuple, got list",
            ),
            (
                "[('X-A', 'b', 'c')]",
                "TypeError: each header must be a (name, value) tuple, got tuple",
            ),
            (
                "{'X-A': 'b'}",
                "TypeError: each header must be a (name, value) tuple, got str",
            ),
            (
                "[('X-A', b'b')]",
                "TypeError: header names and values must be str, got (str, bytes)",
            ),
            (
                "[(b'X-A', 'b')]",
                "TypeError: header names and values must be str, got (bytes, str)",
            ),
            (
                "[('Content-Length', 5)]",
                "TypeError: header names and values must be str, got (str, int)",
            ),
        ] {
            assert_eq!(
                raised(py, call(&sr, &format!("sr('200 OK', {headers})"))),
                error,
                "{headers}"
            );
        }
    });
}

#[test]
fn a_header_value_with_cr_lf_or_nul_is_refused() {
    with_py(|py| {
        let (sr, _) = get(py);
        for (value, shown) in [
            (r"'a\r\nSet-Cookie: x=1'", r#""a\r\nSet-Cookie: x=1""#),
            (r"'a\nb'", r#""a\nb""#),
            (r"'a\rb'", r#""a\rb""#),
            (r"'a\x00b'", r#""a\0b""#),
            (r"'a\x1bb'", r#""a\u{1b}b""#),
        ] {
            assert_eq!(
                raised(py, call(&sr, &format!("sr('200 OK', [('X-A', {value})])"))),
                format!(
                    "ValueError: response header X-A contains CR, LF, NUL or another control \
                     character, refused (header injection): {shown}"
                )
            );
        }
        // A tab is allowed inside a value.
        call(&sr, r"sr('200 OK', [('X-A', 'a\tb')])").unwrap();
    });
}

#[test]
fn a_header_name_that_is_not_a_token_is_refused() {
    with_py(|py| {
        let (sr, _) = get(py);
        for (name, shown) in [
            ("'X A'", r#""X A""#),
            ("'X:A'", r#""X:A""#),
            ("''", r#""""#),
            (r"'X-A\r\nSet-Cookie'", r#""X-A\r\nSet-Cookie""#),
        ] {
            assert_eq!(
                raised(py, call(&sr, &format!("sr('200 OK', [({name}, 'v')])"))),
                format!(r#"ValueError: invalid response header name {shown}: "v""#)
            );
        }
    });
}

#[test]
fn header_values_go_out_as_latin1_and_other_characters_are_refused() {
    with_py(|py| {
        let (sr, record) = get(py);
        assert_eq!(
            raised(
                py,
                call(&sr, "sr('200 OK', [('X-Name', 'caf\u{e9} \u{20ac}')])")
            ),
            "ValueError: response header X-Name is not latin-1: \"caf\u{e9} \u{20ac}\""
        );
        call(&sr, "sr('200 OK', [('X-Name', 'caf\u{e9}\u{ff}')])(b'')").unwrap();
        assert_eq!(record.get().starts[0].2, [h("X-Name", b"caf\xe9\xff")]);
    });
}

#[test]
fn hop_by_hop_headers_are_dropped_with_a_warning() {
    with_py(|py| {
        let (sr, record) = get(py);
        call(
            &sr,
            "sr('200 OK', [('Connection', 'close'), ('Content-Type', 'text/plain'), \
             ('transfer-encoding', 'chunked'), ('KEEP-ALIVE', 'timeout=5'), ('Upgrade', 'h2c'), \
             ('TE', 'trailers'), ('Trailer', 'X'), ('Proxy-Authenticate', 'Basic')])(b'')",
        )
        .unwrap();
        let sent = record.get();
        assert_eq!(sent.starts[0].2, [h("Content-Type", b"text/plain")]);
        let warned: Vec<String> = [
            "Connection",
            "transfer-encoding",
            "KEEP-ALIVE",
            "Upgrade",
            "TE",
            "Trailer",
            "Proxy-Authenticate",
        ]
        .iter()
        .map(|n| format!("gateway: GET /path?q=1: dropped hop-by-hop response header '{n}'"))
        .collect();
        assert_eq!(sent.logged(log::Level::Warn), warned);
    });
}

#[test]
fn a_second_call_without_exc_info_is_a_runtime_error() {
    with_py(|py| {
        let (sr, record) = get(py);
        call(&sr, "sr('200 OK', [])").unwrap();
        for second in ["sr('404 Not Found', [])", "sr('404 Not Found', [], None)"] {
            assert_eq!(
                raised(py, call(&sr, second)),
                "RuntimeError: start_response() was called a second time without exc_info"
            );
        }
        call(&sr, "sr.write(b'x')").unwrap();
        assert_eq!(record.get().starts[0].0, 200, "the first status stands");
    });
}

#[test]
fn exc_info_before_the_headers_went_out_replaces_the_response() {
    with_py(|py| {
        let (sr, record) = get(py);
        run(
            py,
            "import sys\n\
             sr('200 OK', [('X-First', '1')])\n\
             try:\n    raise ValueError('broken')\n\
             except ValueError:\n    sr('500 Internal Server Error', [('X-Second', '2')], sys.exc_info())(b'oops')\n",
            &[("sr", sr.as_any())],
        )
        .unwrap();
        let sent = record.get();
        assert_eq!(
            sent.starts,
            [(
                500,
                "500 Internal Server Error".to_string(),
                vec![h("X-Second", b"2")]
            )]
        );
        assert_eq!(sent.body(), b"oops");
    });
}

#[test]
fn exc_info_after_the_headers_went_out_reraises_that_exception() {
    with_py(|py| {
        let (sr, record) = get(py);
        let globals = run(
            py,
            "import sys\n\
             sr('200 OK', [])(b'part')\n\
             try:\n    raise KeyError('late')\n\
             except KeyError as e:\n    original = e\n    info = sys.exc_info()\n\
             try:\n    sr('500 Internal Server Error', [], info)\n\
             except BaseException as e:\n    same = e is original\n",
            &[("sr", sr.as_any())],
        )
        .unwrap();
        let same = globals.get_item("same").unwrap().unwrap();
        assert!(
            same.is_truthy().unwrap(),
            "the application's own exception is raised"
        );
        assert_eq!(record.get().starts.len(), 1, "the sent head stands");
    });
}

#[test]
fn exc_info_on_the_first_call_is_accepted() {
    with_py(|py| {
        let (sr, record) = get(py);
        call(
            &sr,
            "sr('503 Service Unavailable', [], (ValueError, ValueError('x'), None))(b'down')",
        )
        .unwrap();
        assert_eq!(record.get().starts[0].0, 503);
        assert_eq!(record.get().body(), b"down");
    });
}

#[test]
fn body_before_start_response_is_a_runtime_error() {
    with_py(|py| {
        let (sr, record) = get(py);
        assert_eq!(
            raised(py, call(&sr, "sr.write(b'early')")),
            "RuntimeError: the application sent body data before calling start_response()"
        );
        assert!(record.get().starts.is_empty());
    });
}

#[test]
fn write_takes_only_bytes() {
    with_py(|py| {
        let (sr, record) = get(py);
        let write = call(&sr, "sr('200 OK', [])").unwrap();
        for (data, error) in [
            ("'text'", "TypeError: write() takes bytes, got str"),
            (
                "bytearray(b'x')",
                "TypeError: write() takes bytes, got bytearray",
            ),
            ("None", "TypeError: write() takes bytes, got NoneType"),
        ] {
            assert_eq!(
                raised(
                    py,
                    eval(py, &format!("write({data})"), &[("write", &write)])
                ),
                error
            );
        }
        assert!(record.get().writes.is_empty());
    });
}

#[test]
fn an_invalid_content_length_is_refused() {
    with_py(|py| {
        let (sr, _) = get(py);
        for (headers, error) in [
            (
                "[('Content-Length', 'abc')]",
                r#"ValueError: invalid Content-Length "abc""#,
            ),
            (
                "[('Content-Length', '-1')]",
                r#"ValueError: invalid Content-Length "-1""#,
            ),
            (
                "[('content-length', '5'), ('Content-Length', '6')]",
                "ValueError: invalid Content-Length 6: another Content-Length says 5",
            ),
        ] {
            assert_eq!(
                raised(py, call(&sr, &format!("sr('200 OK', {headers})"))),
                error
            );
        }
    });
}

#[test]
fn bytes_beyond_the_content_length_are_dropped_and_logged_once() {
    with_py(|py| {
        let (sr, record) = get(py);
        run(
            py,
            "w = sr('200 OK', [('Content-Length', '5')])\nw(b'abc')\nw(b'defg')\nw(b'hi')\n",
            &[("sr", sr.as_any())],
        )
        .unwrap();
        let sent = record.get();
        assert_eq!(sent.body(), b"abcde");
        assert_eq!(
            sent.logged(log::Level::Error),
            ["gateway: GET /path?q=1: the application sent more than its Content-Length of 5 bytes; the excess was dropped"]
        );
        drop(sent);
        assert_eq!(sr.borrow().shortfall(), None);
    });
}

#[test]
fn a_body_shorter_than_its_content_length_is_reported() {
    with_py(|py| {
        let (sr, _) = get(py);
        call(&sr, "sr('200 OK', [('Content-Length', '10')])(b'1234')").unwrap();
        assert_eq!(sr.borrow().shortfall(), Some((10, 4)));
        let (open, _) = get(py);
        call(&open, "sr('200 OK', [])(b'1234')").unwrap();
        assert_eq!(open.borrow().shortfall(), None);
    });
}

#[test]
fn no_body_goes_out_for_head_requests_204_and_304() {
    with_py(|py| {
        for (method, status) in [
            ("HEAD", "200 OK"),
            ("GET", "204 No Content"),
            ("GET", "304 Not Modified"),
        ] {
            let (channel, record) = RecordingChannel::new();
            let sr = responder(py, method, channel);
            call(
                &sr,
                &format!("sr('{status}', [('Content-Length', '4')])(b'body')"),
            )
            .unwrap();
            let sent = record.get();
            assert_eq!(
                sent.starts[0].2,
                [h("Content-Length", b"4")],
                "{method} {status}"
            );
            assert_eq!(sent.body(), b"", "{method} {status}");
            drop(sent);
            assert_eq!(sr.borrow().shortfall(), None, "{method} {status}");
        }
    });
}

#[test]
fn the_length_of_a_whole_body_is_declared_unless_the_application_did() {
    with_py(|py| {
        let (sr, record) = get(py);
        call(&sr, "sr('200 OK', [('X-A', '1')])").unwrap();
        sr.borrow_mut().set_content_length(5);
        sr.borrow_mut().send(py, b"hello", false).unwrap();
        assert_eq!(
            record.get().starts[0].2,
            [h("X-A", b"1"), h("Content-Length", b"5")]
        );
        // Once the head is out it can no longer change.
        sr.borrow_mut().set_content_length(99);
        assert_eq!(sr.borrow().shortfall(), None);

        let (own, record) = get(py);
        call(&own, "sr('200 OK', [('content-length', '5')])").unwrap();
        own.borrow_mut().set_content_length(3);
        own.borrow_mut().send(py, b"hello", false).unwrap();
        let sent = record.get();
        assert_eq!(sent.starts[0].2, [h("content-length", b"5")]);
        assert_eq!(sent.body(), b"hello");
    });
}

#[test]
fn a_head_the_server_refuses_fails_before_anything_went_out() {
    with_py(|py| {
        let (mut channel, record) = RecordingChannel::new();
        channel.refuse_head = true;
        let sr = responder(py, "GET", channel);
        assert_eq!(
            raised(py, call(&sr, "sr('200 OK', [])(b'x')")),
            "ValueError: the response head was refused: the head is too large"
        );
        let r = sr.borrow();
        assert!(!r.headers_sent(), "the server can still answer 500");
        assert!(!r.client_gone());
        assert!(record.get().writes.is_empty());
    });
}

#[test]
fn a_failed_write_means_the_client_went_away() {
    with_py(|py| {
        let (mut channel, _) = RecordingChannel::new();
        channel.fail_writes = true;
        let sr = responder(py, "GET", channel);
        assert_eq!(
            raised(py, call(&sr, "sr('200 OK', [])(b'x')")),
            "OSError: client closed the connection: broken pipe"
        );
        let r = sr.borrow();
        assert!(r.client_gone());
        assert!(r.headers_sent());
    });
}

#[test]
fn after_the_request_write_no_longer_reaches_the_server() {
    with_py(|py| {
        let (sr, record) = get(py);
        let write = call(&sr, "sr('200 OK', [])").unwrap();
        sr.borrow_mut().detach();
        assert_eq!(
            raised(py, eval(py, "write(b'late')", &[("write", &write)])),
            "OSError: the request is over"
        );
        assert!(record.get().starts.is_empty());
    });
}

#[test]
fn a_file_is_sent_up_to_the_content_length() {
    with_py(|py| {
        let (sr, record) = get(py);
        assert_eq!(
            raised(py, sr.borrow_mut().send_file(py, 7, 0, 100)),
            "RuntimeError: the application sent body data before calling start_response()"
        );
        call(&sr, "sr('200 OK', [('Content-Length', '10')])").unwrap();
        sr.borrow_mut().send_file(py, 7, 3, 100).unwrap();
        let sent = record.get();
        assert_eq!(sent.starts.len(), 1);
        assert_eq!(sent.files, [(7, 3, 10)]);
    });
}

#[test]
fn an_exception_is_logged_line_by_line_with_its_traceback() {
    with_py(|py| {
        let (sr, record) = get(py);
        let globals = run(
            py,
            "def fail():\n    raise ValueError('boom')\n\
             try:\n    fail()\n\
             except ValueError as e:\n    err = e\n",
            &[],
        )
        .unwrap();
        let err = PyErr::from_value(globals.get_item("err").unwrap().unwrap());
        sr.borrow()
            .log_exception(py, "the application raised an exception", &err);
        let sent = record.get();
        let lines = sent.logged(log::Level::Error);
        assert_eq!(
            lines.first(),
            Some(&"gateway: GET /path?q=1: the application raised an exception")
        );
        assert_eq!(
            lines.get(1),
            Some(&"gateway: GET /path?q=1: Traceback (most recent call last):")
        );
        assert_eq!(
            lines.last(),
            Some(&"gateway: GET /path?q=1: ValueError: boom")
        );
        assert!(lines.iter().any(|l| l.contains("in fail")), "{lines:?}");
        assert!(lines.iter().all(|l| !l.contains('\n')), "{lines:?}");
    });
}

#[test]
fn every_byte_value_reaches_the_client_unchanged() {
    with_py(|py| {
        let (sr, record) = get(py);
        let payload: Vec<u8> = (0..=255).collect();
        let write = call(&sr, "sr('200 OK', [])").unwrap();
        write.call1((PyBytes::new(py, &payload),)).unwrap();
        assert_eq!(record.get().body(), payload);
    });
}
