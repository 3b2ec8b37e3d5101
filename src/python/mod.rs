//! The Python side: the embedded interpreter, loading applications, and the WSGI
//! protocol. Server-neutral: servers plug in through the traits of
//! [`crate::common::transport`].

pub mod app;
pub mod input;
pub mod interpreter;
pub mod log_stream;
pub mod response;
pub mod wsgi;

pub use wsgi::ServerInfo;

#[cfg(test)]
mod test_support;
