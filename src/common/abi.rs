//! The check that keeps the Rust entry points of a server's C shim at the
//! signatures its header declares (see `src/apache/abi.rs`, `src/nginx/abi.rs`).

/// Fails the build unless each function named in bindgen's declarations (the
/// input, as build.rs writes it from a shim's header) is in scope with exactly the
/// declared signature: the function item is coerced to the declared function-pointer
/// type, which only a function of the same argument and return types can be (a safe
/// definition also coerces to the `unsafe` pointer; the safety of the body is Rust's
/// own concern, not the ABI's).
macro_rules! same_signatures {
    ($($(unsafe)? extern "C" {
        $(pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*
    })*) => {
        $($(
            const _: () = {
                let _signature_in_the_header: unsafe extern "C" fn($($ty),*) $(-> $ret)? = $name;
            };
        )*)*
    };
}
pub(crate) use same_signatures;
