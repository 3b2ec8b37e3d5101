//! The daemon side: any bytes on a connection to a daemon's socket decode into
//! frames and requests, or into an error, never a panic or an overread.
#![no_main]

use gateway::daemon::protocol::{self, Kind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A connection's first frame must be an authentication.
    if let Some(h) = data.first_chunk::<{ protocol::HEADER_LEN }>() {
        let _ = protocol::auth_frame_len(h);
    }
    let mut input = data;
    let mut payload = Vec::new();
    while let Ok(Some((kind, _flags))) = protocol::read_frame(&mut input, &mut payload) {
        if kind == Kind::Request {
            let _ = protocol::decode_request(&payload);
        } else if kind == Kind::Hello {
            let _ = protocol::decode_hello(&payload);
        }
    }
});
