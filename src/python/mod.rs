//! The Python side: the embedded interpreter, loading applications, and the WSGI
//! protocol. Server-neutral: servers plug in through [`RequestBody`] and
//! [`ResponseChannel`].

pub mod app;
pub mod input;
pub mod interpreter;
pub mod log_stream;
pub mod response;
pub mod wsgi;

pub use input::RequestBody;
pub use response::{Header, ResponseChannel};
pub use wsgi::{Outcome, Request, ServerInfo};

#[cfg(test)]
mod test_support;
