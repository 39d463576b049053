//! Builds the bundled reference plugins in `../plugins` (words, ratelimit, scan-guard,
//! access) for `wasm32-wasip2` and exposes them to the crate as `P0RT_BUNDLED_PLUGINS`
//! (embedded in the binary). The nested build uses its own target directory under `OUT_DIR`,
//! so it writes nothing into the source tree and never waits on the outer build's lock. The
//! test fixtures (hostile, old-version, hostile-policy) are not built here: the e2e tests
//! build them (tests/e2e/plugins.rs).

use std::path::PathBuf;
use std::process::Command;

/// Packages of the plugin workspace that ship inside the binary, and their wasm file stems.
const BUNDLED: [(&str, &str); 4] = [
    ("words", "words"),
    ("ratelimit", "ratelimit"),
    ("scan-guard", "scan_guard"),
    ("access", "access"),
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let repo = manifest_dir.parent().unwrap().to_path_buf();
    let plugins = repo.join("plugins");
    for path in [
        "wit",
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "plugins/words",
        "plugins/ratelimit",
        "plugins/scan-guard",
        "plugins/access",
        "host/src/words.txt",
    ] {
        println!("cargo:rerun-if-changed={}", repo.join(path).display());
    }

    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out.join("plugins-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&plugins)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for (package, _) in BUNDLED {
        command.args(["-p", package]);
    }
    // The outer build's settings are for the host, not for wasm.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build plugins: {e}"));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("wasm32-wasip2") && stderr.contains("target") {
            "\nThe wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`.\n"
        } else {
            ""
        };
        panic!(
            "building the bundled plugins in {} failed:{hint}\n{stderr}",
            plugins.display()
        );
    }
    let built = target_dir.join("wasm32-wasip2").join("release");
    let bundled = out.join("bundled");
    std::fs::create_dir_all(&bundled).unwrap();
    for (_, stem) in BUNDLED {
        let file = format!("{stem}.wasm");
        std::fs::copy(built.join(&file), bundled.join(&file))
            .unwrap_or_else(|e| panic!("plugin {file} was not built: {e}"));
    }
    println!("cargo:rustc-env=P0RT_BUNDLED_PLUGINS={}", bundled.display());
}
