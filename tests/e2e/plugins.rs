//! Policy plugins (WebAssembly components) through the real binary: hostile naming plugins
//! fall back to the built-in namer, broken files are refused at load while the bundled plugin
//! keeps serving, older `p0rt:policy` versions keep loading, rate-limit decisions reach the
//! HTTP edge, the plugins directory hot-reloads under traffic, and the `p0rt plugin` CLI.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The fixture crates of the plugin workspace; built by the tests, never by build.rs.
const FIXTURE_PACKAGES: [&str; 3] = ["fixture-hostile", "fixture-old-version", "hostile-policy"];

/// Builds the test fixture plugins once per test run (into the cargo target directory, not
/// the source tree); returns where the `.wasm` files are.
fn fixtures_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-fixtures");
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.current_dir(&workspace)
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "wasm32-wasip2",
            ])
            .arg("--target-dir")
            .arg(&target);
        for package in FIXTURE_PACKAGES {
            cmd.args(["-p", package]);
        }
        // The test build's settings are for the host, not for wasm.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_TARGET",
            "CARGO_TARGET_DIR",
        ] {
            cmd.env_remove(var);
        }
        let out = cmd
            .output()
            .expect("run cargo to build the fixture plugins");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "building the fixture plugins in {} failed{}:\n{stderr}",
            workspace.display(),
            if stderr.contains("wasm32-wasip2") && stderr.contains("target") {
                " (the wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`)"
            } else {
                ""
            }
        );
        target.join("wasm32-wasip2/release")
    })
}

/// A test fixture plugin (`fixture_hostile.wasm`, `fixture_old_version.wasm`,
/// `hostile_policy.wasm`).
pub(crate) fn fixture(file: &str) -> PathBuf {
    fixtures_dir().join(file)
}

/// A bundled reference plugin (`words.wasm`, `ratelimit.wasm`, `scan_guard.wasm`).
pub(crate) fn bundled(file: &str) -> PathBuf {
    Path::new(env!("P0RT_BUNDLED_PLUGINS")).join(file)
}

pub(crate) fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Writes a file atomically (temporary name, then rename), as an operator deploying should.
/// The temporary name has no `.wasm`/`.json` extension, so the host never loads it half-written.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// An (empty) plugins directory inside the sandbox. Not `./plugins`, which is the host's
/// default and would be picked up without the flag.
pub(crate) fn plugins_dir(sb: &Sandbox) -> PathBuf {
    let dir = sb.join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Puts `<dir>/<stem>.wasm` (and `<stem>.json` if given) in place; returns the wasm path.
pub(crate) fn install(
    dir: &Path,
    stem: &str,
    wasm: &[u8],
    sidecar: Option<serde_json::Value>,
) -> PathBuf {
    if let Some(sidecar) = sidecar {
        write_atomic(
            &dir.join(format!("{stem}.json")),
            sidecar.to_string().as_bytes(),
        );
    }
    let path = dir.join(format!("{stem}.wasm"));
    write_atomic(&path, wasm);
    path
}

/// The hostile fixture in a given role and mode.
pub(crate) fn install_hostile(dir: &Path, role: &str, mode: &str) -> PathBuf {
    install(
        dir,
        "hostile",
        &read(&fixture("fixture_hostile.wasm")),
        Some(json!({ "role": role, "config": { "mode": mode } })),
    )
}

/// Starts a host serving the plugins in `dir` (`--plugins-dir`).
pub(crate) async fn host_with_plugins(sb: &Sandbox, dir: &Path) -> Host {
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--plugins-dir")
        .arg(dir.to_string_lossy());
    Host::start_with(sb, config).await
}

/// The name the host's built-in namer (and the bundled `words` plugin) gives a key.
pub(crate) fn builtin_name(key: &Key) -> String {
    p0rt::names::builtin_name(&p0rt::names::KeyHash::from_stored(key.key_hash()), 0).to_string()
}

/// Waits until the host log contains `needle`; returns the log.
pub(crate) async fn wait_log(host: &Host, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = host.log();
        if log.contains(needle) {
            return log;
        }
        if Instant::now() >= deadline {
            panic!("no {needle:?} in the host log within {WAIT:?}; log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `needle` occurs at least `n` times in the host log; returns the log.
pub(crate) async fn wait_log_count(host: &Host, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = host.log();
        if log.matches(needle).count() >= n {
            return log;
        }
        if Instant::now() >= deadline {
            panic!("{needle:?} not {n} times in the host log within {WAIT:?}; log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log line a successful load prints, up to the role (for counting reloads of the same
/// content under a new configuration, which `/status/plugins` cannot tell apart).
pub(crate) fn loaded_line(path: &Path, role: &str) -> String {
    format!("loaded from {} as {role} (p0rt:policy@", path.display())
}

/// The (first) log line containing `needle`.
fn log_line<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line with {needle:?}; log:\n{log}"))
}

/// `GET /status/plugins` on the base domain (from loopback): one entry per active plugin
/// and per file that failed to load.
pub(crate) async fn plugin_status(host: &Host) -> Vec<serde_json::Value> {
    let res = host.get_base("/status/plugins").await;
    assert_eq!(res.status().as_u16(), 200, "/status/plugins");
    let body = res.text().await.expect("/status/plugins body");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/status/plugins is not JSON ({e}): {body}"))
}

/// The hex sha256 of a file.
pub(crate) fn sha256_of(path: &Path) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(read(path)))
}

/// Waits until `/status/plugins` has an entry for `origin` (a path, or `bundled`) that
/// satisfies `pred`; returns it.
pub(crate) async fn wait_plugin(
    host: &Host,
    origin: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(WAIT, what, || async {
        let status = plugin_status(host).await;
        status
            .into_iter()
            .find(|p| p["origin"] == origin && pred(p))
    })
    .await
}

/// Waits until the plugin in `path` (its current content) actively serves `role`.
pub(crate) async fn wait_active(host: &Host, role: &str, path: &Path) -> serde_json::Value {
    let sha = sha256_of(path);
    wait_plugin(
        host,
        &path.display().to_string(),
        &format!("{} to serve {role}", path.display()),
        |p| p["active"] == true && p["role"] == role && p["sha256"] == sha.as_str(),
    )
    .await
}

/// Waits until `path` is listed as failing to load; returns its error.
pub(crate) async fn wait_refused(host: &Host, path: &Path) -> String {
    let entry = wait_plugin(
        host,
        &path.display().to_string(),
        &format!("{} to be refused", path.display()),
        |p| p["active"] == false,
    )
    .await;
    entry["error"].as_str().unwrap_or_default().to_string()
}

struct CliOutput {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl CliOutput {
    fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Stdout as JSON (for `plugin run`).
    fn json(&self) -> serde_json::Value {
        assert!(
            self.success(),
            "p0rt plugin exited {:?}; stderr:\n{}",
            self.code,
            self.stderr
        );
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}; stderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `p0rt <args>` (the plugin CLI) to completion, bounded in time.
async fn p0rt_cli(cwd: &Path, args: &[&str]) -> CliOutput {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).current_dir(cwd);
    for var in p0rt::config::ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "warn").env("NO_COLOR", "1");
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn p0rt plugin");
    let limit = Duration::from_secs(90);
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("p0rt {args:?} did not finish within {limit:?}"))
        .expect("wait p0rt plugin");
    CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: strip_ansi(&String::from_utf8_lossy(&out.stderr)),
    }
}

pub(crate) fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A minimal, valid naming plugin written as a WAT component: it implements
/// `p0rt:policy/naming@0.1.1` and names every key `wat-plugged`. `memory_pages` and
/// `table_elements` set the initial size of its core memory and table, so the same plugin can
/// be made to ask for more than the host grants.
fn wat_naming_component(memory_pages: u32, table_elements: u32) -> Vec<u8> {
    let text = format!(
        r#"(component
  (core module $m
    (memory (export "mem") {memory_pages})
    (table {table_elements} funcref)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 1024)
    (func (export "choose") (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32) i32.const 16)
    (data (i32.const 16) "\00\00\00\00\20\00\00\00\0b\00\00\00")
    (data (i32.const 32) "wat-plugged"))
  (core instance $i (instantiate $m))
  (type $req (record
    (field "ssh-key-hash" string)
    (field "fingerprint" string)
    (field "requested-label" (option string))
    (field "attempt" u32)))
  (type $dec (variant (case "name" string) (case "refuse" string)))
  (func $choose (param "request" $req) (result $dec)
    (canon lift (core func $i "choose")
      (memory (core memory $i "mem"))
      (realloc (core func $i "realloc"))))
  (instance $naming
    (export "naming-request" (type $req))
    (export "naming-decision" (type $dec))
    (export "choose-name" (func $choose)))
  (export "p0rt:policy/naming@0.1.1" (instance $naming)))"#
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("WAT component does not parse: {e}"))
}

/// Bytes that are no WebAssembly at all (neither binary nor text).
fn garbage() -> Vec<u8> {
    let mut bytes = b"\x7fELF not a component ".to_vec();
    bytes.extend(pattern(0, 4096));
    bytes
}

/// A reqwest client whose connections come from `ip` (any 127.0.0.0/8 address works on
/// Linux loopback), so a test gets its own per-IP rate-limit bucket.
pub(crate) fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .expect("reqwest client")
}

/// `GET /whoami` for `name` through the edge with `client`: status, Retry-After and body.
async fn whoami_with(
    client: &reqwest::Client,
    host: &Host,
    name: &str,
) -> (u16, Option<String>, String) {
    let res = client
        .get(host.url("/whoami"))
        .header(reqwest::header::HOST, host.host_header(name))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /whoami for {name} failed: {e}"));
    let status = res.status().as_u16();
    let retry = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or("").to_string());
    (status, retry, res.text().await.unwrap_or_default())
}

/// Starts `ssh -N -R 80:…` for `key` without waiting for a 200 (for tunnels whose every
/// request is denied); waits until the edge answers `status` for `name`.
async fn tunnel_answering(
    host: &Host,
    sb: &Sandbox,
    key: &Key,
    backend: &Backend,
    name: &str,
    status: u16,
) -> SshClient {
    let client = host
        .ssh(sb, key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    host.wait_status(name, status).await;
    client
}

/// `ssh info` for a new key whose naming decision came from the plugin itself. On this busy
/// 2-core machine a plugin call can miss its deadline now and then, and the host then
/// (correctly) names the key with its built-in namer; such an attempt is repeated with
/// another new key.
async fn info_without_fallback(host: &Host, sb: &Sandbox, stem: &str) -> (Key, String) {
    let fallbacks = || host.log().matches("naming falls back").count();
    for attempt in 0..3 {
        let before = fallbacks();
        let key = sb.key(&format!("{stem}{attempt}"));
        let name = host.info(sb, &key).await.name;
        if fallbacks() == before {
            return (key, name);
        }
    }
    panic!(
        "the naming plugin failed for 3 keys in a row; log:\n{}",
        host.log()
    );
}

/// Seconds into the current minute (unix time).
fn second_of_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60
}

fn unix_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
}

// ---------------------------------------------------------------------------------------------
// 1. Hostile naming plugins: the host stays up and names keys with its built-in namer
// ---------------------------------------------------------------------------------------------

/// The hostile fixture in `mode` is the naming plugin: a new key still gets the built-in
/// name, stably, its tunnel serves traffic, and the log names the plugin and `reason`.
async fn hostile_naming_falls_back(mode: &str, reason: &str) {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let wasm = install_hostile(&dir, "naming", mode);
    let key = sb.key("victim");
    let backend = Backend::start("hostile-naming-backend").await;
    let mut host = host_with_plugins(&sb, &dir).await;
    wait_active(&host, "naming", &wasm).await;

    let info = host.info(&sb, &key).await;
    assert_eq!(
        info.name,
        builtin_name(&key),
        "mode {mode}: not the built-in name"
    );
    assert_eq!(
        info.url,
        format!("http://{}.localhost:{}", info.name, host.http_port)
    );

    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    assert_eq!(
        name, info.name,
        "mode {mode}: name changed between info and tunnel"
    );
    for _ in 0..3 {
        assert_eq!(
            host.whoami(&name).await,
            (200, backend.id.clone()),
            "mode {mode}"
        );
    }
    assert_eq!(
        host.info(&sb, &key).await.name,
        name,
        "mode {mode}: name not stable"
    );

    let log = wait_log(
        &host,
        "naming falls back to the built-in namer: plugin hostile (",
    )
    .await;
    let line = log_line(&log, "naming falls back to the built-in namer");
    assert!(
        line.contains(reason),
        "mode {mode}: fallback line does not say {reason:?}: {line}"
    );
    assert!(
        host.is_running(),
        "host died with hostile naming mode {mode}:\n{log}"
    );
    // The host answers other keys too (it did not wedge on the plugin).
    let other = sb.key("bystander");
    assert_eq!(
        host.info(&sb, &other).await.name,
        builtin_name(&other),
        "mode {mode}"
    );
    assert!(
        host.is_running(),
        "host died with hostile naming mode {mode}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_naming_loop_falls_back_to_builtin_name() {
    hostile_naming_falls_back("loop", "ran out of fuel").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_naming_memory_falls_back_to_builtin_name() {
    hostile_naming_falls_back("memory", "trapped").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_naming_trap_falls_back_to_builtin_name() {
    hostile_naming_falls_back("trap", "trapped (panic or abort)").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_naming_stack_falls_back_to_builtin_name() {
    hostile_naming_falls_back("stack", "overflowed its stack").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_naming_huge_name_falls_back_to_builtin_name() {
    hostile_naming_falls_back("huge-name", "longer than 63").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_naming_invalid_name_falls_back_to_builtin_name() {
    hostile_naming_falls_back("invalid-name", "returned an invalid decision").await;
}

// ---------------------------------------------------------------------------------------------
// 2. A naming plugin cannot take another key's name
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn naming_plugin_cannot_steal_another_keys_name() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (ba, bb) = (
        Backend::start("alice-backend").await,
        Backend::start("bob-backend").await,
    );
    let host = host_with_plugins(&sb, &dir).await;

    // Alice gets her name from the bundled words plugin and keeps a tunnel open.
    let (_a, alice_name) = host.tunnel(&sb, &alice, &ba).await;
    assert_eq!(alice_name, builtin_name(&alice));

    // Now a naming plugin that hands every key Alice's name.
    let wasm = install_hostile(&dir, "naming", &format!("name:{alice_name}"));
    wait_active(&host, "naming", &wasm).await;

    let bob_info = host.info(&sb, &bob).await;
    assert_ne!(bob_info.name, alice_name, "bob was given alice's name");
    assert_eq!(
        bob_info.name,
        builtin_name(&bob),
        "bob should get the built-in name"
    );
    let (_b, bob_name) = host.tunnel(&sb, &bob, &bb).await;
    assert_eq!(bob_name, bob_info.name);

    // Alice keeps her name and her traffic; Bob's name reaches Bob.
    assert_eq!(host.info(&sb, &alice).await.name, alice_name);
    assert_eq!(
        host.whoami(&alice_name).await,
        (200, "alice-backend".to_string())
    );
    assert_eq!(
        host.whoami(&bob_name).await,
        (200, "bob-backend".to_string())
    );

    let stored: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(host.data_dir().join("domains.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stored[alice.key_hash()]["domain"], alice_name, "{stored}");
    assert_eq!(stored[bob.key_hash()]["domain"], bob_name, "{stored}");
}

/// A name of the form `<label>-<another key's name>` is that key's sub-name: a naming plugin
/// must not be able to hand it to a second key and so take over the first key's live
/// sub-name tunnel (`-R api:80:…`).
#[tokio::test(flavor = "multi_thread")]
async fn naming_plugin_cannot_take_over_another_keys_subname() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let (alice, bob) = (sb.key("alice"), sb.key("bob"));
    let (alice_sub, bob_backend) = (
        Backend::start("alice-sub").await,
        Backend::start("bob-backend").await,
    );
    let host = host_with_plugins(&sb, &dir).await;

    // Alice serves her `api` sub-name.
    let alice_name = host.info(&sb, &alice).await.name;
    let sub = format!("api-{alice_name}");
    let _a = host
        .ssh(&sb, &alice)
        .args(["-N", "-R", &format!("api:80:127.0.0.1:{}", alice_sub.port)])
        .spawn();
    host.wait_served(&sub, &alice_sub).await;

    // A naming plugin that hands every new key exactly that sub-name.
    let wasm = install_hostile(&dir, "naming", &format!("name:{sub}"));
    wait_active(&host, "naming", &wasm).await;

    let bob_name = host.info(&sb, &bob).await.name;
    let mut b = host
        .ssh(&sb, &bob)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", bob_backend.port)])
        .spawn();
    if bob_name != sub {
        host.wait_served(&bob_name, &bob_backend).await;
    } else {
        // Give Bob's forward time to be set up (or refused).
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let alice_answer = host.whoami(&sub).await;
    let bob_ssh = (b.try_exit(), b.stderr());
    assert_eq!(
        alice_answer,
        (200, "alice-sub".to_string()),
        "alice's sub-name {sub} was taken over (bob was named {bob_name:?}; bob's ssh {bob_ssh:?}); log:\n{}",
        host.log()
    );
    assert_ne!(bob_name, sub, "bob was given alice's sub-name {sub}");
    assert_eq!(bob_name, builtin_name(&bob));
}

// ---------------------------------------------------------------------------------------------
// 3. Files that must be refused at load; the bundled plugins keep serving
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn broken_plugin_files_are_refused_and_bundled_plugins_keep_serving() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let garbage_path = install(&dir, "garbage", &garbage(), None);
    let big_memory = install(&dir, "bigmemory", &wat_naming_component(65536, 1), None);
    let big_table = install(&dir, "bigtable", &wat_naming_component(1, 5_000_000), None);
    let wrong_world = install(
        &dir,
        "wrongworld",
        &read(&bundled("ratelimit.wasm")),
        Some(json!({ "role": "naming" })),
    );
    // A good plugin whose init refuses its configuration, and one whose sidecar is not JSON.
    let bad_config = install(
        &dir,
        "badconfig",
        &read(&bundled("ratelimit.wasm")),
        Some(json!({ "config": { "per_ip": "lots" } })),
    );
    std::fs::write(dir.join("badsidecar.json"), "role = naming").unwrap();
    let bad_sidecar = install(&dir, "badsidecar", &read(&bundled("words.wasm")), None);
    let key = sb.key("k");
    let backend = Backend::start("bundled-serves").await;
    let mut host = host_with_plugins(&sb, &dir).await;
    let status = plugin_status(&host).await;
    let entry = |origin: &str| {
        let entries: Vec<_> = status.iter().filter(|p| p["origin"] == origin).collect();
        assert_eq!(entries.len(), 1, "{origin} in {status:#?}");
        entries[0].clone()
    };

    for (path, reasons) in [
        (&garbage_path, &["cannot be compiled"][..]),
        (&big_memory, &["memory", "exceed"][..]),
        (&big_table, &["table", "exceed"][..]),
        (
            &wrong_world,
            &["implements no p0rt:policy world for role naming"][..],
        ),
        (
            &bad_config,
            &["init refused its configuration", "ratelimit config"][..],
        ),
        (&bad_sidecar, &["sidecar", "badsidecar.json"][..]),
    ] {
        // Refused (not active), with a reason that says why.
        let refused = entry(&path.display().to_string());
        assert_eq!(refused["active"], false, "{refused}");
        let reason = refused["error"].as_str().unwrap_or_default();
        for word in reasons {
            assert!(
                reason.contains(word),
                "refusal of {} does not say {word:?}: {reason}",
                path.display()
            );
        }
    }
    for (bundled, role) in [
        ("words", "naming"),
        ("ratelimit", "rate-limit"),
        ("scan-guard", "scan-admission"),
    ] {
        assert!(
            status.iter().any(|p| p["name"] == bundled
                && p["role"] == role
                && p["origin"] == "bundled"
                && p["active"] == true
                && p["error"].is_null()),
            "bundled {bundled} not serving {role}: {status:#?}"
        );
    }

    // Names come from the bundled words plugin (= the built-in namer), traffic flows.
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    assert_eq!(name, builtin_name(&key));
    assert_ne!(name, "wat-plugged");
    assert_eq!(
        host.whoami(&name).await,
        (200, "bundled-serves".to_string())
    );
    assert!(host.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_check_rejects_broken_files_with_a_clear_message() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let garbage_path = install(&dir, "garbage", &garbage(), None);
    let big_memory = install(&dir, "bigmemory", &wat_naming_component(65536, 1), None);
    let big_table = install(&dir, "bigtable", &wat_naming_component(1, 5_000_000), None);
    let small = install(&dir, "small", &wat_naming_component(1, 1), None);
    let wrong_world = install(
        &dir,
        "wrongworld",
        &read(&bundled("ratelimit.wasm")),
        Some(json!({ "role": "naming" })),
    );
    let plain_ratelimit = install(
        &dir,
        "plainratelimit",
        &read(&bundled("ratelimit.wasm")),
        None,
    );

    // The control: the same WAT plugin with a small memory and table is a valid naming plugin.
    let out = p0rt_cli(sb.path(), &["plugin", "check", path_str(&small)]).await;
    assert!(out.success(), "small WAT plugin refused: {}", out.stderr);
    assert!(
        out.stdout.contains("naming") && out.stdout.contains("p0rt:policy@0.1.1"),
        "{}",
        out.stdout
    );
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&small),
            "--input",
            r#"{"ssh_key_hash":"abc"}"#,
        ],
    )
    .await;
    assert_eq!(
        out.json(),
        json!({ "decision": "name", "value": "wat-plugged" })
    );

    for (path, role, reason) in [
        (&garbage_path, None, "cannot be compiled"),
        (&big_memory, None, "memory"),
        (&big_table, None, "table"),
        (
            &wrong_world,
            None,
            "implements no p0rt:policy world for role naming",
        ),
        (
            &plain_ratelimit,
            Some("naming"),
            "implements no p0rt:policy world for role naming",
        ),
    ] {
        let mut args = vec!["plugin", "check", path_str(path)];
        if let Some(role) = role {
            args.extend(["--role", role]);
        }
        let out = p0rt_cli(sb.path(), &args).await;
        assert!(
            !out.success(),
            "plugin check accepted {}: {}",
            path.display(),
            out.stdout
        );
        assert!(
            out.code.is_some(),
            "plugin check died by a signal on {}",
            path.display()
        );
        let marker = format!("plugin {} cannot be loaded: ", path.display());
        let why = out
            .stderr
            .split_once(&marker)
            .map(|(_, why)| why)
            .unwrap_or_else(|| {
                panic!(
                    "plugin check on {}: no {marker:?}; stderr:\n{}",
                    path.display(),
                    out.stderr
                )
            });
        assert!(
            why.contains(reason),
            "plugin check on {}: expected {reason:?}; stderr:\n{}",
            path.display(),
            out.stderr
        );
        if path == &big_memory || path == &big_table {
            assert!(why.contains("exceed"), "{}", out.stderr);
        }
        assert!(!out.stdout.contains(": ok"), "{}", out.stdout);
    }
    // Without the role, the same ratelimit file is fine.
    let out = p0rt_cli(sb.path(), &["plugin", "check", path_str(&plain_ratelimit)]).await;
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("role:      rate-limit"),
        "{}",
        out.stdout
    );

    // A file that does not exist.
    let missing = dir.join("missing.wasm");
    let out = p0rt_cli(sb.path(), &["plugin", "check", path_str(&missing)]).await;
    assert!(!out.success());
    assert!(
        out.stderr.contains("cannot read") && out.stderr.contains("missing.wasm"),
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A plugin built against an older p0rt:policy keeps loading
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn old_policy_version_plugin_loads_and_names_keys() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let wasm = install(
        &dir,
        "old",
        &read(&fixture("fixture_old_version.wasm")),
        None,
    );
    let backend = Backend::start("old-backend").await;
    // The directory through the environment this time.
    let config = HostConfig::flags(&sb.data_dir()).env("PLUGINS_DIR", dir.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    let log = host.log();
    let line = log_line(&log, &format!("loaded from {}", wasm.display()));
    assert!(line.contains("as naming (p0rt:policy@0.1.0)"), "{line}");

    let (key, first_name) = info_without_fallback(&host, &sb, "oldie").await;
    let expected = format!("old-{}", &key.key_hash()[..8]);
    assert_eq!(first_name, expected);
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    assert_eq!(name, expected);
    assert_eq!(host.whoami(&name).await, (200, "old-backend".to_string()));

    // Removing the override brings the bundled words plugin back (for keys named from now on;
    // the old key keeps its name).
    std::fs::remove_file(&wasm).unwrap();
    let mut fresh = 0;
    let (newcomer, newcomer_name) = eventually(WAIT, "bundled naming to be back", || {
        fresh += 1;
        let key = sb.key(&format!("newcomer{fresh}"));
        let host = &host;
        let sb = &sb;
        async move {
            let name = host.info(sb, &key).await.name;
            (!name.starts_with("old-")).then_some((key, name))
        }
    })
    .await;
    assert_eq!(newcomer_name, builtin_name(&newcomer));
    assert_eq!(host.info(&sb, &key).await.name, expected);
    assert_eq!(
        host.whoami(&expected).await,
        (200, "old-backend".to_string())
    );

    let wasm = install(
        &sb.join("."),
        "old-copy",
        &read(&fixture("fixture_old_version.wasm")),
        None,
    );
    let out = p0rt_cli(sb.path(), &["plugin", "check", path_str(&wasm)]).await;
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stdout.contains("p0rt:policy@0.1.0"), "{}", out.stdout);
    assert!(out.stdout.contains("role:      naming"), "{}", out.stdout);
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(read(&wasm)));
    assert!(
        out.stdout.contains(&sha),
        "sha256 {sha} missing: {}",
        out.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Rate limiting at the HTTP edge
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_plugin_deny_answers_429_without_reaching_backend() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let wasm = install_hostile(&dir, "rate-limit", "deny");
    let key = sb.key("denied");
    let backend = Backend::start("never-reached").await;
    let host = host_with_plugins(&sb, &dir).await;
    wait_active(&host, "rate-limit", &wasm).await;

    let name = host.info(&sb, &key).await.name;
    assert_eq!(
        name,
        builtin_name(&key),
        "naming should still be the bundled words plugin"
    );
    let _client = tunnel_answering(&host, &sb, &key, &backend, &name, 429).await;

    let client = http_client();
    for i in 0..5 {
        let res = client
            .get(host.url(&format!("/echo/{i}")))
            .header(reqwest::header::HOST, host.host_header(&name))
            .send()
            .await
            .expect("request through the edge");
        assert_eq!(res.status().as_u16(), 429, "request {i}");
        let retry = res
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(retry.as_deref(), Some("7"), "request {i}: Retry-After");
        let body = res.text().await.unwrap();
        assert!(
            body.contains("hostile fixture says no"),
            "request {i}: body {body:?}"
        );
    }
    assert_eq!(backend.hits(), 0, "a denied request reached the backend");
    assert!(
        !host.log().contains("rate limiting falls back"),
        "{}",
        host.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trapping_rate_limit_plugin_falls_back_and_traffic_flows() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let wasm = install_hostile(&dir, "rate-limit", "trap");
    let key = sb.key("k");
    let backend = Backend::start("still-served").await;
    let mut host = host_with_plugins(&sb, &dir).await;
    wait_active(&host, "rate-limit", &wasm).await;

    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let before = backend.hits();
    for i in 0..10 {
        assert_eq!(
            host.whoami(&name).await,
            (200, "still-served".to_string()),
            "request {i}"
        );
    }
    assert_eq!(backend.hits(), before + 10);
    let log = wait_log(
        &host,
        "rate limiting falls back to the built-in limiter: plugin hostile (",
    )
    .await;
    assert!(log.contains("trapped (panic or abort)"), "{log}");
    // It keeps failing, so it is benched (and the built-in limiter keeps serving meanwhile).
    // (The log, not /status/plugins: the first bench lasts only a second.)
    assert!(log.contains("benched for"), "{log}");
    assert!(host.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn ratelimit_plugin_config_limits_requests_per_ip() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let config = json!({ "config": {
        "per_ip": { "limit": 3, "window_seconds": 60 },
        "per_tunnel": { "limit": 0, "window_seconds": 60 },
        "per_key": { "limit": 0, "window_seconds": 60 },
    }});
    let wasm = install(
        &dir,
        "ratelimit",
        &read(&bundled("ratelimit.wasm")),
        Some(config),
    );
    let key = sb.key("limited");
    let backend = Backend::start("limited-backend").await;
    let host = host_with_plugins(&sb, &dir).await;
    wait_active(&host, "rate-limit", &wasm).await;
    // (The tunnel check below spends one request of 127.0.0.1's budget.)
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;

    // Each attempt comes from its own loopback address, so it starts with a fresh budget.
    // An attempt is inconclusive (and retried once) if the window rolled over in the middle
    // of it, or if a plugin call missed its deadline on this busy machine (the host then
    // fails open to its built-in limiter, by design).
    let fallbacks = || host.log().matches("rate limiting falls back").count();
    let mut attempts = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        if second_of_minute() >= 55 {
            tokio::time::sleep(Duration::from_secs(61 - second_of_minute())).await;
        }
        let client = client_from(ip);
        let minute = unix_minute();
        let fallbacks_before = fallbacks();
        let hits = backend.hits();
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(whoami_with(&client, &host, &name).await);
        }
        let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
        if unix_minute() != minute {
            attempts.push(format!("{ip}: {statuses:?} across a window rollover"));
            continue;
        }
        if fallbacks() != fallbacks_before {
            attempts.push(format!("{ip}: {statuses:?} with a plugin fallback"));
            continue;
        }
        assert_eq!(statuses, vec![200, 200, 200, 429], "from {ip}");
        let (_, retry, body) = &answers[3];
        let retry: u32 = retry
            .as_deref()
            .expect("Retry-After on the 429")
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        assert!(
            body.contains("too many requests from your address"),
            "{body:?}"
        );
        assert_eq!(backend.hits(), hits + 3, "the 429 reached the backend");
        // Other addresses are not affected.
        assert_eq!(host.whoami(&name).await.0, 200);
        return;
    }
    panic!(
        "every attempt was inconclusive: {attempts:?}; log:\n{}",
        host.log()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Hot reload under traffic
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_under_traffic_never_fails_a_request() {
    fn limits(per_ip: u32) -> serde_json::Value {
        json!({ "config": {
            "per_ip": { "limit": per_ip, "window_seconds": 60 },
            "per_tunnel": { "limit": 0, "window_seconds": 60 },
            "per_key": { "limit": 0, "window_seconds": 60 },
        }})
    }
    const REQUESTS: usize = 200;
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let ratelimit = read(&bundled("ratelimit.wasm"));
    let wasm = install(&dir, "ratelimit", &ratelimit, Some(limits(100_000)));
    let sidecar = dir.join("ratelimit.json");
    let key = sb.key("busy");
    let backend = Backend::start("busy-backend").await;
    let host = Arc::new(host_with_plugins(&sb, &dir).await);
    let loaded = loaded_line(&wasm, "rate-limit");
    assert_eq!(host.log().matches(&loaded).count(), 1, "{}", host.log());
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;

    // Sequential requests until told to stop (and at least REQUESTS), bounded in time.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let traffic = {
        let (host, name, stop, done) = (host.clone(), name.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            let client = http_client();
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut failures = Vec::new();
            let mut count = 0;
            while (count < REQUESTS || !stop.load(Ordering::SeqCst)) && Instant::now() < deadline {
                let res = client
                    .get(host.url("/whoami"))
                    .header(reqwest::header::HOST, host.host_header(&name))
                    .send()
                    .await;
                match res {
                    Ok(res) if res.status().as_u16() == 200 => {
                        let body = res.text().await.unwrap_or_default();
                        if body != "busy-backend" {
                            failures.push(format!("#{count}: body {body:?}"));
                        }
                    }
                    Ok(res) => failures.push(format!("#{count}: status {}", res.status())),
                    Err(e) => failures.push(format!("#{count}: {e}")),
                }
                count += 1;
                done.store(count, Ordering::SeqCst);
            }
            (count, failures)
        })
    };
    let wait_requests = |n: usize| {
        let done = done.clone();
        async move {
            eventually(
                Duration::from_secs(60),
                &format!("{n} requests"),
                || async { (done.load(Ordering::SeqCst) >= n).then_some(()) },
            )
            .await
        }
    };

    // A stricter (still generous) configuration: a reload.
    wait_requests(20).await;
    write_atomic(&sidecar, limits(50_000).to_string().as_bytes());
    wait_log_count(&host, &loaded, 2).await;
    let after_reload = done.load(Ordering::SeqCst);
    wait_requests(after_reload + 20).await;

    // A garbage file over the plugin: refused, the previous version keeps serving.
    write_atomic(&wasm, &garbage());
    let refusal = wait_refused(&host, &wasm).await;
    assert!(refusal.contains("cannot be compiled"), "{refusal}");
    let log = wait_log(
        &host,
        &format!("plugin {} failed to load: ", wasm.display()),
    )
    .await;
    assert!(
        log_line(&log, "failed to load").contains("keeps serving"),
        "{log}"
    );
    let still = plugin_status(&host).await;
    assert!(
        still
            .iter()
            .any(|p| p["active"] == true && p["origin"] == path_str(&wasm)),
        "the previous version stopped serving: {still:#?}"
    );
    let after_garbage = done.load(Ordering::SeqCst);
    wait_requests(after_garbage + 20).await;

    stop.store(true, Ordering::SeqCst);
    let (count, failures) = tokio::time::timeout(Duration::from_secs(120), traffic)
        .await
        .expect("traffic loop did not finish")
        .expect("traffic task panicked");
    assert!(count >= REQUESTS, "only {count} requests were made");
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed: {failures:?}",
        failures.len()
    );
    eprintln!(
        "hot reload: {count} requests, reload after #{after_reload}, garbage refused after #{after_garbage}, all 200"
    );

    // Reloads really apply: the plugin back with a limit of 1 request a minute per IP.
    write_atomic(&sidecar, limits(1).to_string().as_bytes());
    write_atomic(&wasm, &ratelimit);
    wait_log_count(&host, &loaded, 3).await;
    let mut last = (0, String::new());
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        last = host.whoami(&name).await;
        if last.0 == 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last.0,
        429,
        "limit 1 never took effect; last answer {last:?}; log:\n{}",
        host.log()
    );
    assert!(last.1.contains("too many requests"), "{last:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. The plugin CLI: scan admission, run, list
// ---------------------------------------------------------------------------------------------

fn scan_input(target_is_own_tunnel: bool, checks: &[&str]) -> String {
    let owned_names: Vec<&str> = if target_is_own_tunnel {
        vec!["x"]
    } else {
        Vec::new()
    };
    json!({
        "requester_key_hash": "k",
        "target": "x",
        "ports": [443],
        "checks": checks,
        "owned_names": owned_names,
        "target_is_own_tunnel": target_is_own_tunnel,
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn scan_admission_via_plugin_run() {
    let sb = Sandbox::new();
    let guard = bundled("scan_guard.wasm");
    let hostile = fixture("fixture_hostile.wasm");

    // scan-guard: someone else's target is rejected.
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&guard),
            "--input",
            &scan_input(false, &["tls"]),
        ],
    )
    .await;
    let decision = out.json();
    assert_eq!(decision["decision"], "reject", "{decision}");
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("not one of your tunnels"),
        "{decision}"
    );

    // scan-guard: own tunnel accepted, only the allowed checks kept.
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&guard),
            "--input",
            &scan_input(true, &["tls", "paths", "open-ports", "headers"]),
        ],
    )
    .await;
    assert_eq!(
        out.json(),
        json!({ "decision": "accept", "priority": 7, "allowed_checks": ["paths", "headers"] })
    );

    // A trapping scan policy fails closed.
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&hostile),
            "--role",
            "scan-admission",
            "--config",
            r#"{"mode":"trap"}"#,
            "--input",
            &scan_input(true, &["tls"]),
        ],
    )
    .await;
    let decision = out.json();
    assert_eq!(decision["decision"], "reject", "{decision}");
    assert!(
        decision["reason"].as_str().unwrap().contains("trapped"),
        "{decision}"
    );

    // So does one that accepts with an invalid decision (priority 200, unrequested checks).
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&hostile),
            "--role",
            "scan-admission",
            "--config",
            r#"{"mode":"name:ok"}"#,
            "--input",
            &scan_input(true, &["tls"]),
        ],
    )
    .await;
    let decision = out.json();
    assert_eq!(decision["decision"], "reject", "{decision}");
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("invalid decision"),
        "{decision}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_run_naming_and_rate_limit_decisions() {
    let sb = Sandbox::new();
    let key = sb.key("k");
    let hash = key.key_hash();
    let hostile = fixture("fixture_hostile.wasm");
    let naming_input = json!({ "ssh_key_hash": hash }).to_string();

    // The bundled words plugin agrees with the host's built-in namer.
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&bundled("words.wasm")),
            "--input",
            &naming_input,
        ],
    )
    .await;
    assert_eq!(
        out.json(),
        json!({ "decision": "name", "value": builtin_name(&key) })
    );

    // A hostile naming decision becomes a fallback with the reason.
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&hostile),
            "--role",
            "naming",
            "--config",
            r#"{"mode":"stack"}"#,
            "--input",
            &naming_input,
        ],
    )
    .await;
    let decision = out.json();
    assert_eq!(decision["decision"], "fallback", "{decision}");
    assert!(
        decision["value"]
            .as_str()
            .unwrap()
            .contains("overflowed its stack"),
        "{decision}"
    );

    // Rate limit: deny, as the plugin said.
    let rate_input =
        json!({ "client_ip": "192.0.2.1", "name": "x", "method": "GET", "path": "/" }).to_string();
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&hostile),
            "--role",
            "rate-limit",
            "--config",
            r#"{"mode":"deny"}"#,
            "--input",
            &rate_input,
        ],
    )
    .await;
    assert_eq!(
        out.json(),
        json!({ "decision": "deny", "status": 429, "retry_after_seconds": 7, "message": "hostile fixture says no" })
    );
    let out = p0rt_cli(
        sb.path(),
        &[
            "plugin",
            "run",
            path_str(&bundled("ratelimit.wasm")),
            "--input",
            &rate_input,
        ],
    )
    .await;
    assert_eq!(out.json(), json!({ "decision": "allow" }));

    // A component exporting several roles needs one.
    let out = p0rt_cli(sb.path(), &["plugin", "check", path_str(&hostile)]).await;
    assert!(!out.success(), "{}", out.stdout);
    assert!(
        out.stderr.contains("implements several roles"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_list_shows_bundled_overrides_and_broken_files() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let broken = install(&dir, "broken", &garbage(), None);
    let old = install(
        &dir,
        "old",
        &read(&fixture("fixture_old_version.wasm")),
        None,
    );
    let out = p0rt_cli(
        sb.path(),
        &["plugin", "list", "--plugins-dir", path_str(&dir)],
    )
    .await;
    assert!(out.success(), "plugin list failed: {}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let row = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no row with {needle:?} in:\n{}", out.stdout))
            .to_string()
    };
    let rate = row("ratelimit");
    assert!(
        rate.starts_with("rate-limit") && rate.contains("bundled"),
        "{rate}"
    );
    let scan = row("scan-guard");
    assert!(
        scan.starts_with("scan-admission") && scan.contains("bundled"),
        "{scan}"
    );
    // The override takes the naming role from words.
    let naming = row(&old.display().to_string());
    assert!(
        naming.starts_with("naming") && naming.contains("0.1.0"),
        "{naming}"
    );
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.starts_with("naming") && l.contains("bundled")),
        "bundled words still listed as naming:\n{}",
        out.stdout
    );
    let broken_row = row(&broken.display().to_string());
    assert!(broken_row.contains("NOT LOADED"), "{broken_row}");
    assert!(broken_row.contains("cannot be compiled"), "{broken_row}");

    // Without overrides: the three bundled plugins.
    let empty = sb.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = p0rt_cli(
        sb.path(),
        &["plugin", "list", "--plugins-dir", path_str(&empty)],
    )
    .await;
    assert!(out.success(), "{}", out.stderr);
    for (role, name) in [
        ("naming", "words"),
        ("rate-limit", "ratelimit"),
        ("scan-admission", "scan-guard"),
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(role) && l.contains(name) && l.contains("bundled")),
            "no bundled {name} as {role}:\n{}",
            out.stdout
        );
    }
    assert!(!out.stdout.contains("NOT LOADED"), "{}", out.stdout);
}

// ---------------------------------------------------------------------------------------------
// 8. No plugins at all
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn no_plugins_host_serves_tunnels_with_builtin_names() {
    let sb = Sandbox::new();
    let key = sb.key("plain");
    let backend = Backend::start("plain-backend").await;
    let config = HostConfig::flags(&sb.data_dir()).arg("--no-plugins");
    let host = Host::start_with(&sb, config).await;
    assert!(host.log().contains("plugins disabled"), "{}", host.log());
    assert!(!host.log().contains("loaded from"), "{}", host.log());

    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    assert_eq!(name, builtin_name(&key));
    for _ in 0..5 {
        assert_eq!(host.whoami(&name).await, (200, "plain-backend".to_string()));
    }

    // The same key on a host with the default (bundled) plugins gets the same name.
    let sb2 = Sandbox::new();
    let default_host = Host::start(&sb2).await;
    assert_eq!(default_host.info(&sb2, &key).await.name, name);
}
