//! `p0rt plugin new`: the crate it writes builds with `cargo component build --release` and
//! with plain cargo for wasm32-wasip2, its `test.sh` passes, and the component names keys in
//! a running host. Requires cargo-component (`cargo install --locked cargo-component`) and
//! the wasm32-wasip1 and wasm32-wasip2 targets.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::plugins::{install, plugins_dir, read};
use crate::support::{BIN, Host, HostConfig, Sandbox, require_tools};

/// Panics (never skips) when cargo-component is missing.
fn require_cargo_component() {
    let found = Command::new(env!("CARGO"))
        .args(["component", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "cargo-component not found: install it with `cargo install --locked cargo-component` \
         (and `rustup target add wasm32-wasip1 wasm32-wasip2`)"
    );
}

/// A cargo command for the scaffold, without the host test build's settings.
fn cargo(dir: &Path, args: &[&str], target_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(dir)
        .args(args)
        .env("CARGO_TARGET_DIR", target_dir);
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scaffolded_plugin_builds_with_cargo_component_and_serves_in_a_host() {
    require_tools();
    require_cargo_component();
    let sb = Sandbox::new();
    // Built once per machine: wit-bindgen and friends compile on the first run only.
    let target_dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scaffolded-plugins");

    let mut new = Command::new(BIN);
    new.args(["plugin", "new", "devnames", "--role", "naming", "--dir"])
        .arg(sb.path());
    let said = run(new, "p0rt plugin new");
    assert!(said.contains("cargo component build"), "{said}");
    let crate_dir = sb.join("devnames");
    for file in [
        "Cargo.toml",
        "wit/policy.wit",
        "src/lib.rs",
        "test.sh",
        "README.md",
    ] {
        assert!(crate_dir.join(file).is_file(), "{file} missing");
    }
    // Again: refused, nothing overwritten.
    let mut again = Command::new(BIN);
    again
        .args(["plugin", "new", "devnames", "--role", "naming", "--dir"])
        .arg(sb.path());
    assert!(!again.output().unwrap().status.success());
    // The bundled plugins' lock file pins the same wit-bindgen release they are built with.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/Cargo.lock"),
        crate_dir.join("Cargo.lock"),
    )
    .unwrap();

    // test.sh: cargo component build, then p0rt plugin check and run.
    let mut test = Command::new(crate_dir.join("test.sh"));
    test.current_dir(&crate_dir)
        .env("P0RT", BIN)
        .env("CARGO_TARGET_DIR", &target_dir);
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
        test.env_remove(var);
    }
    let said = run(test, "test.sh (cargo component)");
    assert!(said.contains("ok: devnames answers as expected"), "{said}");
    // And with plain cargo.
    let plain = run(
        cargo(
            &crate_dir,
            &["build", "--release", "--target", "wasm32-wasip2"],
            &target_dir,
        ),
        "cargo build --target wasm32-wasip2",
    );
    let plain_wasm = target_dir.join("wasm32-wasip2/release/devnames.wasm");
    assert!(plain_wasm.is_file(), "{plain}");
    let mut check = Command::new(BIN);
    check.args(["plugin", "check"]).arg(&plain_wasm);
    assert!(run(check, "p0rt plugin check").contains("role:      naming"));

    // The cargo-component build serves in a running host: keys get its names.
    let wasm = target_dir.join("wasm32-wasip1/release/devnames.wasm");
    let dir = plugins_dir(&sb);
    install(&dir, "devnames", &read(&wasm), None);
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--plugins-dir")
        .arg(dir.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    let key = sb.key("author");
    let info = host.info(&sb, &key).await;
    assert_eq!(
        info.name,
        format!("dev-{}", &key.key_hash()[..8]),
        "{}",
        host.log()
    );
}

/// The bundled plugins' own unit tests (lease sizes, bucket keys, word lists, access rules),
/// run natively: the root workspace's `cargo test` does not reach the plugins' workspace, so
/// without this they ran only by hand.
#[test]
fn the_bundled_plugins_own_unit_tests_pass() {
    /// Unit tests the four bundled plugins had when this test was written; fewer means some
    /// stopped running.
    const AT_LEAST: usize = 27;
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bundled-plugins-native");
    let args = [
        "test",
        "--locked",
        "-p",
        "words",
        "-p",
        "ratelimit",
        "-p",
        "scan-guard",
        "-p",
        "access",
    ];
    let out = run(
        cargo(&plugins, &args, &target_dir),
        "cargo test of the bundled plugins",
    );
    let passed: usize = out
        .lines()
        .filter_map(|line| line.strip_prefix("test result: ok. "))
        .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .sum();
    assert!(
        passed >= AT_LEAST,
        "{passed} unit tests of the bundled plugins passed, expected at least {AT_LEAST}:\n{out}"
    );
}
