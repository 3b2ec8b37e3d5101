//! Gateway runs Python WSGI applications inside Apache httpd and nginx.
//!
//! The crate is in layers (docs/ARCHITECTURE.md; `layers.rs` checks them), each
//! using only those below it:
//! - [`common`]: server- and protocol-neutral values: configuration, mount
//!   points, the CGI view of a request, the transport seam between a server and
//!   what runs its requests, logging, the panic guard.
//! - [`ops`]: the status page: the scoreboard in shared memory and its rendering.
//! - [`python`]: the embedded interpreter and one folder per Python protocol.
//! - [`daemon`]: daemon mode: the wire protocol, the server-side client, the
//!   supervisor and the daemon processes (the `gateway-daemon` executable).
//! - [`dispatch`]: where a request runs (embedded or a daemon group), for both servers.
//! - `apache` / `nginx`: one server each, built with the cargo feature of that name
//!   and linked with that server's C shim from `c-shim/`.

pub mod common;
pub mod daemon;
pub mod dispatch;
pub mod ops;
pub mod python;

#[cfg(test)]
mod layers;

#[cfg(feature = "apache")]
pub mod apache;

#[cfg(feature = "nginx")]
pub mod nginx;
