//! `p0rt plugin new NAME --role ROLE`: a plugin crate to start from. It carries the host's
//! newest WIT (`wit/v0.2/policy.wit`, the same file the host was built with), builds with
//! `cargo component build --release` and with plain `cargo build --release --target
//! wasm32-wasip2`, and has a `test.sh` that builds it and asks it for one decision through
//! `p0rt plugin run`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::Role;

/// The newest WIT the host was built with (p0rt:policy@0.2.0); scaffolds vendor it so they
/// build offline and match.
const POLICY_WIT: &str = include_str!("../../../wit/v0.2/policy.wit");
/// wit-bindgen release the scaffolds use (the one the bundled plugins are built with).
const WIT_BINDGEN_VERSION: &str = "0.63";

/// Writes the crate into `parent/name` (which must not exist) and returns its path.
pub fn new_plugin(parent: &Path, name: &str, role: Role) -> anyhow::Result<PathBuf> {
    crate::names::check_dns_label(name)
        .map_err(|problem| anyhow::anyhow!("plugin name {name:?}: {problem}"))?;
    let dir = parent.join(name);
    if dir.exists() {
        bail!(
            "{} already exists; choose another name or directory",
            dir.display()
        );
    }
    let files = [
        ("Cargo.toml", cargo_toml(name, role)),
        ("wit/policy.wit", POLICY_WIT.to_string()),
        ("src/lib.rs", lib_rs(role)),
        ("test.sh", test_sh(name, role)),
        ("README.md", readme(name, role)),
        // cargo-component writes src/bindings.rs on every build; this crate does not use it.
        (".gitignore", "target/\nsrc/bindings.rs\n".to_string()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("test.sh");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", script.display()))?;
    }
    Ok(dir)
}

fn world(role: Role) -> &'static str {
    match role {
        Role::Naming => "naming-plugin",
        Role::RateLimit => "rate-limit-plugin",
        Role::RequestPolicy => "request-policy-plugin",
        Role::ScanAdmission => "scan-admission-plugin",
    }
}

fn cargo_toml(name: &str, role: Role) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
# Generates the bindings from wit/ at compile time (both `cargo component build` and plain
# `cargo build --target wasm32-wasip2` use it the same way).
wit-bindgen = "{WIT_BINDGEN_VERSION}"

# `cargo component build` reads this: the WIT package the component targets.
[package.metadata.component]
package = "p0rt-plugin:{name}"

[package.metadata.component.target]
path = "wit"
world = "{world}"

[package.metadata.component.bindings]
# The crate generates its own bindings (wit_bindgen::generate! in src/lib.rs).
implementor = "Plugin"

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"

# A crate of its own, even when created inside another workspace.
[workspace]
"#,
        world = world(role)
    )
}

fn lib_rs(role: Role) -> String {
    let body = match role {
        Role::Naming => NAMING_TEMPLATE,
        Role::RateLimit => RATE_LIMIT_TEMPLATE,
        Role::RequestPolicy => REQUEST_POLICY_TEMPLATE,
        Role::ScanAdmission => SCAN_TEMPLATE,
    };
    body.replace("__WORLD__", world(role))
}

const NAMING_TEMPLATE: &str = r#"//! A naming plugin: names each key `dev-<first 8 hex digits of its key hash>`
//! (`-<attempt>` appended when the host asks again because a name was taken), and serves
//! every requested label except `admin` as the sub-name `label-<main name>`. Change
//! `choose_name` to your rule (`NamingDecision::GrantRequested` gives the key the label
//! itself as a name; `request.owned_names` lists the names it already owns).

wit_bindgen::generate!({ path: "wit", world: "__WORLD__" });

use exports::p0rt::policy::naming::{Guest, NamingDecision, NamingRequest};

struct Plugin;

impl Guest for Plugin {
    fn choose_name(request: NamingRequest) -> NamingDecision {
        if let Some(label) = request.requested_label {
            // A `-R label:80:…` request: serve `label-<main name>`, or refuse the label.
            return if label == "admin" {
                NamingDecision::Refuse("the label `admin` is not for tunnels".into())
            } else {
                NamingDecision::Name(label)
            };
        }
        let short: String = request.ssh_key_hash.chars().take(8).collect();
        match request.attempt {
            0 => NamingDecision::Name(format!("dev-{short}")),
            n => NamingDecision::Name(format!("dev-{short}-{n}")),
        }
    }
}

impl exports::p0rt::policy::init::Guest for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
}

export!(Plugin);
"#;

const RATE_LIMIT_TEMPLATE: &str = r#"//! A rate limiter: at most 100 requests per client IP per minute, counted in the host's
//! cache (shared between hosts when the cache is Redis). Change `check` to your rule
//! (`cache::increment_many` counts several buckets in one host call).

wit_bindgen::generate!({ path: "wit", world: "__WORLD__" });

use exports::p0rt::policy::rate_limit::{Decision, Denial, Guest, RequestFacts};
use p0rt::policy::{cache, clock};

/// Requests one client IP may send per window.
const LIMIT: i64 = 100;
/// Window length in seconds.
const WINDOW: i64 = 60;

struct Plugin;

impl Guest for Plugin {
    fn check(request: RequestFacts) -> Decision {
        let window = clock::now_unix_seconds().div_euclid(WINDOW);
        let key = format!("ip:{}:{window}", request.client_ip);
        if cache::increment(&key, 1, Some(WINDOW as u32)) > LIMIT {
            return Decision::Deny(Denial {
                status: 429,
                retry_after_seconds: Some(WINDOW as u32),
                message: "too many requests; slow down".into(),
            });
        }
        Decision::Allow(None)
    }
}

impl exports::p0rt::policy::init::Guest for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
}

export!(Plugin);
"#;

const REQUEST_POLICY_TEMPLATE: &str = r#"//! A request policy: answers 403 to every path under `/internal/`, and adds
//! `x-served-by: p0rt` to the responses of the requests it admits. Change `check` to your
//! rule (it can also redirect, ask for a login, and edit request headers;
//! `request.options` holds the tunnel owner's `ssh … -- key=value` options).

wit_bindgen::generate!({ path: "wit", world: "__WORLD__" });

use exports::p0rt::policy::request_policy::{
    Answer, Edits, Guest, HeaderEdit, RequestFacts, Verdict,
};

/// Requests under this path never reach the tunnel.
const BLOCKED_PREFIX: &str = "/internal/";

struct Plugin;

impl Guest for Plugin {
    /// This example judges every request (by path), with or without owner options.
    fn needs_check(_options: Vec<(String, String)>) -> bool {
        true
    }

    fn check(request: RequestFacts) -> Verdict {
        if request.path.starts_with(BLOCKED_PREFIX) {
            return Verdict::Deny(Answer {
                status: 403,
                headers: Vec::new(),
                body: format!("403 forbidden: {BLOCKED_PREFIX} is not served here\n"),
            });
        }
        Verdict::Admit(Edits {
            request: Vec::new(),
            response: vec![HeaderEdit {
                name: "x-served-by".into(),
                value: Some("p0rt".into()),
            }],
        })
    }
}

impl exports::p0rt::policy::init::Guest for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
}

export!(Plugin);
"#;

const SCAN_TEMPLATE: &str = r#"//! A scan admission policy: a key may scan only its own tunnels, with every check it asked
//! for, at high priority. Change `admit` to your rule.

wit_bindgen::generate!({ path: "wit", world: "__WORLD__" });

use exports::p0rt::policy::scan_admission::{Admission, Decision, Guest, ScanJob};

struct Plugin;

impl Guest for Plugin {
    fn admit(job: ScanJob) -> Decision {
        if !job.target_is_own_tunnel {
            return Decision::Reject(format!("{} is not one of your tunnels", job.target));
        }
        Decision::Accept(Admission {
            priority: 7,
            allowed_checks: job.checks,
        })
    }
}

impl exports::p0rt::policy::init::Guest for Plugin {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
}

export!(Plugin);
"#;

/// The input `test.sh` hands to `p0rt plugin run`, and what the answer must contain.
fn sample(role: Role) -> (&'static str, &'static str) {
    match role {
        Role::Naming => (
            r#"{"ssh_key_hash":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","fingerprint":"SHA256:test","attempt":0}"#,
            r#""dev-01234567""#,
        ),
        Role::RateLimit => (
            r#"{"client_ip":"192.0.2.1","host":"x.localhost","name":"x","method":"GET","path":"/","scheme":"http"}"#,
            r#""allow""#,
        ),
        Role::RequestPolicy => (
            r#"{"client_ip":"192.0.2.1","host":"x.localhost","name":"x","method":"GET","path":"/","scheme":"http"}"#,
            r#""admit""#,
        ),
        Role::ScanAdmission => (
            r#"{"requester_key_hash":"ab","target":"x","checks":["headers"],"target_is_own_tunnel":true}"#,
            r#""accept""#,
        ),
    }
}

fn test_sh(name: &str, role: Role) -> String {
    let (input, expect) = sample(role);
    let file = name.replace('-', "_");
    format!(
        r#"#!/bin/sh
# Builds the plugin and asks it for one decision through the host's own runtime.
# Needs `p0rt` on PATH (or P0RT=/path/to/p0rt) and cargo-component
# (`cargo install --locked cargo-component`); `./test.sh plain` builds with plain cargo instead.
set -eu
cd "$(dirname "$0")"
P0RT=${{P0RT:-p0rt}}
T=${{CARGO_TARGET_DIR:-target}}
if [ "${{1:-}}" = plain ]; then
  cargo build --release --target wasm32-wasip2
  wasm=$T/wasm32-wasip2/release/{file}.wasm
else
  cargo component build --release
  wasm=$T/wasm32-wasip1/release/{file}.wasm
fi
"$P0RT" plugin check "$wasm"
out=$("$P0RT" plugin run "$wasm" --input '{input}')
echo "$out"
case $out in
  *'{expect}'*) echo "ok: {name} answers as expected" ;;
  *) echo "unexpected answer (wanted {expect})" >&2; exit 1 ;;
esac
"#
    )
}

fn readme(name: &str, role: Role) -> String {
    let file = name.replace('-', "_");
    format!(
        r#"# {name}

A p0rt {role} plugin (WIT world `{world}` of `p0rt:policy@0.2.0`, vendored in `wit/`).

Build it with cargo-component (`cargo install --locked cargo-component`):

    cargo component build --release      # target/wasm32-wasip1/release/{file}.wasm

or with plain cargo:

    rustup target add wasm32-wasip2
    cargo build --release --target wasm32-wasip2   # target/wasm32-wasip2/release/{file}.wasm

Try it: `./test.sh` (builds, then `p0rt plugin check` and `p0rt plugin run`). Deploy it by
copying the `.wasm` into the host's plugins directory (it replaces the bundled plugin of the
same role; the host reloads it without a restart). Configuration for `init` goes in
`{name}.json` beside it: `{{"config": {{...}}}}`. The author guide is docs/plugins.md in the
p0rt repository.
"#,
        world = world(role)
    )
}
