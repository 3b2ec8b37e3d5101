//! The daemon side: any bytes on a connection to a daemon's socket decode into
//! frames and requests, or into an error, never a panic or an overread.
#![no_main]

use gateway::daemon::protocol::{self, Kind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut payload = Vec::new();
    while let Ok(Some((kind, _flags))) = protocol::read_frame(&mut input, &mut payload) {
        if kind == Kind::Request {
            let _ = protocol::decode_request(&payload);
        }
    }
});
