//! The status page (`gateway_status;`): answered at once on the event loop,
//! from the scoreboards, through a response channel that collects the page and
//! then hands it to nginx whole.

use std::io;
use std::os::fd::RawFd;

use super::ffi::*;
use super::records::{self, Request};
use super::runtime::log_line;
use crate::common::log::request_line;
use crate::common::panic::catch;
use crate::common::transport::{Header, ResponseChannel};
use crate::dispatch;

/// The page as the renderer sends it.
#[derive(Default)]
struct Collected {
    status: u16,
    content_type: Vec<u8>,
    body: Vec<u8>,
}

impl ResponseChannel for Collected {
    fn start(&mut self, status: u16, _line: &str, headers: &[Header]) -> io::Result<()> {
        self.status = status;
        if let Some((_, value)) = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        {
            self.content_type = value.clone();
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8], _flush: bool) -> io::Result<()> {
        self.body.extend_from_slice(data);
        Ok(())
    }

    fn send_file(&mut self, _fd: RawFd, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::other("the status page sends no files"))
    }

    fn abort(&mut self) {}

    fn log(&self, level: log::Level, line: &str) {
        log_line(level, line);
    }
}

/// The content handler of a `gateway_status` location (after the shim
/// discarded any request body).
#[no_mangle]
pub unsafe extern "C" fn gateway_status_request(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request of its content phase, on the loop thread.
    let r = unsafe { Request::from_raw(r) };
    catch(|| status(r)).unwrap_or_else(|p| {
        let why = format!("{p} in the status page");
        let line = request_line(r.method(), r.unparsed_uri(), &why);
        log_line(log::Level::Error, &line);
        records::status(NGX_HTTP_INTERNAL_SERVER_ERROR)
    })
}

fn status(r: Request<'_>) -> ngx_int_t {
    let accept = r
        .headers()
        .find(|(name, _)| name.eq_ignore_ascii_case(b"accept"))
        .map(|(_, value)| value);
    let mut page = Collected::default();
    dispatch::status("nginx", r.args(), accept, &mut page);
    r.send_whole(page.status, &page.content_type, &page.body)
}
