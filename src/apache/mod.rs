//! Apache httpd 2.4: configuration directives, hooks, and embedded requests.
//! The module record and directive table live in `c-shim/mod_gateway.c`; the
//! functions each side calls of the other are declared in `c-shim/mod_gateway.h`.

mod abi;
mod config;
mod ffi;
mod hooks;
mod records;
mod request;
