//! What the layers ask of a socket descriptor without owning it.

use std::io;
use std::os::fd::RawFd;

/// Whether the peer of socket `fd` closed its side (or the socket broke),
/// without waiting. Bytes waiting to be read (a pipelined request) say no.
pub fn peer_closed(fd: RawFd) -> bool {
    let mut polled = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: polls one pollfd on our stack, without waiting.
    if unsafe { libc::poll(&mut polled, 1, 0) } <= 0 {
        return false;
    }
    if polled.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        return true;
    }
    let mut byte = 0u8;
    // SAFETY: peeks at most one byte into a local, without waiting.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
}

/// Waits up to `timeout` for socket `fd` to have bytes to read (or an end of
/// file, or an error); false when the time passed first.
pub fn readable_within(fd: RawFd, timeout: std::time::Duration) -> bool {
    let mut polled = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: polls one pollfd on our stack.
        let n = unsafe { libc::poll(&mut polled, 1, ms) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return n != 0;
        }
    }
}
