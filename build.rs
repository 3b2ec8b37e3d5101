//! Builds the server shim selected by the cargo feature (`apache` or `nginx`) and
//! generates Rust bindings for that server's structures. Without a feature only the
//! server-neutral core is built (that is what `cargo test` does).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=APXS");
    println!("cargo:rerun-if-env-changed=LIBCLANG_PATH");
    println!("cargo:rerun-if-env-changed=NGINX_SRC");
    let apache = env::var_os("CARGO_FEATURE_APACHE").is_some();
    let nginx = env::var_os("CARGO_FEATURE_NGINX").is_some();
    if apache && nginx {
        fail("features `apache` and `nginx` are exclusive: build each module separately (see the Makefile)");
    }
    link_python_for_executables();
    if apache || nginx {
        check_libclang();
    }
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

/// Stops the build unless libclang, which bindgen loads, can be found: in
/// LIBCLANG_PATH when that is set, else where Debian puts it (every installed LLVM
/// version's lib directory, the multiarch directory, /usr/lib).
fn check_libclang() {
    let dirs: Vec<PathBuf> = match env::var("LIBCLANG_PATH") {
        Ok(dir) => vec![PathBuf::from(dir)],
        Err(_) => {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter_map(|name| {
                    if name.starts_with("llvm-") {
                        Some(Path::new("/usr/lib").join(name).join("lib"))
                    } else if name.contains("-linux-") {
                        Some(Path::new("/usr/lib").join(name))
                    } else {
                        None
                    }
                })
                .collect();
            dirs.push(PathBuf::from("/usr/lib"));
            dirs
        }
    };
    let found = dirs.iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|mut entries| {
            entries
                .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libclang")))
        })
    });
    if !found {
        fail("libclang is needed to generate the server bindings: install it (Debian: apt-get install libclang-dev) or set LIBCLANG_PATH to the directory that holds libclang.so");
    }
}

/// A shim may call only what a header declares: a Rust entry point missing from the
/// shim's header would otherwise be called through C's implicit `int f()`.
const NO_UNDECLARED_CALLS: &str = "-Werror=implicit-function-declaration";

/// The Apache shim and the header that declares what it and the Rust side call of each other.
const APACHE_SHIM: &str = "mod_gateway.c";
const APACHE_ABI: &str = "mod_gateway.h";

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

    let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("c-shim");
    println!(
        "cargo:rerun-if-changed={}",
        shim.join(APACHE_SHIM).display()
    );
    println!("cargo:rerun-if-changed={}", shim.join(APACHE_ABI).display());
    let mut cc = cc::Build::new();
    cc.file(shim.join(APACHE_SHIM))
        .warnings(true)
        .extra_warnings(true)
        .flag_if_supported("-Wno-missing-field-initializers");
    cc.flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported(NO_UNDECLARED_CALLS);
    for dir in &includes {
        cc.include(dir);
    }
    for (k, v) in defines {
        cc.define(k, v);
    }
    cc.compile("gateway_apache_shim");
    let mut headers = bindgen::Builder::default().header_contents(
        "apache.h",
        "#include \"httpd.h\"\n#include \"http_config.h\"\n#include \"http_core.h\"\n\
         #include \"http_log.h\"\n#include \"http_protocol.h\"\n#include \"http_request.h\"\n\
         #include \"ap_mpm.h\"\n#include \"apr_strings.h\"\n#include \"apr_file_io.h\"\n\
         #include \"apr_portable.h\"\n#include \"unixd.h\"\n#include \"mod_gateway.h\"\n",
    );
    for dir in includes.iter().chain([&shim]) {
        headers = headers.clang_arg(format!("-I{}", dir.display()));
    }
    for (k, _) in defines {
        headers = headers.clang_arg(format!("-D{k}"));
    }
    let bg = headers
        .clone()
        .allowlist_type("request_rec|conn_rec|server_rec|cmd_parms|ap_directive_t|apr_table_entry_t|apr_array_header_t|module|unixd_config_rec")
        .allowlist_function(
            "ap_(find_linked_module|state_query|mpm_query|run_http_scheme|discard_request_body|get_server_name|get_server_port|setup_client_block|should_client_block|get_client_block|set_content_type|set_content_length|check_cmd_context|server_root_relative|runtime_dir_relative|get_module_config)|\
             apr_(table_add|table_get|table_elts|pstrdup|pstrmemdup|pool_cleanup_register|pool_cleanup_null|os_file_put|palloc|strerror|pool_userdata_get|pool_userdata_set)|\
             gateway_ap_.*",
        )
        .allowlist_var("ap_unixd_config|AP_SQ_.*|AP_MPMQ_.*|APLOG_.*|REQUEST_CHUNKED_.*|HTTP_.*|OK|DECLINED|DONE|GLOBAL_ONLY|NOT_IN_.*|APR_SUCCESS|APR_FOPEN_.*|AP_CONN_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false);
    let bindings = bg
        .generate()
        .unwrap_or_else(|e| fail(&format!("generating Apache bindings failed: {e}")));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("apache_bindings.rs");
    bindings.write_to_file(out).expect("write Apache bindings");
    generate_abi(headers, APACHE_ABI, "gateway_ap_.*", "apache");
}

/// Where nginx-dev puts the sources Debian's nginx was built from.
const NGINX_SRC: &str = "/usr/share/nginx/src";

/// The directory of the shim with its nginx add-on `config` file.
const NGINX_ADDON: &str = "c-shim/nginx";

/// The nginx shim and the header that declares what it and the Rust side call of each other.
const NGINX_SHIM: &str = "ngx_http_gateway_module.c";
const NGINX_ABI: &str = "ngx_http_gateway_module.h";

/// Struct layouts of nginx depend on its version and configure flags, so the shim and
/// the bindings are built against a copy of the distribution's sources configured with
/// the distribution's flags (`conf_flags`), plus this module as a dynamic add-on.
fn build_nginx() {
    let src = PathBuf::from(env::var("NGINX_SRC").unwrap_or_else(|_| NGINX_SRC.into()));
    for needed in ["configure", "conf_flags", "src/core/nginx.h"] {
        if !src.join(needed).exists() {
            fail(&format!(
                "nginx sources not found ({} is missing): install them (Debian: apt-get install nginx-dev) or set NGINX_SRC=/path/to/configured-source-tree",
                src.join(needed).display()
            ));
        }
    }
    let version = nginx_version(&src);
    let addon = Path::new(env!("CARGO_MANIFEST_DIR")).join(NGINX_ADDON);
    println!("cargo:rerun-if-changed={}", addon.join("config").display());
    let tree = configured_nginx(&src, &version, &addon);
    let objs = tree.join("objs");
    let includes = nginx_includes(&tree);
    let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("c-shim");
    println!("cargo:rerun-if-changed={}", shim.join(NGINX_SHIM).display());
    println!("cargo:rerun-if-changed={}", shim.join(NGINX_ABI).display());
    let mut cc = cc::Build::new();
    cc.file(shim.join(NGINX_SHIM))
        .file(objs.join("ngx_http_gateway_module_modules.c"));
    cc.warnings(true)
        .flag_if_supported("-Wpointer-arith")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported(NO_UNDECLARED_CALLS);
    for dir in &includes {
        cc.include(dir);
    }
    cc.compile("gateway_nginx_shim");
    let mut headers = bindgen::Builder::default().header_contents(
        "nginx.h",
        "#include <ngx_config.h>\n#include <ngx_core.h>\n#include <ngx_http.h>\n\
         #include \"ngx_http_gateway_module.h\"\n",
    );
    for dir in includes.iter().chain([&shim]) {
        headers = headers.clang_arg(format!("-I{}", dir.display()));
    }
    let bg = headers
        .clone()
        .allowlist_type(
            "ngx_http_request_t|ngx_conf_t|ngx_command_t|ngx_http_core_loc_conf_t|ngx_http_core_srv_conf_t|ngx_buf_t|ngx_chain_t|\
             ngx_table_elt_t|ngx_list_part_t|ngx_pool_cleanup_t|ngx_pool_cleanup_file_t|ngx_connection_t|ngx_event_t|ngx_cycle_t|\
             ngx_http_request_body_t|ngx_file_t|ngx_module_t|ngx_uid_t|ngx_gid_t",
        )
        .allowlist_function(
            "ngx_http_(read_client_request_body|read_unbuffered_request_body|finalize_request|send_header|output_filter|send_special|run_posted_requests|request_empty_handler|block_reading)|\
             ngx_(chain_get_free_buf|chain_update_chains|list_push|pnalloc|pcalloc|palloc|pool_cleanup_add|pool_cleanup_file|\
             connection_local_sockaddr|inet_get_port|handle_write_event|close_connection|set_environment)|\
             gateway_ngx_.*",
        )
        .allowlist_var("NGX_OK|NGX_ERROR|NGX_AGAIN|NGX_DONE|NGX_DECLINED|NGX_HTTP_[A-Z_0-9]+|NGX_LOG_[A-Z]+|NGX_PROCESS_[A-Z]+|ngx_process|ngx_exiting|ngx_terminate|ngx_cycle|environ")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false);
    let bindings = bg
        .generate()
        .unwrap_or_else(|e| fail(&format!("generating nginx bindings failed: {e}")));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("nginx_bindings.rs");
    bindings.write_to_file(out).expect("write nginx bindings");
    generate_abi(headers, NGINX_ABI, "gateway_ngx_.*", "nginx");
}

/// Declarations of the Rust entry points that the shim's header `abi` declares (every
/// function there but the C helpers, named like `helpers`), written to `SERVER_abi.rs`
/// as the input of `same_signatures!`, with which src/SERVER/abi.rs checks the Rust
/// definitions against them (types are named as in the server's bindings).
fn generate_abi(headers: bindgen::Builder, abi: &str, helpers: &str, server: &str) {
    let declarations = headers
        .allowlist_file(format!(".*/{}", abi.replace('.', "\\.")))
        .blocklist_function(helpers)
        .allowlist_recursively(false)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .unwrap_or_else(|e| fail(&format!("generating the declarations of {abi} failed: {e}")));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join(format!("{server}_abi.rs"));
    std::fs::write(out, format!("same_signatures! {{\n{declarations}}}\n"))
        .expect("write the ABI declarations");
}

/// The include directories configure chose for this nginx (`ALL_INCS` in objs/Makefile):
/// they follow its version and flags (nginx 1.25 and later built `--with-http_v3_module`
/// need src/event/quic and src/http/v3). Relative ones are under the configured sources.
fn nginx_includes(tree: &Path) -> Vec<PathBuf> {
    let makefile = std::fs::read_to_string(tree.join("objs/Makefile")).unwrap_or_default();
    let mut words = Vec::new();
    let mut in_incs = false;
    for line in makefile.lines() {
        if let Some(rest) = line.strip_prefix("ALL_INCS") {
            in_incs = true;
            words.extend(rest.trim_start().trim_start_matches('=').split_whitespace());
        } else if in_incs {
            words.extend(line.split_whitespace());
        }
        if in_incs && !line.trim_end().ends_with('\\') {
            break;
        }
    }
    let includes: Vec<PathBuf> = words
        .windows(2)
        .filter(|w| w[0] == "-I")
        .map(|w| tree.join("src").join(w[1]))
        .collect();
    if includes.is_empty() {
        fail(&format!(
            "cannot find ALL_INCS in {}: remove that directory to configure the nginx sources again",
            tree.join("objs/Makefile").display()
        ));
    }
    includes
}

/// The version in the sources' `nginx.h`.
fn nginx_version(src: &Path) -> String {
    let header = std::fs::read_to_string(src.join("src/core/nginx.h")).unwrap_or_default();
    header
        .lines()
        .find_map(|l| {
            l.strip_prefix("#define NGINX_VERSION")
                .map(|v| v.trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| fail("cannot find NGINX_VERSION in the nginx sources' src/core/nginx.h"))
}

/// A configured copy of the nginx sources, made once per nginx version and add-on
/// `config` (configure takes seconds) and kept in the cargo target directory.
fn configured_nginx(src: &Path, version: &str, addon: &Path) -> PathBuf {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    // The target directory is marked by cargo's CACHEDIR.TAG; OUT_DIR changes with every build hash.
    let cache = out
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").exists())
        .unwrap_or(&out)
        .join(format!("nginx-{version}"));
    let key = format!(
        "{version}\n{}\n{}\n",
        std::fs::read_to_string(src.join("conf_flags")).unwrap_or_default(),
        std::fs::read_to_string(addon.join("config")).unwrap_or_default()
    );
    let stamp = cache.join("configured");
    if std::fs::read_to_string(&stamp).is_ok_and(|k| k == key)
        && cache
            .join("objs/ngx_http_gateway_module_modules.c")
            .exists()
    {
        return cache;
    }
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache)
        .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", cache.display())));
    // The distribution's tree is read-only: configure a copy.
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(cache.join("src"))
        .status();
    if !copied.is_ok_and(|s| s.success()) {
        fail(&format!(
            "copying {} to {} failed",
            src.display(),
            cache.display()
        ));
    }
    let script = format!(
        ". ./conf_flags && ./configure \"${{NGX_CONF_FLAGS[@]}}\" --add-dynamic-module='{}' --builddir='{}'",
        addon.display(),
        cache.join("objs").display()
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(cache.join("src"))
        .output();
    match output {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!(
            "configuring the nginx sources failed (missing build dependencies of nginx? Debian: apt-get build-dep nginx):\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => fail(&format!("cannot run bash to configure the nginx sources: {e}")),
    }
    std::fs::write(&stamp, key).expect("write the configure stamp");
    cache
}
