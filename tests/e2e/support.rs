//! The harness: sandboxes, keys, the p0rt process, real `ssh` clients, HTTP helpers.
//!
//! Every wait is bounded: polls have deadlines and processes are killed on drop.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub use crate::backend::{Backend, pattern, pattern_sha256};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_p0rt");

/// `p0rt security <args…>` on the store of `data_dir`: every p0rt setting of this process's
/// environment removed, then the store settings in `env` set. (exit code, stdout, stderr).
pub async fn p0rt_security(
    data_dir: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("security")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir);
    for var in p0rt::config::ENV_VARS {
        cmd.env_remove(var);
    }
    let out = cmd
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("run p0rt security");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
/// How long p0rt may take to print both listening lines (a cold start compiles the bundled
/// WebAssembly plugins, which takes seconds in a debug build on a busy machine).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound for "this should happen soon" waits.
pub const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Tools and sandboxes
// ---------------------------------------------------------------------------------------------

/// Panics (never skips) when the OpenSSH client tools are missing.
pub fn require_tools() {
    static CHECK: Once = Once::new();
    CHECK.call_once(|| {
        for tool in ["ssh", "ssh-keygen"] {
            let found = std::process::Command::new(tool)
                .arg("-V")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            assert!(
                found,
                "`{tool}` not found: install openssh-client (apt-get install -y openssh-client)"
            );
        }
    });
}

/// A private temporary directory for one test; removed on drop.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        require_tools();
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("p0rt-e2e-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The default data directory of the sandbox's host.
    pub fn data_dir(&self) -> PathBuf {
        self.join("data")
    }

    /// Generates an ed25519 key pair with `ssh-keygen`.
    pub fn key(&self, name: &str) -> Key {
        let path = self.join(name);
        let out = std::process::Command::new("ssh-keygen")
            .args(["-t", "ed25519", "-N", "", "-q", "-C", name, "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh-keygen");
        assert!(
            out.status.success(),
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public = std::fs::read_to_string(path.with_extension("pub"))
            .expect("read public key")
            .trim()
            .to_string();
        Key { path, public }
    }
}

/// A client key pair on disk.
pub struct Key {
    pub path: PathBuf,
    /// The `authorized_keys` line (`ssh-ed25519 AAAA… comment`).
    pub public: String,
}

impl Key {
    /// P0rt's key hash: hex SHA-256 of the base64 body of the public key.
    pub fn key_hash(&self) -> String {
        use sha2::Digest;
        let body = self.public.split_whitespace().nth(1).expect("key body");
        hex::encode(sha2::Sha256::digest(body.as_bytes()))
    }

    /// `SHA256:…` fingerprint as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.path.with_extension("pub"))
    }
}

/// `SHA256:…` fingerprint of a key file (public or private) according to `ssh-keygen -l`.
pub fn fingerprint_of(path: &Path) -> String {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen -l");
    assert!(
        out.status.success(),
        "ssh-keygen -l {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint field")
        .to_string()
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A TCP port that was free a moment ago (for `-L`/`-D` listeners and "closed" backends).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The p0rt process
// ---------------------------------------------------------------------------------------------

/// How to start p0rt: full argument list and extra environment.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Data directory (for tests that inspect it; the args must point p0rt at it).
    pub data_dir: PathBuf,
    /// Pre-fill `<data_dir>/plugin-cache` with the plugins compiled once per test run, so
    /// each start does not recompile them (see [`warm_plugin_cache`]).
    pub seed_plugin_cache: bool,
}

impl HostConfig {
    /// `p0rt serve` on loopback, ports 0, data in `data_dir`.
    pub fn flags(data_dir: &Path) -> HostConfig {
        let args = [
            "serve",
            "--data-dir",
            &data_dir.to_string_lossy(),
            "--ssh-bind",
            "127.0.0.1",
            "--ssh-port",
            "0",
            "--http-bind",
            "127.0.0.1",
            "--http-port",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        HostConfig {
            args,
            env: Vec::new(),
            data_dir: data_dir.to_path_buf(),
            seed_plugin_cache: true,
        }
    }

    /// `p0rt serve` configured by the environment only (no flags), data in `data_dir`.
    pub fn env_only(data_dir: &Path) -> HostConfig {
        HostConfig {
            args: vec!["serve".into()],
            env: vec![("DATA_DIR".into(), data_dir.to_string_lossy().into_owned())],
            data_dir: data_dir.to_path_buf(),
            seed_plugin_cache: true,
        }
    }

    /// Start without a pre-filled plugin compile cache (a truly fresh data directory).
    pub fn cold(mut self) -> Self {
        self.seed_plugin_cache = false;
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, var: &str, value: impl Into<String>) -> Self {
        self.env.push((var.to_string(), value.into()));
        self
    }
}

/// A p0rt command with a clean, predictable environment.
fn host_command(workdir: &Path, config: &HostConfig) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(&config.args).current_dir(workdir);
    for var in p0rt::config::ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    for (k, v) in &config.env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A running p0rt; killed on drop. Its stderr goes to a log file in the sandbox.
pub struct Host {
    child: Option<Child>,
    pub ssh_port: u16,
    pub http_port: u16,
    /// The HTTPS port from the ready file, when HTTPS is on.
    pub https_port: Option<u16>,
    pub config: HostConfig,
    workdir: PathBuf,
    log_path: PathBuf,
    runs: u32,
}

impl Host {
    /// Starts p0rt with the standard flags on the sandbox's data directory.
    pub async fn start(sandbox: &Sandbox) -> Host {
        Host::start_with(sandbox, HostConfig::flags(&sandbox.data_dir())).await
    }

    pub async fn start_with(sandbox: &Sandbox, config: HostConfig) -> Host {
        let mut host = Host {
            child: None,
            ssh_port: 0,
            http_port: 0,
            https_port: None,
            config,
            workdir: sandbox.path().to_path_buf(),
            log_path: PathBuf::new(),
            runs: 0,
        };
        host.spawn().await;
        host
    }

    async fn spawn(&mut self) {
        if self.config.seed_plugin_cache && self.runs == 0 {
            seed_plugin_cache(&self.config.data_dir).await;
        }
        self.runs += 1;
        // Unique per start: another Host in the same sandbox must not share these files.
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.log_path = self.workdir.join(format!("p0rt-start{start}.log"));
        let log = std::fs::File::create(&self.log_path).expect("create host log");
        let ready_path = self.workdir.join(format!("p0rt-start{start}.ready.json"));
        let _ = std::fs::remove_file(&ready_path);
        let mut cmd = host_command(&self.workdir, &self.config);
        cmd.arg("--ready-file").arg(&ready_path);
        cmd.stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawn p0rt");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some((ssh, http)) = read_ready_file(&ready_path) {
                self.ssh_port = ssh;
                self.http_port = http;
                self.https_port = read_ready_https_port(&ready_path);
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "p0rt exited during startup ({status}); stderr:\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                panic!(
                    "p0rt did not write its --ready-file within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child = Some(child);
    }

    /// Stderr of the current run so far (ANSI codes removed).
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// Stderr once it contains `needle`. Start-up lines written by a part that starts after
    /// the ready file (the HTTP edge's limits, say) may come a moment later on a busy machine.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        eventually(WAIT, &format!("{needle:?} in the host's log"), || async {
            let log = self.log();
            log.contains(needle).then_some(log)
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("host running")
    }

    /// Stops p0rt with SIGTERM (graceful: it flushes the store) and returns its exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("host running");
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(WAIT, child.wait()).await {
            Ok(status) => status.expect("wait p0rt"),
            Err(_) => {
                let _ = child.kill().await;
                panic!(
                    "p0rt did not exit within {WAIT:?} of SIGTERM; stderr:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Waits for p0rt to exit by itself (after a signal the test sent) and returns its status.
    pub async fn stop_waiting(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("host running");
        match tokio::time::timeout(WAIT, child.wait()).await {
            Ok(status) => status.expect("wait p0rt"),
            Err(_) => {
                let _ = child.kill().await;
                panic!("p0rt did not exit within {WAIT:?}; stderr:\n{}", self.log());
            }
        }
    }

    /// Kills p0rt with SIGKILL (no chance to flush anything).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops p0rt gracefully and starts it again on the same data directory (new ports).
    pub async fn restart(&mut self) {
        let status = self.stop().await;
        assert!(
            status.success(),
            "p0rt exited with {status} on SIGTERM; stderr:\n{}",
            self.log()
        );
        self.spawn().await;
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    /// The HTTPS edge's address (panics when HTTPS is off).
    pub fn https_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.https_port.expect("HTTPS on")))
    }

    /// `Host` header value for a tunnel name.
    pub fn host_header(&self, name: &str) -> String {
        format!("{name}.localhost:{}", self.http_port)
    }

    /// URL on the edge's real TCP address (the `Host` header is set separately).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// A GET through the edge to `name` (no retries).
    pub async fn get(&self, name: &str, path: &str) -> reqwest::Response {
        http_client()
            .get(self.url(path))
            .header(reqwest::header::HOST, self.host_header(name))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} for {name} failed: {e}"))
    }

    /// A GET to the base domain (`Host: localhost:PORT`).
    pub async fn get_base(&self, path: &str) -> reqwest::Response {
        http_client()
            .get(self.url(path))
            .header(
                reqwest::header::HOST,
                format!("localhost:{}", self.http_port),
            )
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on the base domain failed: {e}"))
    }

    /// Status and body of `GET /whoami` for `name`.
    pub async fn whoami(&self, name: &str) -> (u16, String) {
        let res = self.get(name, "/whoami").await;
        let status = res.status().as_u16();
        (status, res.text().await.unwrap_or_default())
    }

    /// Waits until `name` is served by `backend` (its `/whoami` answers with the backend's id).
    pub async fn wait_served(&self, name: &str, backend: &Backend) {
        let mut last = (0, String::new());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            last = self.whoami(name).await;
            if last.0 == 200 && last.1 == backend.id {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{name} not served by backend {} within {WAIT:?}; last answer {} {:?}; p0rt stderr:\n{}",
            backend.id,
            last.0,
            last.1,
            self.log()
        );
    }

    /// Waits until `name` answers `GET /whoami` with `status`.
    pub async fn wait_status(&self, name: &str, status: u16) {
        let mut last = (0, String::new());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            last = self.whoami(name).await;
            if last.0 == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{name} did not answer {status} within {WAIT:?}; last answer {} {:?}",
            last.0, last.1
        );
    }

    /// An `ssh` command against this host with `key`.
    pub fn ssh(&self, sandbox: &Sandbox, key: &Key) -> Ssh {
        Ssh::new(self.ssh_port, key, sandbox)
    }

    /// Runs `ssh … info` and parses its answer (asserting success).
    pub async fn info(&self, sandbox: &Sandbox, key: &Key) -> Info {
        let out = self.ssh(sandbox, key).command("info").output().await;
        assert!(
            out.status.success(),
            "ssh info failed ({}): stdout {:?} stderr {:?}; p0rt stderr:\n{}",
            out.status,
            out.stdout,
            out.stderr,
            self.log()
        );
        Info::parse(&out.stdout)
    }

    /// Starts `ssh -N -R 80:127.0.0.1:<backend>` and waits until the key's name serves it.
    pub async fn tunnel(
        &self,
        sandbox: &Sandbox,
        key: &Key,
        backend: &Backend,
    ) -> (SshClient, String) {
        let name = self.info(sandbox, key).await.name;
        let client = self
            .ssh(sandbox, key)
            .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
            .spawn();
        self.wait_served(&name, backend).await;
        (client, name)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Reap it (bounded) so the data-dir lock is gone before the sandbox is removed.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !matches!(child.try_wait(), Ok(Some(_)) | Err(_)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Directory name of the plugin compile cache inside a data directory.
const PLUGIN_CACHE_DIR: &str = "plugin-cache";

/// Compiles the bundled plugins once per test process: starts p0rt on a template data dir
/// (a real cold start), stops it, and returns its compile cache, or `None` if that failed
/// (tests then start cold, just slower). Cache entries are named by plugin hash and engine,
/// and written atomically by p0rt, so copying them into another data dir is safe.
fn warm_plugin_cache() -> Option<PathBuf> {
    static CACHE: OnceLock<Option<PathBuf>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
            let prefix = "p0rt-e2e-template-";
            // Remove templates of earlier runs whose process is gone.
            if let Ok(entries) = std::fs::read_dir(root) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if let Some(pid) = name.strip_prefix(prefix)
                        && !Path::new("/proc").join(pid).exists()
                    {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
            let template = root.join(format!("{prefix}{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&template);
            std::fs::create_dir_all(&template).ok()?;
            let data = template.join("data");
            let log_path = template.join("p0rt.log");
            let log = std::fs::File::create(&log_path).ok()?;
            let config = HostConfig::flags(&data);
            let ready_path = template.join("ready.json");
            let mut cmd = std::process::Command::new(BIN);
            cmd.args(&config.args)
                .arg("--ready-file")
                .arg(&ready_path)
                .current_dir(&template);
            for var in p0rt::config::ENV_VARS {
                cmd.env_remove(var);
            }
            cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log));
            let mut child = cmd.spawn().ok()?;
            let deadline = Instant::now() + STARTUP_TIMEOUT;
            let started = loop {
                if read_ready_file(&ready_path).is_some() {
                    break true;
                }
                if Instant::now() >= deadline || matches!(child.try_wait(), Ok(Some(_))) {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let _ = child.kill();
            let _ = child.wait();
            let cache = data.join(PLUGIN_CACHE_DIR);
            let has_entries = std::fs::read_dir(&cache)
                .map(|mut d| {
                    d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "cwasm")))
                })
                .unwrap_or(false);
            (started && has_entries).then_some(cache)
        })
        .clone()
}

/// Copies the warm compile cache (only finished `*.cwasm` entries) into `data_dir`.
async fn seed_plugin_cache(data_dir: &Path) {
    let Ok(Some(source)) = tokio::task::spawn_blocking(warm_plugin_cache).await else {
        return;
    };
    let target = data_dir.join(PLUGIN_CACHE_DIR);
    if target.exists() || std::fs::create_dir_all(&target).is_err() {
        return;
    }
    for entry in std::fs::read_dir(&source).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "cwasm") {
            let _ = std::fs::copy(&path, target.join(entry.file_name()));
        }
    }
}

/// The `(ssh_port, http_port)` a host announced in its `--ready-file`, once written.
pub fn read_ready_file(path: &Path) -> Option<(u16, u16)> {
    let text = std::fs::read_to_string(path).ok()?;
    let ready: serde_json::Value = serde_json::from_str(&text).ok()?;
    let port = |key: &str| ready[key].as_u64().and_then(|p| u16::try_from(p).ok());
    Some((port("ssh_port")?, port("http_port")?))
}

/// The `https_port` of a host's `--ready-file`, if it has one.
pub fn read_ready_https_port(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    let ready: serde_json::Value = serde_json::from_str(&text).ok()?;
    ready["https_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
}

/// Runs p0rt to completion (for startup failures); kills it after `timeout`.
/// Returns the exit code (`None` if it had to be killed or died by signal) and stderr.
pub async fn run_host_to_exit(
    sandbox: &Sandbox,
    config: &HostConfig,
    timeout: Duration,
) -> (Option<i32>, String) {
    let mut cmd = host_command(sandbox.path(), config);
    cmd.stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn p0rt");
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("wait p0rt");
            (
                out.status.code(),
                strip_ansi(&String::from_utf8_lossy(&out.stderr)),
            )
        }
        // Dropping the future kills the child (kill_on_drop).
        Err(_) => (None, format!("p0rt still running after {timeout:?}")),
    }
}

/// What `ssh … info` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub url: String,
    pub key: String,
}

impl Info {
    pub fn parse(stdout: &str) -> Info {
        let field = |prefix: &str| {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {prefix:?} line in info output {stdout:?}"))
        };
        Info {
            name: field("name:"),
            url: field("url:"),
            key: field("key:"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real OpenSSH client
// ---------------------------------------------------------------------------------------------

/// Builder for one `ssh` invocation. Options given with [`Ssh::opt`] come before the harness
/// defaults, and OpenSSH keeps the first value of an option, so they override the defaults.
pub struct Ssh {
    port: u16,
    key: PathBuf,
    known_hosts: PathBuf,
    opts: Vec<String>,
    args: Vec<String>,
    command: Option<String>,
    env: Vec<(String, String)>,
}

impl Ssh {
    pub fn new(port: u16, key: &Key, sandbox: &Sandbox) -> Ssh {
        Ssh {
            port,
            key: key.path.clone(),
            known_hosts: sandbox.join("known_hosts"),
            opts: Vec::new(),
            args: Vec::new(),
            command: None,
            env: Vec::new(),
        }
    }

    /// `-o OPTION` that overrides the harness default of the same option.
    pub fn opt(mut self, option: &str) -> Self {
        self.opts.push("-o".into());
        self.opts.push(option.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs a remote command (exec request) instead of a shell or `-N`.
    pub fn command(mut self, command: &str) -> Self {
        self.command = Some(command.into());
        self
    }

    pub fn known_hosts(mut self, path: &Path) -> Self {
        self.known_hosts = path.to_path_buf();
        self
    }

    pub fn env(mut self, var: &str, value: impl Into<String>) -> Self {
        self.env.push((var.into(), value.into()));
        self
    }

    fn build(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg("/dev/null");
        cmd.args(&self.opts);
        let kh = format!("UserKnownHostsFile={}", self.known_hosts.display());
        for opt in [
            "StrictHostKeyChecking=no",
            &kh,
            "GlobalKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "ExitOnForwardFailure=yes",
            "ServerAliveInterval=5",
            "ConnectTimeout=5",
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd.arg("-i").arg(&self.key);
        cmd.args(["-p", &self.port.to_string(), "-l", "p0rt"]);
        cmd.args(&self.args);
        cmd.arg("127.0.0.1");
        if let Some(command) = &self.command {
            cmd.arg(command);
        }
        cmd.env_remove("SSH_AUTH_SOCK");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Starts `ssh` in the background; stdout lines are collected for [`SshClient::wait_line`].
    pub fn spawn(self) -> SshClient {
        let mut child = self.build().spawn().expect("spawn ssh");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let out_lines = lines.clone();
        let stdout_reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let line = strip_ansi(&line).trim_end_matches('\r').to_string();
                out_lines.lock().unwrap().push(line);
            }
        });
        let mut err_pipe = child.stderr.take().unwrap();
        let err_text = stderr.clone();
        let stderr_reader = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                err_text
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        SshClient {
            child,
            lines,
            stderr,
            readers: vec![stdout_reader, stderr_reader],
        }
    }

    /// Runs `ssh` to completion (killed after [`WAIT`]).
    pub async fn output(self) -> SshOutput {
        let child = self.build().spawn().expect("spawn ssh");
        let out = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("ssh did not finish within {WAIT:?}"))
            .expect("wait ssh");
        SshOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).replace('\r', ""),
            stderr: String::from_utf8_lossy(&out.stderr).replace('\r', ""),
        }
    }
}

pub struct SshOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A background `ssh`; killed on drop.
pub struct SshClient {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    /// The tasks copying ssh's stdout and stderr; they end at the pipes' EOF.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl SshClient {
    /// Stdout lines so far (`\r` and ANSI codes removed).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a stdout line matching `pred` and returns it.
    pub async fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| pred(l)) {
                return line;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no stdout line {what} from ssh within {WAIT:?}; stdout {:?}; stderr {:?}",
                    self.lines(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for `ssh` to exit on its own.
    /// Once it returns, [`SshClient::lines`] and [`SshClient::stderr`] hold everything ssh
    /// wrote: the process can exit before the copying tasks have read its last words.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let status = match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.expect("wait ssh"),
            Err(_) => panic!(
                "ssh still running after {WAIT:?}; stderr {:?}",
                self.stderr()
            ),
        };
        for reader in self.readers.drain(..) {
            // Bounded: a process ssh started could still hold the pipes open.
            let _ = tokio::time::timeout(WAIT, reader).await;
        }
        status
    }

    /// `Some(status)` if ssh has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILLs ssh and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP clients
// ---------------------------------------------------------------------------------------------

/// A keep-alive reqwest client that never uses a proxy.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build()
        .expect("reqwest client")
}

/// A response read off a raw TCP connection.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code, `None` if no status line arrived.
    pub status: Option<u16>,
    pub head: String,
    pub body: String,
    /// Everything received, as text.
    pub raw: String,
}

/// Sends `request` as is on a new connection and reads one response (head and, if it has a
/// `content-length`, its body; otherwise until the connection closes). Bounded by [`WAIT`].
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect to edge");
    // The server may answer (and close) before reading everything; a failed write is fine.
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if let Some(len) = len
                && buf.len() >= end + 4 + len
            {
                break;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    parse_raw(&buf)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn parse_raw(buf: &[u8]) -> RawResponse {
    let raw = String::from_utf8_lossy(buf).to_string();
    let (head, body) = match raw.split_once("\r\n\r\n") {
        Some((h, b)) => (h.to_string(), b.to_string()),
        None => (raw.clone(), String::new()),
    };
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse().ok());
    RawResponse {
        status,
        head,
        body,
        raw,
    }
}

/// Reads from `stream` until EOF/reset or `timeout`; returns the bytes and whether it closed.
pub async fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (buf, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return (buf, false),
        }
    }
}

/// Reads a JSON body (reqwest is built without its `json` feature).
pub trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        let status = self.status();
        let text = self.text().await.expect("body");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"))
    }
}
