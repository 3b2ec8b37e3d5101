//! The Rust entry points that c-shim/mod_gateway.c calls have exactly the
//! signatures c-shim/mod_gateway.h declares: bindgen turns the header's
//! declarations into the input of `same_signatures!` (see build.rs), which fails
//! the build on any difference, and on a declared entry point Rust lacks.

use super::config::*;
use super::ffi::*;
use super::hooks::*;
use crate::common::abi::same_signatures;

include!(concat!(env!("OUT_DIR"), "/apache_abi.rs"));
