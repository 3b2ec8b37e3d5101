//! Server-neutral building blocks shared by every server and mode.

#[cfg(any(feature = "apache", feature = "nginx"))]
pub(crate) mod abi;
pub mod account;
pub mod cgi;
pub mod config;
pub mod framing;
pub mod inbound;
pub mod log;
pub mod mount;
pub mod panic;
pub mod socket;
pub mod thread;
pub mod transport;

/// The version reported as `gateway.version` and in log lines.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
