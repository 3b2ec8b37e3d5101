//! Gateway runs Python WSGI applications inside Apache httpd and nginx.
//!
//! The crate is organised by responsibility:
//! - [`common`]: server-neutral pieces: configuration values, the CGI view of a
//!   request, logging.
//! - [`python`]: the embedded interpreter and the WSGI protocol on top of it.
//! - [`daemon`]: daemon mode: the wire protocol, the server-side client, the
//!   supervisor and the daemon processes (the `gateway-daemon` executable).
//! - `apache` / `nginx`: one server each, built with the cargo feature of that name
//!   and linked with that server's C shim from `c-shim/`.

pub mod common;
pub mod daemon;
pub mod dispatch;
pub mod python;

#[cfg(feature = "apache")]
pub mod apache;

#[cfg(feature = "nginx")]
pub mod nginx;
