//! The server side: any bytes from a daemon socket (after its greeting) are
//! relayed as a well-framed response or refused. The first byte picks the
//! request method (HEAD or not), the rest is the daemon's reply.
#![no_main]

use gateway::daemon::client::fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((method, reply)) = data.split_first() {
        fuzzing::replay(reply, method & 1 == 1);
    }
});
