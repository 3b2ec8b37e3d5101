//! The layers of docs/ARCHITECTURE.md, checked: a module may name (as
//! `crate::LAYER`) only the layers below it.

use std::path::Path;

/// The layers a source file may name, by the file's place under `src/`.
fn allowed(file: &str) -> &'static [&'static str] {
    match file.split('/').next().unwrap_or("") {
        "common" => &["common"],
        "ops" => &["common", "ops"],
        "python" => &["common", "python"],
        // The daemon process runs Python, and the supervisor checks python-home.
        "daemon" if file == "daemon/worker.rs" || file == "daemon/supervisor.rs" => {
            &["common", "ops", "daemon", "python"]
        }
        "daemon" => &["common", "ops", "daemon"],
        "dispatch.rs" => &["common", "ops", "python", "daemon", "dispatch"],
        "apache" => &["common", "ops", "python", "daemon", "dispatch", "apache"],
        "nginx" => &["common", "ops", "python", "daemon", "dispatch", "nginx"],
        _ => &[
            "common", "ops", "python", "daemon", "dispatch", "apache", "nginx",
        ],
    }
}

/// The layers a source text names as `crate::NAME`.
fn named(text: &str) -> Vec<&str> {
    text.match_indices("crate::")
        .filter(|(at, _)| !text[..*at].ends_with('$'))
        .map(|(at, m)| {
            let rest = &text[at + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn each_layer_names_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut breaches = Vec::new();
    for path in &files {
        let file = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if file == "layers.rs" {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let ok = allowed(&file);
        for layer in named(&text) {
            if !ok.contains(&layer) {
                breaches.push(format!("src/{file} names crate::{layer}"));
            }
        }
    }
    assert!(files.len() > 30, "found only {} files", files.len());
    assert!(
        breaches.is_empty(),
        "layers crossed:\n{}",
        breaches.join("\n")
    );
}

#[test]
fn the_check_sees_what_a_file_names() {
    let text = "use crate::python::wsgi;\nlet x = crate::common::VERSION; $crate::no";
    assert_eq!(named(text), ["python", "common"]);
    assert!(!allowed("daemon/client.rs").contains(&"python"));
    assert!(!allowed("apache/hooks.rs").contains(&"nginx"));
    assert!(!allowed("ops/render.rs").contains(&"daemon"));
}
