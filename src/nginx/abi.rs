//! The Rust entry points that c-shim/ngx_http_gateway_module.c calls have exactly
//! the signatures c-shim/ngx_http_gateway_module.h declares: bindgen turns the
//! header's declarations into the input of `same_signatures!` (see build.rs), which
//! fails the build on any difference, and on a declared entry point Rust lacks.

use super::config::*;
use super::daemons::*;
use super::ffi::*;
use super::request::*;
use super::runtime::*;
use super::status::*;
use crate::common::abi::same_signatures;

include!(concat!(env!("OUT_DIR"), "/nginx_abi.rs"));
