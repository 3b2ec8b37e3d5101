//! Whole requests through small ASGI applications, on the process's event
//! loop: with a server thread doing the I/O ([`super::run`]) and without one
//! ([`super::start`] over a fake [`Flow`]).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pyo3::prelude::*;

use crate::common::cgi::RequestHead;
use crate::common::config::{AppSpec, Interface};
use crate::common::transport::{Flow, Outcome, Request, RequestBody};
use crate::python::test_support::{
    eval, run as run_py, with_py, ChunkBody, Record, RecordingChannel,
};
use crate::python::ServerInfo;

fn info() -> ServerInfo {
    ServerInfo {
        server: "nginx",
        mode: "embedded",
        process_group: String::new(),
        multithread: true,
        multiprocess: true,
        shared_interpreter: true,
    }
}

/// An application script in the temporary directory, removed when dropped.
struct Script(PathBuf);

impl Script {
    fn new(name: &str, source: &str) -> Script {
        let path = std::env::temp_dir().join(format!(
            "gateway-asgi-test-{}-{name}.py",
            std::process::id()
        ));
        std::fs::write(&path, source).unwrap();
        Script(path)
    }

    fn spec(&self) -> AppSpec {
        AppSpec {
            file: self.0.clone(),
            callable: "application".to_string(),
            interface: Interface::Asgi,
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A POST of `/app/items/1?a=1` with these headers.
fn head<'a>(headers: &[(&'a [u8], &'a [u8])]) -> RequestHead<'a> {
    RequestHead {
        method: b"POST",
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

/// Runs one request through the application in `source` on a thread of its own.
fn serve_with(
    name: &str,
    source: &str,
    head: RequestHead<'_>,
    body: Box<dyn RequestBody>,
) -> (Outcome, Record) {
    Python::initialize();
    let script = Script::new(name, source);
    let (channel, record) = RecordingChannel::new();
    let request = Request {
        head,
        has_body: true,
        body,
        response: Box::new(channel),
    };
    (super::run(&script.spec(), &info(), request), record)
}

fn serve(name: &str, source: &str, body: &[&[u8]]) -> (Outcome, Record) {
    serve_with(name, source, head(&[]), Box::new(ChunkBody::of(body)))
}

/// The response body as text.
fn text(record: &Record) -> String {
    String::from_utf8(record.get().body()).unwrap()
}

#[test]
fn the_scope_describes_the_request() {
    let source = "\
async def application(scope, receive, send):
    keys = ('type', 'asgi', 'http_version', 'method', 'scheme', 'path', 'raw_path',
            'root_path', 'query_string', 'headers', 'client', 'server', 'state')
    body = repr([scope[k] for k in keys]).encode()
    await send({'type': 'http.response.start', 'status': 200, 'headers': [(b'content-type', b'text/plain')]})
    await send({'type': 'http.response.body', 'body': body})
";
    let mut request = head(&[
        (b"Host", b"example.org"),
        (b"X_Forwarded_User", b"admin"),
        (b"Accept", b"a"),
        (b"accept", b"b"),
        (b"Transfer-Encoding", b"chunked"),
    ]);
    request.path_info = b"/caf\xc3\xa9 x";
    request.request_uri = b"/app/caf%C3%A9%20x?a=1";
    let (outcome, record) = serve_with("scope", source, request, Box::new(ChunkBody::of(&[])));
    assert_eq!(outcome, Outcome::Complete);
    assert_eq!(
        text(&record),
        "['http', {'version': '3.0', 'spec_version': '2.4'}, '1.1', 'POST', 'http', \
         '/app/caf\u{e9} x', b'/app/caf%C3%A9%20x', '/app', b'a=1', \
         [(b'host', b'example.org'), (b'accept', b'a'), (b'accept', b'b')], \
         ('192.0.2.7', 54321), ('10.0.0.1', 8080), {}]"
    );
    let sent = record.get();
    assert_eq!(
        sent.starts,
        [(
            200,
            "200 OK".to_string(),
            vec![
                ("content-type".to_string(), b"text/plain".to_vec()),
                (
                    "content-length".to_string(),
                    sent.body().len().to_string().into_bytes()
                ),
            ]
        )],
        "a body sent in one message gets its length"
    );
}

#[test]
fn scope_versions_and_paths() {
    assert_eq!(super::scope::http_version(b"HTTP/1.0"), "1.0");
    assert_eq!(super::scope::http_version(b"HTTP/2.0"), "2");
    assert_eq!(super::scope::http_version(b"HTTP/1.1"), "1.1");
    assert_eq!(super::scope::raw_path(b"/a%20b?x=1"), b"/a%20b");
    assert_eq!(super::scope::raw_path(b"/a"), b"/a");
}

const ECHO_MESSAGES: &str = "\
async def application(scope, receive, send):
    messages = []
    while True:
        message = await receive()
        messages.append((message['body'], message['more_body']))
        if not message['more_body']:
            break
    await send({'type': 'http.response.start', 'status': 201, 'headers': []})
    await send({'type': 'http.response.body', 'body': repr(messages).encode()})
";

#[test]
fn the_body_arrives_in_pieces_as_read() {
    let (outcome, record) = serve("pieces", ECHO_MESSAGES, &[b"hello ", b"world"]);
    assert_eq!(outcome, Outcome::Complete);
    assert_eq!(
        text(&record),
        "[(b'hello ', True), (b'world', True), (b'', False)]"
    );
    assert_eq!(record.get().starts[0].0, 201);
}

#[test]
fn a_declared_length_ends_the_body_without_another_read() {
    let body = ChunkBody::of(&[b"hello ", b"world"]);
    let reads = body.reads.clone();
    let request = head(&[(b"Content-Length", b"11")]);
    let (outcome, record) = serve_with("length", ECHO_MESSAGES, request, Box::new(body));
    assert_eq!(outcome, Outcome::Complete);
    assert_eq!(text(&record), "[(b'hello ', True), (b'world', False)]");
    assert_eq!(*reads.lock().unwrap(), [64 * 1024, 64 * 1024]);
}

#[test]
fn a_streamed_response_is_flushed_piece_by_piece() {
    let source = "\
async def application(scope, receive, send):
    await send({'type': 'http.response.start', 'status': 200, 'headers': [[b'x-a', b'1'], (b'Connection', b'close')]})
    await send({'type': 'http.response.body', 'body': b'one', 'more_body': True})
    await send({'type': 'http.response.body', 'body': b'', 'more_body': True})
    await send({'type': 'http.response.body', 'body': bytearray(b'two'), 'more_body': True})
    await send({'type': 'http.response.body'})
";
    let (outcome, record) = serve("stream", source, &[]);
    assert_eq!(outcome, Outcome::Complete);
    let sent = record.get();
    assert_eq!(sent.starts[0].2, [("x-a".to_string(), b"1".to_vec())]);
    assert_eq!(
        sent.writes,
        [
            (b"one".to_vec(), true),
            (b"two".to_vec(), true),
            (Vec::new(), true)
        ]
    );
    assert_eq!(
        sent.logged(log::Level::Warn),
        ["gateway: POST /app/items/1?a=1: dropped hop-by-hop response header 'Connection'"]
    );
}

#[test]
fn an_exception_before_the_response_started_is_a_500_with_its_traceback() {
    let source = "\
async def application(scope, receive, send):
    await send({'type': 'http.response.start', 'status': 200, 'headers': []})
    raise LookupError('no such item')
";
    let (outcome, record) = serve("raises", source, &[]);
    assert_eq!(outcome, Outcome::FAILED);
    let sent = record.get();
    assert!(sent.starts.is_empty());
    let errors = sent.logged(log::Level::Error);
    assert_eq!(
        errors.first(),
        Some(&"gateway: POST /app/items/1?a=1: the application raised an exception")
    );
    assert!(errors.iter().any(|l| l.contains("Traceback")), "{errors:?}");
    assert_eq!(
        errors.last(),
        Some(&"gateway: POST /app/items/1?a=1: LookupError: no such item")
    );
}

#[test]
fn an_exception_after_the_headers_went_out_cuts_the_response_short() {
    let source = "\
async def application(scope, receive, send):
    await send({'type': 'http.response.start', 'status': 200, 'headers': []})
    await send({'type': 'http.response.body', 'body': b'part', 'more_body': True})
    raise RuntimeError('broken')
";
    let (outcome, record) = serve("breaks", source, &[]);
    assert_eq!(outcome, Outcome::Aborted);
    let sent = record.get();
    assert_eq!(sent.aborts, 1);
    assert_eq!(sent.body(), b"part");
    assert!(sent
        .logged(log::Level::Error)
        .contains(&"gateway: POST /app/items/1?a=1: the response was cut short: its headers had already been sent"));
}

#[test]
fn invalid_responses_are_500s_never_split_headers() {
    for (name, start, needle) in [
        ("crlf", "{'type': 'http.response.start', 'status': 200, 'headers': [(b'x', b'a\\r\\nSet-Cookie: x')]}", "header injection"),
        ("status", "{'type': 'http.response.start', 'status': 1000}", "invalid HTTP status 1000"),
        ("strstatus", "{'type': 'http.response.start', 'status': '200'}", "must be an int"),
        ("strheader", "{'type': 'http.response.start', 'status': 200, 'headers': [('x', 'y')]}", "must be bytes"),
        ("interim", "{'type': 'http.response.start', 'status': 103}", "interim"),
        ("early", "{'type': 'http.response.body', 'body': b'x'}", "before http.response.start"),
    ] {
        let source = format!(
            "async def application(scope, receive, send):\n    await send({start})\n    await send({{'type': 'http.response.body'}})\n"
        );
        let (outcome, record) = serve(&format!("invalid-{name}"), &source, &[]);
        assert_eq!(outcome, Outcome::FAILED, "{name}");
        let sent = record.get();
        assert!(sent.starts.is_empty(), "{name}");
        let errors = sent.logged(log::Level::Error);
        assert!(errors.last().unwrap().contains(needle), "{name}: {errors:?}");
    }
}

#[test]
fn an_application_that_returns_without_responding_is_a_500() {
    let source = "async def application(scope, receive, send):\n    pass\n";
    let (outcome, record) = serve("silent", source, &[]);
    assert_eq!(outcome, Outcome::FAILED);
    assert_eq!(
        record.get().logged(log::Level::Error),
        ["gateway: POST /app/items/1?a=1: the application returned without sending a response"]
    );
}

#[test]
fn a_response_left_open_is_finished_when_the_application_returns() {
    let source = "\
async def application(scope, receive, send):
    await send({'type': 'http.response.start', 'status': 204, 'headers': []})
";
    let (outcome, record) = serve("open", source, &[]);
    assert_eq!(outcome, Outcome::Complete);
    let sent = record.get();
    assert_eq!(sent.starts[0].0, 204);
    assert_eq!(sent.starts[0].2, [], "no length for a 204");
}

/// A body that has ended, whose client leaves after `polls` checks.
struct LeavingBody {
    polls: AtomicUsize,
}

impl RequestBody for LeavingBody {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }

    fn client_gone(&mut self) -> bool {
        self.polls.fetch_sub(1, Ordering::Relaxed) <= 1
    }
}

#[test]
fn a_client_that_leaves_is_an_http_disconnect_and_send_then_raises() {
    let source = "\
import sys
async def application(scope, receive, send):
    if scope['type'] != 'http':
        raise ValueError('no lifespan')
    first = await receive()
    second = await receive()
    try:
        await send({'type': 'http.response.start', 'status': 200, 'headers': []})
        await send({'type': 'http.response.body', 'body': b'late', 'more_body': True})
    except OSError as e:
        sys.gateway_asgi_disconnect = (first['type'], second['type'], type(e).__name__)
";
    let body = LeavingBody {
        polls: AtomicUsize::new(2),
    };
    let (outcome, record) = serve_with("leaves", source, head(&[]), Box::new(body));
    assert_eq!(outcome, Outcome::ClientGone);
    assert!(record.get().starts.is_empty());
    let seen = with_py(|py| {
        eval(py, "repr(__import__('sys').gateway_asgi_disconnect)", &[])
            .unwrap()
            .extract::<String>()
            .unwrap()
    });
    assert_eq!(
        seen,
        "('http.request', 'http.disconnect', 'ConnectionResetError')"
    );
}

#[test]
fn lifespan_state_reaches_every_request() {
    let source = "\
async def application(scope, receive, send):
    if scope['type'] == 'lifespan':
        message = await receive()
        scope['state']['greeting'] = 'hi'
        await send({'type': 'lifespan.startup.complete'})
        await receive()
        await send({'type': 'lifespan.shutdown.complete'})
        return
    scope['state']['greeting'] += '!'
    await send({'type': 'http.response.start', 'status': 200, 'headers': []})
    await send({'type': 'http.response.body', 'body': scope['state']['greeting'].encode()})
";
    Python::initialize();
    let script = Script::new("lifespan", source);
    for _ in 0..2 {
        let (channel, record) = RecordingChannel::new();
        let request = Request {
            head: head(&[]),
            has_body: false,
            body: Box::new(ChunkBody::of(&[])),
            response: Box::new(channel),
        };
        let outcome = super::run(&script.spec(), &info(), request);
        assert_eq!(outcome, Outcome::Complete);
        assert_eq!(text(&record), "hi!", "each request has a copy of the state");
    }
}

#[test]
fn a_failed_lifespan_startup_answers_503() {
    let source = "\
async def application(scope, receive, send):
    if scope['type'] == 'lifespan':
        await receive()
        await send({'type': 'lifespan.startup.failed', 'message': 'no database'})
        return
    raise AssertionError('never served')
";
    let (outcome, record) = serve("startup-failed", source, &[]);
    assert_eq!(outcome, Outcome::Status(503));
    assert!(record.get().logged(log::Level::Error)[0].contains("lifespan startup failed"));
}

#[test]
fn an_application_that_raises_on_lifespan_is_served_without_it() {
    let source = "\
async def application(scope, receive, send):
    if scope['type'] != 'http':
        raise ValueError('only http')
    await send({'type': 'http.response.start', 'status': 200, 'headers': []})
    await send({'type': 'http.response.body', 'body': b'ok'})
";
    let (outcome, record) = serve("no-lifespan", source, &[]);
    assert_eq!(outcome, Outcome::Complete);
    assert_eq!(text(&record), "ok");
}

#[test]
fn a_script_that_fails_to_load_is_a_500_with_its_traceback() {
    let (outcome, record) = serve("broken", "import no_such_module_anywhere\n", &[]);
    assert_eq!(outcome, Outcome::FAILED);
    let errors = record.get();
    let errors = errors.logged(log::Level::Error);
    assert!(
        errors[0].contains("loading the ASGI application"),
        "{errors:?}"
    );
    assert!(
        errors.last().unwrap().contains("ModuleNotFoundError"),
        "{errors:?}"
    );
}

#[test]
fn asgi_applications_are_told_from_wsgi_ones() {
    with_py(|py| {
        let globals = run_py(
            py,
            "async def coroutine(scope, receive, send): pass\n\
             class App:\n\
             \x20   async def __call__(self, scope, receive, send): pass\n\
             def wsgi(environ, start_response): pass\n\
             class WsgiApp:\n\
             \x20   def __call__(self, environ, start_response): pass\n",
            &[],
        )
        .unwrap();
        let get = |name: &str| globals.get_item(name).unwrap().unwrap();
        assert!(super::is_asgi(py, &get("coroutine")).unwrap());
        let app = get("App").call0().unwrap();
        assert!(super::is_asgi(py, &app).unwrap());
        assert!(!super::is_asgi(py, &get("wsgi")).unwrap());
        let app = get("WsgiApp").call0().unwrap();
        assert!(!super::is_asgi(py, &app).unwrap());
    });
}

#[test]
fn detection_routes_an_asgi_script_and_remembers_it() {
    Python::initialize();
    let script = Script::new(
        "detect",
        "async def application(scope, receive, send):\n\
         \x20   await send({'type': 'http.response.start', 'status': 200})\n\
         \x20   await send({'type': 'http.response.body', 'body': b'asgi'})\n",
    );
    let spec = AppSpec {
        interface: Interface::Detect,
        ..script.spec()
    };
    assert!(!crate::python::runs_without_thread(&spec), "not known yet");
    let (channel, record) = RecordingChannel::new();
    let request = Request {
        head: head(&[]),
        has_body: false,
        body: Box::new(ChunkBody::of(&[])),
        response: Box::new(channel),
    };
    assert_eq!(
        crate::python::run(&spec, &info(), request),
        Outcome::Complete
    );
    assert_eq!(text(&record), "asgi");
    assert!(crate::python::runs_without_thread(&spec));
}

/// A transport that never blocks: room only once `open` is set (a waker is
/// kept to call then); the client leaves when `gone` is set; while `held` is
/// set, the body has not arrived.
#[derive(Default)]
struct FakeFlow {
    open: AtomicBool,
    gone: AtomicBool,
    held: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl FakeFlow {
    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().unwrap().take() {
            waker.wake();
        }
    }

    fn release_body(&self) {
        self.held.store(false, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().unwrap().take() {
            waker.wake();
        }
    }
}

impl Flow for Arc<FakeFlow> {
    fn poll_body(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.held.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.open.load(Ordering::SeqCst) || self.gone.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.gone.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Starts `script`'s request without a thread (on the loop) over `flow`,
/// with `body` as its body; the receiver gets its outcome.
fn start_on_loop(
    script: &Script,
    flow: &Arc<FakeFlow>,
    channel: RecordingChannel,
    has_body: bool,
    body: &[&[u8]],
) -> crossbeam_channel::Receiver<Outcome> {
    let request = Request {
        head: head(&[]),
        has_body,
        body: Box::new(ChunkBody::of(body)),
        response: Box::new(channel),
    };
    let (done_tx, done) = crossbeam_channel::bounded(1);
    super::start(
        &script.spec(),
        &info(),
        request,
        Box::new(flow.clone()),
        Box::new(move |outcome| done_tx.send(outcome).unwrap()),
    );
    done
}

#[test]
fn a_request_without_a_thread_waits_for_room_and_ends_with_done() {
    Python::initialize();
    let script = Script::new("flow", ECHO_MESSAGES);
    let flow = Arc::new(FakeFlow::default());
    let (channel, record) = RecordingChannel::new();
    let done = start_on_loop(&script, &flow, channel, true, &[b"abc"]);
    assert!(
        done.recv_timeout(Duration::from_millis(300)).is_err(),
        "no room yet"
    );
    assert!(record.get().starts.is_empty());
    flow.open();
    let outcome = done.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(outcome, Outcome::Complete);
    assert_eq!(text(&record), "[(b'abc', True), (b'', False)]");
}

#[test]
fn a_request_without_a_thread_learns_of_the_client_leaving() {
    Python::initialize();
    let script = Script::new(
        "flow-gone",
        "async def application(scope, receive, send):\n\
         \x20   assert scope['type'] == 'http'\n\
         \x20   assert (await receive())['type'] == 'http.request'\n\
         \x20   assert (await receive())['type'] == 'http.disconnect'\n",
    );
    let flow = Arc::new(FakeFlow::default());
    let (channel, _record) = RecordingChannel::new();
    let done = start_on_loop(&script, &flow, channel, false, &[]);
    std::thread::sleep(Duration::from_millis(100));
    flow.gone.store(true, Ordering::SeqCst);
    if let Some(waker) = flow.waker.lock().unwrap().take() {
        waker.wake();
    }
    let outcome = done.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(outcome, Outcome::ClientGone);
}

#[test]
fn a_request_without_a_thread_awaits_its_body_through_the_flow() {
    Python::initialize();
    let script = Script::new("flow-body", ECHO_MESSAGES);
    let flow = Arc::new(FakeFlow::default());
    flow.open.store(true, Ordering::SeqCst);
    flow.held.store(true, Ordering::SeqCst);
    let (channel, record) = RecordingChannel::new();
    let done = start_on_loop(&script, &flow, channel, true, &[b"late"]);
    assert!(
        done.recv_timeout(Duration::from_millis(300)).is_err(),
        "the body has not arrived"
    );
    flow.release_body();
    let outcome = done.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(outcome, Outcome::Complete);
    assert_eq!(text(&record), "[(b'late', True), (b'', False)]");
}
