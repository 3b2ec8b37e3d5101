//! The environ an application receives, and whole requests run through small
//! applications: what the client gets and how the request ends.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::{build_environ, ServerInfo};
use crate::common::cgi::RequestHead;
use crate::common::config::AppSpec;
use crate::common::transport::{Outcome, Request};
use crate::common::VERSION;
use crate::python::test_support::{eval, run, with_py, ChunkBody, Record, RecordingChannel};

fn info() -> ServerInfo {
    ServerInfo {
        server: "nginx",
        mode: "daemon",
        process_group: "shop".to_string(),
        multithread: true,
        multiprocess: false,
        shared_interpreter: true,
    }
}

/// A GET of `/app/items/1?a=1` from 192.0.2.7 with these headers.
fn head<'a>(headers: &[(&'a [u8], &'a [u8])]) -> RequestHead<'a> {
    RequestHead {
        method: b"GET",
        script_name: b"/app",
        path_info: b"/items/1",
        query_string: b"a=1",
        request_uri: b"/app/items/1?a=1",
        protocol: b"HTTP/1.1",
        server_name: b"example.org",
        server_port: 8080,
        server_addr: b"10.0.0.1",
        remote_addr: b"192.0.2.7",
        remote_port: 54321,
        headers: headers.to_vec(),
        ..RequestHead::default()
    }
}

fn environ<'py>(py: Python<'py>, head: &RequestHead<'_>) -> Bound<'py, PyDict> {
    build_environ(py, head, &info()).unwrap()
}

/// An environ value as a str, None when the key is missing.
fn var(env: &Bound<'_, PyDict>, key: &str) -> Option<String> {
    env.get_item(key)
        .unwrap()
        .map(|v| v.extract::<String>().unwrap())
}

fn keys(env: &Bound<'_, PyDict>) -> Vec<String> {
    let mut keys: Vec<String> = env.keys().extract().unwrap();
    keys.sort();
    keys
}

#[test]
fn the_cgi_variables_describe_the_request() {
    with_py(|py| {
        let env = environ(py, &head(&[]));
        for (key, value) in [
            ("REQUEST_METHOD", "GET"),
            ("SCRIPT_NAME", "/app"),
            ("PATH_INFO", "/items/1"),
            ("QUERY_STRING", "a=1"),
            ("REQUEST_URI", "/app/items/1?a=1"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("SERVER_NAME", "example.org"),
            ("SERVER_PORT", "8080"),
            ("SERVER_ADDR", "10.0.0.1"),
            ("REMOTE_ADDR", "192.0.2.7"),
            ("REMOTE_PORT", "54321"),
        ] {
            assert_eq!(var(&env, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(
            var(&env, "SERVER_SOFTWARE"),
            Some(format!("Gateway/{VERSION} (nginx)"))
        );
    });
}

#[test]
fn environ_strings_are_the_request_bytes_decoded_as_latin1() {
    with_py(|py| {
        let every_byte: Vec<u8> = (0..=255).collect();
        let mut request = head(&[(b"X-Name", b"\xe9t\xe9")]);
        request.path_info = b"/caf\xe9";
        request.query_string = &every_byte;
        let env = environ(py, &request);
        assert_eq!(var(&env, "PATH_INFO").as_deref(), Some("/caf\u{e9}"));
        assert_eq!(var(&env, "HTTP_X_NAME").as_deref(), Some("\u{e9}t\u{e9}"));
        let round_trip = eval(
            py,
            "env['QUERY_STRING'].encode('latin-1') == bytes(range(256))",
            &[("env", env.as_any())],
        )
        .unwrap();
        assert!(round_trip.is_truthy().unwrap());
    });
}

#[test]
fn request_headers_become_http_variables() {
    with_py(|py| {
        let env = environ(
            py,
            &head(&[
                (b"User-Agent", b"curl/8"),
                (b"x-forwarded-for", b"198.51.100.1"),
                (b"Content-Type", b"application/json"),
                (b"Content-Length", b"12"),
                (b"Host", b"example.org"),
            ]),
        );
        assert_eq!(var(&env, "HTTP_USER_AGENT").as_deref(), Some("curl/8"));
        assert_eq!(
            var(&env, "HTTP_X_FORWARDED_FOR").as_deref(),
            Some("198.51.100.1")
        );
        assert_eq!(var(&env, "HTTP_HOST").as_deref(), Some("example.org"));
        assert_eq!(
            var(&env, "CONTENT_TYPE").as_deref(),
            Some("application/json")
        );
        assert_eq!(var(&env, "CONTENT_LENGTH").as_deref(), Some("12"));
        assert_eq!(var(&env, "HTTP_CONTENT_TYPE"), None);
        assert_eq!(var(&env, "HTTP_CONTENT_LENGTH"), None);
    });
}

#[test]
fn headers_with_underscores_proxy_and_transfer_encoding_never_reach_the_application() {
    with_py(|py| {
        let plain = keys(&environ(py, &head(&[(b"Accept", b"*/*")])));
        let env = environ(
            py,
            &head(&[
                (b"Accept", b"*/*"),
                (b"X_Forwarded_For", b"203.0.113.9"),
                (b"Remote_User", b"admin"),
                (b"Proxy", b"http://evil.example"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Bad Header", b"x"),
            ]),
        );
        assert_eq!(keys(&env), plain, "no key was added");
        assert_eq!(var(&env, "REMOTE_USER"), None);
    });
}

#[test]
fn repeated_headers_are_folded_into_one_variable() {
    with_py(|py| {
        let env = environ(
            py,
            &head(&[
                (b"Accept", b"text/html"),
                (b"Cookie", b"a=1"),
                (b"accept", b"*/*"),
                (b"COOKIE", b"b=2"),
            ]),
        );
        assert_eq!(var(&env, "HTTP_ACCEPT").as_deref(), Some("text/html, */*"));
        assert_eq!(var(&env, "HTTP_COOKIE").as_deref(), Some("a=1; b=2"));
    });
}

#[test]
fn https_and_authentication_are_shown_only_when_present() {
    with_py(|py| {
        let env = environ(py, &head(&[]));
        assert_eq!(var(&env, "wsgi.url_scheme").as_deref(), Some("http"));
        for key in ["HTTPS", "REMOTE_USER", "AUTH_TYPE"] {
            assert_eq!(var(&env, key), None, "{key}");
        }
        let mut request = head(&[]);
        request.https = true;
        request.remote_user = Some(b"alice");
        request.auth_type = Some(b"Basic");
        let env = environ(py, &request);
        assert_eq!(var(&env, "wsgi.url_scheme").as_deref(), Some("https"));
        assert_eq!(var(&env, "HTTPS").as_deref(), Some("on"));
        assert_eq!(var(&env, "REMOTE_USER").as_deref(), Some("alice"));
        assert_eq!(var(&env, "AUTH_TYPE").as_deref(), Some("Basic"));
    });
}

#[test]
fn server_variables_are_added_but_cannot_replace_the_requests_own() {
    with_py(|py| {
        let mut request = head(&[]);
        request.server_vars = vec![
            (b"SSL_PROTOCOL", b"TLSv1.3"),
            (b"REQUEST_METHOD", b"POST"),
            (b"PATH_INFO", b"/forged"),
            (b"BAD_\xff", b"x"),
        ];
        let env = environ(py, &request);
        assert_eq!(var(&env, "SSL_PROTOCOL").as_deref(), Some("TLSv1.3"));
        assert_eq!(var(&env, "REQUEST_METHOD").as_deref(), Some("GET"));
        assert_eq!(var(&env, "PATH_INFO").as_deref(), Some("/items/1"));
        let plain = keys(&environ(py, &head(&[])));
        assert_eq!(
            keys(&env).len(),
            plain.len() + 1,
            "a key that is not UTF-8 is skipped"
        );
    });
}

#[test]
fn the_wsgi_and_gateway_keys_describe_the_server() {
    with_py(|py| {
        let env = environ(py, &head(&[]));
        let check = |expr: &str| {
            let ok = eval(py, expr, &[("env", env.as_any())]).unwrap();
            assert!(ok.is_truthy().unwrap(), "{expr}");
        };
        check("env['wsgi.version'] == (1, 0)");
        check("env['wsgi.multithread'] is True");
        check("env['wsgi.multiprocess'] is False");
        check("env['wsgi.run_once'] is False");
        check("env['wsgi.input_terminated'] is True");
        check("env['wsgi.file_wrapper'].__name__ == 'FileWrapper'");
        check("env['gateway.server'] == 'nginx'");
        check("env['gateway.mode'] == 'daemon'");
        check("env['gateway.process_group'] == 'shop'");
        assert_eq!(var(&env, "gateway.version").as_deref(), Some(VERSION));
    });
}

#[test]
fn the_file_wrapper_iterates_in_blocks_and_closes_the_file() {
    with_py(|py| {
        let env = environ(py, &head(&[]));
        let globals = run(
            py,
            "import io\n\
             f = io.BytesIO(b'abcdefg')\n\
             wrapper = env['wsgi.file_wrapper'](f, 3)\n\
             chunks = list(wrapper)\n\
             wrapper.close()\n",
            &[("env", env.as_any())],
        )
        .unwrap();
        let chunks: Vec<Vec<u8>> = globals
            .get_item("chunks")
            .unwrap()
            .unwrap()
            .extract()
            .unwrap();
        assert_eq!(chunks, [b"abc".to_vec(), b"def".to_vec(), b"g".to_vec()]);
        let f = globals.get_item("f").unwrap().unwrap();
        assert!(f.getattr("closed").unwrap().is_truthy().unwrap());
    });
}

/// A WSGI script in the temporary directory, removed when dropped.
struct Script(PathBuf);

impl Script {
    fn new(name: &str, source: &str) -> Script {
        let path = std::env::temp_dir().join(format!(
            "gateway-wsgi-test-{}-{name}.py",
            std::process::id()
        ));
        std::fs::write(&path, source).unwrap();
        Script(path)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs one POST with `body` through the application in `source`.
fn serve(name: &str, source: &str, body: &[&[u8]], channel: RecordingChannel) -> Outcome {
    Python::initialize();
    let script = Script::new(name, source);
    let spec = AppSpec {
        file: script.0.clone(),
        callable: "application".to_string(),
        interface: crate::common::config::Interface::Detect,
    };
    let mut request = head(&[]);
    request.method = b"POST";
    let request = Request {
        head: request,
        has_body: true,
        body: Box::new(ChunkBody::of(body)),
        response: Box::new(channel),
    };
    super::run(&spec, &info(), request)
}

fn serve_recorded(name: &str, source: &str, body: &[&[u8]]) -> (Outcome, Record) {
    let (channel, record) = RecordingChannel::new();
    (serve(name, source, body, channel), record)
}

#[test]
fn a_request_runs_through_the_application_and_its_body_reaches_the_client() {
    let (outcome, record) = serve_recorded(
        "echo",
        "def application(environ, start_response):\n\
         \x20   body = environ['wsgi.input'].read()\n\
         \x20   start_response('201 Created', [('X-Method', environ['REQUEST_METHOD'])])\n\
         \x20   return [body.upper()]\n",
        &[b"hello ", b"world"],
    );
    assert_eq!(outcome, Outcome::Complete);
    let sent = record.get();
    assert_eq!(sent.starts.len(), 1);
    let (code, line, headers) = &sent.starts[0];
    assert_eq!((*code, line.as_str()), (201, "201 Created"));
    assert_eq!(
        *headers,
        [
            ("X-Method".to_string(), b"POST".to_vec()),
            ("Content-Length".to_string(), b"11".to_vec()),
        ],
        "a one-item list is sent with its length"
    );
    assert_eq!(sent.body(), b"HELLO WORLD");
}

#[test]
fn a_generator_is_sent_chunk_by_chunk_and_closed() {
    let (outcome, record) = serve_recorded(
        "generator",
        "import sys\n\
         class Body:\n\
         \x20   def __iter__(self):\n\
         \x20       yield b'one'\n\
         \x20       yield b''\n\
         \x20       yield b'two'\n\
         \x20   def close(self):\n\
         \x20       sys.gateway_test_generator_closed = True\n\
         def application(environ, start_response):\n\
         \x20   start_response('200 OK', [])\n\
         \x20   return Body()\n",
        &[],
    );
    assert_eq!(outcome, Outcome::Complete);
    let sent = record.get();
    assert_eq!(sent.starts[0].2, [], "no Content-Length for a stream");
    assert_eq!(
        sent.writes,
        [(b"one".to_vec(), true), (b"two".to_vec(), true)]
    );
    let closed = with_py(|py| {
        eval(
            py,
            "getattr(__import__('sys'), 'gateway_test_generator_closed', False)",
            &[],
        )
        .unwrap()
        .is_truthy()
        .unwrap()
    });
    assert!(closed, "close() was called");
}

#[test]
fn an_exception_before_anything_was_sent_fails_the_request() {
    let (outcome, record) = serve_recorded(
        "raises",
        "def application(environ, start_response):\n\
         \x20   start_response('200 OK', [])\n\
         \x20   raise LookupError('no such item')\n",
        &[],
    );
    assert_eq!(outcome, Outcome::FAILED, "the server answers 500");
    let sent = record.get();
    assert!(sent.starts.is_empty());
    let errors = sent.logged(log::Level::Error);
    assert_eq!(
        errors.first(),
        Some(&"gateway: POST /app/items/1?a=1: the application raised an exception")
    );
    assert_eq!(
        errors.last(),
        Some(&"gateway: POST /app/items/1?a=1: LookupError: no such item")
    );
}

#[test]
fn an_exception_after_the_headers_went_out_cuts_the_response_short() {
    let (outcome, record) = serve_recorded(
        "breaks",
        "def application(environ, start_response):\n\
         \x20   start_response('200 OK', [])\n\
         \x20   yield b'part'\n\
         \x20   raise ValueError('midway')\n",
        &[],
    );
    assert_eq!(outcome, Outcome::Aborted);
    let sent = record.get();
    assert_eq!(sent.body(), b"part");
    assert_eq!(sent.aborts, 1);
    let errors = sent.logged(log::Level::Error);
    assert!(errors.contains(&"gateway: POST /app/items/1?a=1: ValueError: midway"));
    assert_eq!(
        errors.last(),
        Some(&"gateway: POST /app/items/1?a=1: the response was cut short: its headers had already been sent")
    );
}

#[test]
fn invalid_responses_fail_the_request_with_a_reason() {
    for (name, returns, reason) in [
        (
            "returns_str",
            "start_response('200 OK', [])\n    return 'text'",
            "TypeError: the application returned a str; it must return an iterable of bytes, e.g. [body]",
        ),
        (
            "returns_str_chunks",
            "start_response('200 OK', [])\n    return ['text']",
            "TypeError: response body chunks must be bytes, got str",
        ),
        (
            "never_starts",
            "return []",
            "RuntimeError: the application returned without calling start_response()",
        ),
    ] {
        let (outcome, record) = serve_recorded(
            name,
            &format!("def application(environ, start_response):\n    {returns}\n"),
            &[],
        );
        assert_eq!(outcome, Outcome::FAILED, "{name}");
        let sent = record.get();
        assert!(sent.starts.is_empty(), "{name}");
        assert_eq!(
            sent.logged(log::Level::Error).last().copied(),
            Some(format!("gateway: POST /app/items/1?a=1: {reason}").as_str()),
            "{name}"
        );
    }
}

#[test]
fn a_body_shorter_than_its_content_length_closes_the_connection() {
    let (outcome, record) = serve_recorded(
        "short",
        "def application(environ, start_response):\n\
         \x20   start_response('200 OK', [('Content-Length', '10')])\n\
         \x20   return [b'1234']\n",
        &[],
    );
    assert_eq!(outcome, Outcome::Aborted);
    let sent = record.get();
    assert_eq!(sent.aborts, 1);
    assert_eq!(
        sent.logged(log::Level::Error),
        ["gateway: POST /app/items/1?a=1: the response ended after 4 of the 10 bytes its Content-Length declared; closing the connection"]
    );
}

#[test]
fn a_client_that_went_away_is_not_an_application_error() {
    let (mut channel, record) = RecordingChannel::new();
    channel.fail_writes = true;
    let outcome = serve(
        "client_gone",
        "def application(environ, start_response):\n\
         \x20   start_response('200 OK', [])\n\
         \x20   yield b'a'\n\
         \x20   yield b'b'\n",
        &[],
        channel,
    );
    assert_eq!(outcome, Outcome::ClientGone);
    let sent = record.get();
    assert_eq!(sent.aborts, 0);
    assert!(sent.logged(log::Level::Error).is_empty());
    assert_eq!(
        sent.logged(log::Level::Info),
        ["gateway: POST /app/items/1?a=1: the client closed the connection before the response was complete"]
    );
}
