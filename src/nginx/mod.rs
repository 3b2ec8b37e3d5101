//! nginx: configuration directives, the daemon supervisor's start in the master,
//! the per-worker threads, and requests handed from the event loop to those
//! threads (which run them embedded or forward them to a daemon group) and back.
//! The module, its context and directive table live in
//! `c-shim/ngx_http_gateway_module.c`; the functions each side calls of the other
//! are declared in `c-shim/ngx_http_gateway_module.h`.

mod abi;
mod config;
mod daemons;
mod exchange;
mod ffi;
mod handoff;
mod inherit;
mod records;
mod request;
mod runtime;
mod status;
