//! Apache httpd 2.4: configuration directives, hooks, and embedded requests.
//! The module record and directive table live in `c-shim/mod_gateway.c`.

mod config;
mod ffi;
mod hooks;
mod request;
