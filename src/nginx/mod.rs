//! nginx: configuration directives, the per-worker Python threads, and embedded
//! requests handed from the event loop to those threads and back.
//! The module, its context and directive table live in
//! `c-shim/ngx_http_gateway_module.c`.

mod config;
mod exchange;
mod ffi;
mod handoff;
mod request;
mod runtime;
