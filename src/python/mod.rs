//! The Python side: what every Python protocol shares (the embedded
//! interpreter, loading applications, the log streams) and one folder per
//! protocol on top of it ([`wsgi`] today). Server-neutral: servers plug in
//! through the traits of [`crate::common::transport`].

pub mod app;
pub mod interpreter;
pub mod log_stream;
pub mod wsgi;

pub use wsgi::ServerInfo;

#[cfg(test)]
mod test_support;
