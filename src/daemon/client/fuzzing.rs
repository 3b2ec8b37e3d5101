//! Fuzzing entry for the server side of the wire protocol: whatever bytes a
//! daemon sends, the server relays a response that is framed as an embedded
//! one would be, or refuses it. Built only with `--cfg fuzzing` (see fuzz/).

use std::io::{self, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::{Conn, Exchange, Step};
use crate::common::framing::{self, Header};
use crate::common::transport::{Outcome, RequestBody, ResponseChannel};
use crate::daemon::auth::{GroupAccess, Secret, SECRET_LEN};
use crate::daemon::Endpoint;

/// The longest daemon reply tried: all of it must fit in the socket's buffer.
pub const MAX_REPLY: usize = 32 * 1024;

/// What the server did with the daemon's reply.
#[derive(Default)]
struct Relayed {
    starts: usize,
    status: u16,
    declared: Option<u64>,
    body: u64,
    body_before_head: bool,
}

impl ResponseChannel for Relayed {
    fn start(&mut self, status: u16, _line: &str, headers: &[Header]) -> io::Result<()> {
        self.starts += 1;
        self.status = status;
        self.declared = framing::declared_length(headers).expect("a checked head");
        Ok(())
    }
    fn write(&mut self, data: &[u8], _flush: bool) -> io::Result<()> {
        self.body_before_head |= self.starts == 0 && !data.is_empty();
        self.body += data.len() as u64;
        Ok(())
    }
    fn send_file(&mut self, _: std::os::fd::RawFd, _: u64, _: u64) -> io::Result<()> {
        unreachable!("the client never sends files")
    }
    fn abort(&mut self) {}
    fn log(&self, _level: log::Level, _line: &str) {}
}

/// A request body of a few bytes, so that body pulls get answers.
struct Body(usize);

impl RequestBody for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.0);
        buf[..n].fill(b'x');
        self.0 -= n;
        Ok(n)
    }
}

/// Relays `reply` (the daemon's bytes after its greeting) for a request whose
/// method is HEAD when `head_request`, and checks what reached the client.
pub fn replay(reply: &[u8], head_request: bool) {
    if reply.len() > MAX_REPLY {
        return;
    }
    let (server, mut daemon) = UnixStream::pair().expect("a socket pair");
    daemon.write_all(reply).expect("the reply fits the buffer");
    daemon.shutdown(Shutdown::Write).expect("shutdown");
    server
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("a timeout");
    let ep = Endpoint {
        group: "fuzz".into(),
        socket: PathBuf::from("/nonexistent/fuzz.sock"),
        run_dir: PathBuf::from("/nonexistent"),
        socket_timeout: Duration::from_secs(1),
        queue_timeout: None,
        access: GroupAccess {
            secret: Secret::from_bytes(&[0; SECRET_LEN]).expect("a secret"),
            apps: Vec::new(),
        },
    };
    let mut payload = Vec::new();
    let mut exchange = Exchange {
        ep: &ep,
        conn: Conn {
            reader: BufReader::new(server.try_clone().expect("a clone")),
            writer: server,
            // This process: alive, so a lost connection does not wait for an exit record.
            pid: std::process::id(),
            auth: Vec::new(),
        },
        payload: &mut payload,
        framing: None,
        head_request,
        pulled: false,
        heard: false,
    };
    let log = |_: &dyn ResponseChannel, _: log::Level, _: &str| {};
    let mut relayed = Relayed::default();
    let step = exchange.run(b"", &mut Body(100), &mut relayed, &log);
    check(&relayed, &step, head_request);
}

/// The promises the server keeps whatever the daemon sends.
fn check(relayed: &Relayed, step: &Step, head_request: bool) {
    assert!(relayed.starts <= 1, "two response heads reached the client");
    assert!(!relayed.body_before_head, "body bytes before the head");
    if relayed.starts == 0 {
        return;
    }
    assert!(relayed.status >= 200, "a 1xx status reached the client");
    if head_request || framing::status_has_no_body(relayed.status) {
        assert_eq!(relayed.body, 0, "a body after HEAD, 204 or 304");
    }
    if let Some(declared) = relayed.declared {
        assert!(
            relayed.body <= declared,
            "more body than its Content-Length"
        );
        let complete = matches!(step, Step::Done(Outcome::Complete, _));
        let bodiless = head_request || framing::status_has_no_body(relayed.status);
        assert!(
            !complete || bodiless || relayed.body == declared,
            "a complete response shorter than its Content-Length"
        );
    }
}
