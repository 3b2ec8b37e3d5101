//! `wsgi.input` as an application reads it: the bytes each call returns, how
//! the body is read from the server, and what a failing body raises.

use std::io;

use pyo3::prelude::*;

use super::{Input, READ_BLOCK};
use crate::python::test_support::{bytes_of, eval, raised, with_py, ChunkBody};

/// `wsgi.input` over `body`.
fn input(py: Python<'_>, body: ChunkBody) -> Bound<'_, PyAny> {
    Bound::new(py, Input::new(Box::new(body)))
        .unwrap()
        .into_any()
}

/// `wsgi.input` over a body of these chunks.
fn over<'py>(py: Python<'py>, chunks: &[&[u8]]) -> Bound<'py, PyAny> {
    input(py, ChunkBody::of(chunks))
}

/// Evaluates `expr` with the input as `inp`, expecting bytes.
fn read(inp: &Bound<'_, PyAny>, expr: &str) -> Vec<u8> {
    bytes_of(&eval(inp.py(), expr, &[("inp", inp)]).unwrap())
}

/// Evaluates `expr` with the input as `inp`, expecting a list of bytes.
fn lines(inp: &Bound<'_, PyAny>, expr: &str) -> Vec<Vec<u8>> {
    eval(inp.py(), expr, &[("inp", inp)])
        .unwrap()
        .extract()
        .unwrap()
}

fn v(lines: &[&[u8]]) -> Vec<Vec<u8>> {
    lines.iter().map(|l| l.to_vec()).collect()
}

#[test]
fn read_without_a_size_returns_the_whole_body() {
    with_py(|py| {
        let inp = over(py, &[b"hello ", b"wide ", b"world"]);
        assert_eq!(read(&inp, "inp.read()"), b"hello wide world");
        assert_eq!(read(&inp, "inp.read()"), b"");
        for no_limit in ["inp.read(None)", "inp.read(-1)"] {
            let inp = over(py, &[b"ab", b"cd"]);
            assert_eq!(read(&inp, no_limit), b"abcd", "{no_limit}");
        }
    });
}

#[test]
fn read_with_a_size_returns_that_many_bytes_until_the_end() {
    with_py(|py| {
        let inp = over(py, &[b"abc", b"defgh"]);
        assert_eq!(read(&inp, "inp.read(0)"), b"");
        assert_eq!(read(&inp, "inp.read(2)"), b"ab");
        assert_eq!(read(&inp, "inp.read(4)"), b"cdef", "across chunks");
        assert_eq!(read(&inp, "inp.read(10)"), b"gh", "the rest at the end");
        assert_eq!(read(&inp, "inp.read(10)"), b"");
        assert_eq!(read(&inp, "inp.read(1)"), b"");
    });
}

#[test]
fn readline_returns_each_line_with_its_newline() {
    with_py(|py| {
        let inp = over(py, &[b"first\nsec", b"ond\n\nlast"]);
        assert_eq!(read(&inp, "inp.readline()"), b"first\n");
        assert_eq!(read(&inp, "inp.readline()"), b"second\n");
        assert_eq!(read(&inp, "inp.readline()"), b"\n");
        assert_eq!(
            read(&inp, "inp.readline()"),
            b"last",
            "no newline at the end"
        );
        assert_eq!(read(&inp, "inp.readline()"), b"");
    });
}

#[test]
fn readline_with_a_size_stops_there() {
    with_py(|py| {
        let inp = over(py, &[b"hello\nworld\n"]);
        assert_eq!(read(&inp, "inp.readline(3)"), b"hel");
        assert_eq!(read(&inp, "inp.readline(3)"), b"lo\n");
        assert_eq!(read(&inp, "inp.readline(100)"), b"world\n", "only one line");
        assert_eq!(read(&inp, "inp.readline(100)"), b"");

        let inp = over(py, &[b"ab", b"cd", b"ef\n"]);
        assert_eq!(read(&inp, "inp.readline(5)"), b"abcde", "across chunks");
        assert_eq!(read(&inp, "inp.readline(0)"), b"");
        assert_eq!(read(&inp, "inp.readline(-1)"), b"f\n", "negative: no limit");
        assert_eq!(read(&inp, "inp.readline(None)"), b"");
    });
}

#[test]
fn readline_and_read_share_one_position() {
    with_py(|py| {
        let inp = over(py, &[b"key=value\nrest of ", b"the body"]);
        assert_eq!(read(&inp, "inp.readline()"), b"key=value\n");
        assert_eq!(read(&inp, "inp.read(4)"), b"rest");
        assert_eq!(read(&inp, "inp.read()"), b" of the body");
    });
}

#[test]
fn readlines_returns_every_line() {
    with_py(|py| {
        let inp = over(py, &[b"a\nbb", b"\nccc"]);
        assert_eq!(
            lines(&inp, "inp.readlines()"),
            v(&[b"a\n", b"bb\n", b"ccc"])
        );
        assert_eq!(lines(&inp, "inp.readlines()"), v(&[]));
        for no_hint in ["0", "-1", "None"] {
            let inp = over(py, &[b"a\nb\n"]);
            assert_eq!(
                lines(&inp, &format!("inp.readlines({no_hint})")),
                v(&[b"a\n", b"b\n"]),
                "{no_hint}"
            );
        }
    });
}

#[test]
fn readlines_with_a_hint_stops_once_that_much_was_read() {
    with_py(|py| {
        let inp = over(py, &[b"a\nbb\nccc\ndddd\n"]);
        assert_eq!(lines(&inp, "inp.readlines(3)"), v(&[b"a\n", b"bb\n"]));
        assert_eq!(
            lines(&inp, "inp.readlines(4)"),
            v(&[b"ccc\n"]),
            "exactly the hint"
        );
        assert_eq!(read(&inp, "inp.read()"), b"dddd\n");
    });
}

#[test]
fn iterating_yields_the_lines() {
    with_py(|py| {
        let inp = over(py, &[b"one\ntw", b"o\nthree"]);
        assert_eq!(lines(&inp, "list(inp)"), v(&[b"one\n", b"two\n", b"three"]));
        assert_eq!(lines(&inp, "list(inp)"), v(&[]));
        let inp = over(py, &[b"x\ny\n"]);
        assert_eq!(
            lines(&inp, "[line.upper() for line in inp]"),
            v(&[b"X\n", b"Y\n"])
        );
        assert!(eval(py, "iter(inp) is inp", &[("inp", &inp)])
            .unwrap()
            .is_truthy()
            .unwrap());
    });
}

#[test]
fn an_empty_body_reads_as_empty_everywhere() {
    with_py(|py| {
        let inp = over(py, &[]);
        assert_eq!(read(&inp, "inp.read()"), b"");
        assert_eq!(read(&inp, "inp.read(10)"), b"");
        assert_eq!(read(&inp, "inp.readline()"), b"");
        assert_eq!(lines(&inp, "inp.readlines()"), v(&[]));
        assert_eq!(lines(&inp, "list(inp)"), v(&[]));
    });
}

/// A body of `len` bytes counting up, with a newline every `line` bytes.
fn pattern(len: usize, line: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i % line == line - 1 {
                b'\n'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect()
}

#[test]
fn the_body_is_read_from_the_server_in_blocks_of_64_kib() {
    with_py(|py| {
        let body = ChunkBody::of(&[&vec![b'x'; 3 * READ_BLOCK]]);
        let reads = body.reads.clone();
        let inp = input(py, body);
        assert_eq!(read(&inp, "inp.read(10)"), vec![b'x'; 10]);
        assert_eq!(
            *reads.lock().unwrap(),
            [64 * 1024],
            "a small read does not take the whole body"
        );
        assert_eq!(read(&inp, "inp.read()").len(), 3 * READ_BLOCK - 10);
        assert!(reads.lock().unwrap().iter().all(|&n| n == 64 * 1024));
    });
}

#[test]
fn read_with_a_size_crosses_block_boundaries() {
    with_py(|py| {
        let body = pattern(3 * READ_BLOCK + 100, 1000);
        let inp = over(py, &[&body]);
        let first = read(&inp, &format!("inp.read({})", READ_BLOCK + 7));
        assert_eq!(first, body[..READ_BLOCK + 7]);
        let second = read(&inp, &format!("inp.read({})", 2 * READ_BLOCK));
        assert_eq!(second, body[READ_BLOCK + 7..3 * READ_BLOCK + 7]);
        assert_eq!(read(&inp, "inp.read()"), body[3 * READ_BLOCK + 7..]);
    });
}

#[test]
fn a_line_across_the_block_boundary_comes_whole() {
    with_py(|py| {
        // The first line ends 10 bytes into the second block; the next one is
        // longer than two blocks.
        let mut body = vec![b'a'; READ_BLOCK + 9];
        body.push(b'\n');
        body.extend(vec![b'b'; 2 * READ_BLOCK + 5]);
        body.extend(b"\nend");
        let inp = over(py, &[&body]);
        let first = read(&inp, "inp.readline()");
        assert_eq!(first.len(), READ_BLOCK + 10);
        assert_eq!(first, body[..READ_BLOCK + 10]);
        let limited = read(&inp, &format!("inp.readline({})", READ_BLOCK + 3));
        assert_eq!(limited, vec![b'b'; READ_BLOCK + 3]);
        assert_eq!(
            read(&inp, "inp.readline()"),
            [vec![b'b'; READ_BLOCK + 2], b"\n".to_vec()].concat()
        );
        assert_eq!(read(&inp, "inp.readline()"), b"end");
    });
}

#[test]
fn a_line_in_many_small_chunks_comes_whole() {
    with_py(|py| {
        let body = pattern(200_000, 70_000);
        let chunks: Vec<&[u8]> = body.chunks(1000).collect();
        let inp = over(py, &chunks);
        let got = lines(&inp, "list(inp)");
        let want: Vec<Vec<u8>> = body
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got, want);
    });
}

fn failing_after(data: &[u8]) -> ChunkBody {
    ChunkBody::new(vec![
        Ok(data.to_vec()),
        Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )),
        Ok(b"never read".to_vec()),
    ])
}

#[test]
fn an_io_error_from_the_body_is_an_oserror() {
    with_py(|py| {
        for call in [
            "inp.read()",
            "inp.read(100)",
            "inp.readline()",
            "inp.readlines()",
            "list(inp)",
        ] {
            let inp = input(py, failing_after(b"abc"));
            assert_eq!(
                raised(py, eval(py, call, &[("inp", &inp)])),
                "OSError: reading the request body failed: connection reset by peer",
                "{call}"
            );
        }
        let inp = input(py, failing_after(b"abc"));
        assert!(eval(py, "inp.read()", &[("inp", &inp)])
            .unwrap_err()
            .is_instance_of::<pyo3::exceptions::PyOSError>(py));
    });
}

#[test]
fn bytes_before_an_io_error_are_read_and_the_body_is_not_read_after_it() {
    with_py(|py| {
        let body = failing_after(b"line\nmore");
        let reads = body.reads.clone();
        let inp = input(py, body);
        assert_eq!(read(&inp, "inp.readline()"), b"line\n");
        assert!(eval(py, "inp.read()", &[("inp", &inp)]).is_err());
        assert_eq!(reads.lock().unwrap().len(), 2);
        assert_eq!(read(&inp, "inp.read()"), b"more");
        assert_eq!(read(&inp, "inp.read()"), b"");
        assert_eq!(reads.lock().unwrap().len(), 2, "the body is over");
    });
}

#[test]
fn after_detach_the_input_reads_as_empty_and_lets_the_body_go() {
    with_py(|py| {
        let body = ChunkBody::of(&[b"unread body"]);
        let reads = body.reads.clone();
        let inp = Bound::new(py, Input::new(Box::new(body))).unwrap();
        inp.borrow_mut().detach();
        assert_eq!(
            std::sync::Arc::strong_count(&reads),
            1,
            "the body was dropped"
        );
        let inp = inp.into_any();
        assert_eq!(read(&inp, "inp.read()"), b"");
        assert_eq!(read(&inp, "inp.read(5)"), b"");
        assert_eq!(read(&inp, "inp.readline()"), b"");
        assert_eq!(lines(&inp, "list(inp)"), v(&[]));
        assert!(reads.lock().unwrap().is_empty());
    });
}

// Once the request is over, what was already read from the server is gone too.
#[test]
fn after_detach_even_buffered_bytes_read_as_empty() {
    with_py(|py| {
        let inp = Bound::new(py, Input::new(Box::new(ChunkBody::of(&[b"one\ntwo\n"])))).unwrap();
        let any = inp.clone().into_any();
        assert_eq!(read(&any, "inp.readline()"), b"one\n");
        inp.borrow_mut().detach();
        assert_eq!(read(&any, "inp.read()"), b"");
    });
}
