//! Builds the reference plugins in `../plugins` for `wasm32-wasip2` and exposes them to the
//! crate: `P0RT_BUNDLED_PLUGINS` (embedded in the binary) and `P0RT_FIXTURE_PLUGINS` (hostile
//! test fixtures, used only by tests). The nested build uses its own target directory, so it
//! never waits on the outer build's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

const BUNDLED: [&str; 3] = ["words", "ratelimit", "scan_guard"];
const FIXTURES: [&str; 2] = ["fixture_hostile", "fixture_old_version"];

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
        "plugins/fixtures/hostile",
        "plugins/fixtures/old-version",
        "host/src/words.txt",
    ] {
        println!("cargo:rerun-if-changed={}", repo.join(path).display());
    }

    let target_dir = plugins.join("target");
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
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let bundled = out.join("bundled");
    let fixtures = out.join("fixtures");
    copy_all(&built, &bundled, &BUNDLED);
    copy_all(&built, &fixtures, &FIXTURES);
    println!("cargo:rustc-env=P0RT_BUNDLED_PLUGINS={}", bundled.display());
    println!(
        "cargo:rustc-env=P0RT_FIXTURE_PLUGINS={}",
        fixtures.display()
    );
}

fn copy_all(from: &Path, to: &Path, names: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for name in names {
        let file = format!("{name}.wasm");
        std::fs::copy(from.join(&file), to.join(&file))
            .unwrap_or_else(|e| panic!("plugin {file} was not built: {e}"));
    }
}
