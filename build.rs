//! Builds the server shim selected by the cargo feature (`apache` or `nginx`) and
//! generates Rust bindings for that server's structures. Without a feature only the
//! server-neutral core is built (that is what `cargo test` does).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=APXS");
    let apache = env::var_os("CARGO_FEATURE_APACHE").is_some();
    let nginx = env::var_os("CARGO_FEATURE_NGINX").is_some();
    if apache && nginx {
        fail("features `apache` and `nginx` are exclusive: build each module separately (see the Makefile)");
    }
    link_python_for_executables();
    if apache {
        build_apache();
    }
    if nginx {
        build_nginx();
    }
}

/// The daemon executable finds libpython where the selected Python has it, even
/// outside the loader's default directories.
fn link_python_for_executables() {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let python = env::var("PYO3_PYTHON").unwrap_or_else(|_| "python3".into());
    let libdir = query(
        &python,
        &[
            "-c",
            "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')",
        ],
    );
    if let Some(libdir) = libdir.filter(|d| !d.is_empty()) {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{libdir}");
    }
}

/// Stops the build with a message that says what to do.
fn fail(msg: &str) -> ! {
    eprintln!("\nerror: {msg}\n");
    std::process::exit(1);
}

/// Runs a tool and returns its trimmed standard output, or None if it cannot run.
fn query(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn check_libclang() {
    let found = env::var_os("LIBCLANG_PATH").is_some()
        || [
            "/usr/lib/llvm-14/lib",
            "/usr/lib/llvm-15/lib",
            "/usr/lib/llvm-16/lib",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib",
        ]
        .iter()
        .any(|d| {
            std::fs::read_dir(d).is_ok_and(|mut entries| {
                entries.any(|e| {
                    e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libclang"))
                })
            })
        });
    if !found {
        fail("libclang is needed to generate the server bindings: install it (Debian: apt-get install libclang-dev) or set LIBCLANG_PATH");
    }
}

fn build_apache() {
    let apxs = env::var("APXS").unwrap_or_else(|_| "apxs".into());
    let includedir = query(&apxs, &["-q", "INCLUDEDIR"]).unwrap_or_default();
    if includedir.is_empty() || !Path::new(&includedir).join("httpd.h").exists() {
        fail("Apache httpd headers not found: install them (Debian: apt-get install apache2-dev) or set APXS=/path/to/apxs");
    }
    let mut includes = vec![PathBuf::from(&includedir)];
    for tool in ["apr-1-config", "apu-1-config"] {
        let flags = query(tool, &["--includes"]).unwrap_or_default();
        includes.extend(
            flags
                .split_whitespace()
                .filter_map(|f| f.strip_prefix("-I"))
                .map(PathBuf::from),
        );
    }
    if !includes.iter().any(|d| d.join("apr.h").exists()) {
        fail("APR headers not found: install them (Debian: apt-get install libapr1-dev libaprutil1-dev, pulled in by apache2-dev)");
    }
    let defines = [("LINUX", None), ("_REENTRANT", None), ("_GNU_SOURCE", None)];

    let shim = "c-shim/mod_gateway.c";
    println!("cargo:rerun-if-changed={shim}");
    let mut cc = cc::Build::new();
    cc.file(shim)
        .warnings(true)
        .extra_warnings(true)
        .flag_if_supported("-Wno-missing-field-initializers");
    cc.flag_if_supported("-Wno-unused-parameter");
    for dir in &includes {
        cc.include(dir);
    }
    for (k, v) in defines {
        cc.define(k, v);
    }
    cc.compile("gateway_apache_shim");

    check_libclang();
    let mut bg = bindgen::Builder::default()
        .header_contents(
            "apache.h",
            "#include \"httpd.h\"\n#include \"http_config.h\"\n#include \"http_core.h\"\n\
             #include \"http_log.h\"\n#include \"http_protocol.h\"\n#include \"http_request.h\"\n\
             #include \"ap_mpm.h\"\n#include \"apr_strings.h\"\n#include \"apr_file_io.h\"\n\
             #include \"apr_portable.h\"\n#include \"unixd.h\"\n",
        )
        .allowlist_type("request_rec|conn_rec|server_rec|cmd_parms|ap_directive_t|apr_table_entry_t|apr_array_header_t|module|unixd_config_rec")
        .allowlist_function(
            "ap_(find_linked_module|state_query|mpm_query|run_http_scheme|discard_request_body|get_server_name|get_server_port|setup_client_block|should_client_block|get_client_block|set_content_type|set_content_length|check_cmd_context|server_root_relative|runtime_dir_relative|get_module_config)|\
             apr_(table_add|table_get|table_elts|pstrdup|pstrmemdup|pool_cleanup_register|pool_cleanup_null|os_file_put|palloc|strerror|pool_userdata_get|pool_userdata_set)",
        )
        .allowlist_var("ap_unixd_config|AP_SQ_.*|AP_MPMQ_.*|APLOG_.*|REQUEST_CHUNKED_.*|HTTP_.*|OK|DECLINED|DONE|GLOBAL_ONLY|NOT_IN_.*|APR_SUCCESS|APR_FOPEN_.*|AP_CONN_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false);
    for dir in &includes {
        bg = bg.clang_arg(format!("-I{}", dir.display()));
    }
    for (k, _) in defines {
        bg = bg.clang_arg(format!("-D{k}"));
    }
    let bindings = bg
        .generate()
        .unwrap_or_else(|e| fail(&format!("generating Apache bindings failed: {e}")));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("apache_bindings.rs");
    bindings.write_to_file(out).expect("write Apache bindings");
}

fn build_nginx() {
    fail("the nginx module is not part of this build yet");
}
