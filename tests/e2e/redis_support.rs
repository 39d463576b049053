//! The Redis harness: real `redis-server` processes for tests that need a Redis.
//!
//! Three shapes: a standalone server ([`RedisServer`], optionally with a password), a
//! sentinel-managed master/replica pair with three sentinels ([`SentinelGroup`]), and a
//! three-master cluster ([`RedisCluster`]). Every process is bound to 127.0.0.1 on a free port,
//! has its own temporary directory and config file (`daemonize no`, no persistence), logs to
//! `redis.log` in that directory, and is SIGKILLed on drop. Every wait is bounded. A missing
//! `redis-server` fails the test (never a skip).

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, FromRedisValue, IntoConnectionInfo, RedisConnectionInfo,
    Value,
};

use crate::support::free_port;

/// Bound for one `redis-server` process to answer after it was spawned.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for a whole group (replication link, sentinel discovery, cluster state) to settle.
pub const REDIS_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect and response timeout of the clients handed out for assertions.
pub const REDIS_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect and response timeout of the harness's own probes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Polling interval of every wait.
const POLL: Duration = Duration::from_millis(50);
/// How many fresh ports a start tries before giving up (another process may take a port
/// between [`free_port`] and `redis-server` binding it).
const PORT_ATTEMPTS: usize = 5;

const INSTALL_HINT: &str = "install redis-server (apt-get install -y redis-server)";

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// Panics (never skips) when `redis-server` or `redis-cli` is missing.
pub fn require_redis() {
    static MISSING: OnceLock<Option<&'static str>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        ["redis-server", "redis-cli"].into_iter().find(|tool| {
            Command::new(tool)
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
    });
    if let Some(tool) = missing {
        panic!("`{tool}` not found: {INSTALL_HINT}");
    }
}

// ---------------------------------------------------------------------------------------------
// Plain clients
// ---------------------------------------------------------------------------------------------

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn timeout_error(what: &str, after: Duration) -> redis::RedisError {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out after {after:?}"),
    )
    .into()
}

/// A plain (non-cluster, non-sentinel) connection to `addr`, authenticated with `password` if
/// given. Connecting and every response are bounded by `timeout`.
pub async fn connect(
    addr: SocketAddr,
    password: Option<&str>,
    timeout: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    let mut settings = RedisConnectionInfo::default();
    if let Some(password) = password {
        settings = settings.set_password(password);
    }
    let info = ConnectionAddr::Tcp(addr.ip().to_string(), addr.port())
        .into_connection_info()?
        .set_redis_settings(settings);
    let client = redis::Client::open(info)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    // The outer bound also covers the handshake (AUTH and friends).
    tokio::time::timeout(
        timeout * 2,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| timeout_error("connect", timeout * 2))?
}

/// Runs one command on a fresh connection (bounded by [`PROBE_TIMEOUT`]).
async fn query_once<T: FromRedisValue>(
    addr: SocketAddr,
    password: Option<&str>,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    let mut con = connect(addr, password, PROBE_TIMEOUT).await?;
    tokio::time::timeout(PROBE_TIMEOUT * 2, cmd.query_async(&mut con))
        .await
        .map_err(|_| timeout_error("query", PROBE_TIMEOUT * 2))?
}

/// `ROLE` of the server at `addr`: "master", "slave" or "sentinel".
pub async fn role_of(addr: SocketAddr, password: Option<&str>) -> redis::RedisResult<String> {
    let reply: Value = query_once(addr, password, &redis::cmd("ROLE")).await?;
    match reply {
        Value::Array(items) if !items.is_empty() => Ok(text(&items[0])),
        other => Ok(format!("{other:?}")),
    }
}

/// A field of an `INFO` section (`field:value` lines).
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

/// A reply element as text (bulk and simple strings, integers).
fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".into(),
        other => format!("{other:?}"),
    }
}

/// The last `lines` lines of a log file (for failure messages).
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// One redis-server process
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Server,
    Sentinel,
}

/// Why a spawn did not come up.
enum SpawnError {
    /// The process exited (typically: the port was taken); worth another try.
    Exited(String),
    /// The process runs but never answered; not worth another try.
    Silent(String),
}

/// One `redis-server` (or sentinel) in its own temporary directory; SIGKILLed on drop.
struct Proc {
    what: String,
    mode: Mode,
    port: u16,
    password: Option<String>,
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
    // Last, so it is removed after the process is gone.
    dir: tempfile::TempDir,
}

impl Proc {
    /// Writes a config (common lines, then `extra(dir, port)`) and starts the process; on a
    /// port clash tries again with a fresh port. Returns once the process answers and is
    /// really ours (its `process_id` matches).
    async fn start(
        what: &str,
        mode: Mode,
        password: Option<&str>,
        mut extra: impl FnMut(&Path, u16) -> String,
    ) -> Proc {
        require_redis();
        let dir = tempfile::Builder::new()
            .prefix("p0rt-redis-")
            .tempdir()
            .expect("redis tempdir");
        let name = if mode == Mode::Sentinel {
            "sentinel.conf"
        } else {
            "redis.conf"
        };
        let mut proc = Proc {
            what: what.to_string(),
            mode,
            port: 0,
            password: password.map(str::to_string),
            child: None,
            conf: dir.path().join(name),
            log: dir.path().join("redis.log"),
            dir,
        };
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            proc.port = free_port();
            let config = proc.base_config() + &extra(proc.dir.path(), proc.port);
            std::fs::write(&proc.conf, config).expect("write redis config");
            match proc.spawn().await {
                Ok(()) => return proc,
                Err(SpawnError::Exited(log)) => failures.push(format!("port {}: {log}", proc.port)),
                Err(SpawnError::Silent(log)) => panic!(
                    "{what} on port {} did not answer within {REDIS_START_TIMEOUT:?}; log:\n{log}",
                    proc.port
                ),
            }
        }
        panic!(
            "{what} did not start in {PORT_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        );
    }

    fn base_config(&self) -> String {
        let mut config = format!(
            "# written by the p0rt e2e harness\n\
             bind 127.0.0.1\n\
             port {port}\n\
             protected-mode no\n\
             daemonize no\n\
             dir {dir}\n\
             logfile \"\"\n",
            port = self.port,
            dir = self.dir.path().display(),
        );
        if self.mode == Mode::Server {
            config.push_str(
                "save \"\"\n\
                 appendonly no\n\
                 repl-diskless-sync yes\n\
                 repl-diskless-sync-delay 0\n",
            );
            if let Some(password) = &self.password {
                config.push_str(&format!(
                    "requirepass \"{password}\"\nmasterauth \"{password}\"\n"
                ));
            }
        }
        config
    }

    /// Spawns the process on the current config file and waits until it answers.
    async fn spawn(&mut self) -> Result<(), SpawnError> {
        assert!(self.child.is_none(), "{} already running", self.what);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open redis log");
        let mut cmd = Command::new("redis-server");
        cmd.arg(&self.conf);
        if self.mode == Mode::Sentinel {
            cmd.arg("--sentinel");
        }
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn redis-server: {e}; {INSTALL_HINT}"));
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if let Ok(Some(_)) | Err(_) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                return Err(SpawnError::Exited(log_tail(&self.log, 20)));
            }
            // Ask for the process id: a server of someone else on this port does not count.
            let info: redis::RedisResult<String> = query_once(
                self.addr(),
                self.password.as_deref(),
                redis::cmd("INFO").arg("server"),
            )
            .await;
            if let Ok(info) = info
                && info_field(&info, "process_id") == Some(pid.to_string())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(SpawnError::Silent(log_tail(&self.log, 40)));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts the process again on the same port, directory and config file. A port that
    /// is briefly unavailable is retried until [`REDIS_START_TIMEOUT`].
    async fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            match self.spawn().await {
                Ok(()) => return,
                Err(SpawnError::Silent(log)) => {
                    panic!(
                        "{} did not answer again on port {}; log:\n{log}",
                        self.what, self.port
                    )
                }
                Err(SpawnError::Exited(log)) if Instant::now() >= deadline => {
                    panic!(
                        "{} could not start again on port {}; log:\n{log}",
                        self.what, self.port
                    )
                }
                Err(SpawnError::Exited(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("{} is not running", self.what))
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILL and reap (no-op if not running).
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        format!(
            "== {} (port {}) ==\n{}",
            self.what,
            self.port,
            log_tail(&self.log, lines)
        )
    }

    async fn client(&self) -> MultiplexedConnection {
        connect(self.addr(), self.password.as_deref(), REDIS_CLIENT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("connect to {} on port {}: {e}", self.what, self.port))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` and `context()` after `timeout`.
async fn settle<T, F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
    context: impl Fn() -> String,
) -> T
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
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Standalone server
// ---------------------------------------------------------------------------------------------

/// A standalone `redis-server`; killed on drop.
pub struct RedisServer {
    proc: Proc,
}

impl RedisServer {
    /// A server without a password.
    pub async fn start() -> RedisServer {
        RedisServer {
            proc: Proc::start("redis", Mode::Server, None, |_, _| String::new()).await,
        }
    }

    /// A server with `requirepass password`.
    pub async fn start_with_password(password: &str) -> RedisServer {
        assert!(
            !password.is_empty() && !password.contains(['"', '\\', '\n', ' ']),
            "harness passwords are plain words"
        );
        RedisServer {
            proc: Proc::start("redis (password)", Mode::Server, Some(password), |_, _| {
                String::new()
            })
            .await,
        }
    }

    /// `redis://127.0.0.1:PORT` (no credentials, see [`RedisServer::url_with_password`]).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.proc.port)
    }

    /// `redis://:PASSWORD@127.0.0.1:PORT`, or [`RedisServer::url`] without a password.
    pub fn url_with_password(&self) -> String {
        match &self.proc.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.proc.port),
            None => self.url(),
        }
    }

    pub fn password(&self) -> Option<&str> {
        self.proc.password.as_deref()
    }

    pub fn port(&self) -> u16 {
        self.proc.port
    }

    pub fn addr(&self) -> SocketAddr {
        self.proc.addr()
    }

    /// Process id (panics if killed and not restarted).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// SIGKILLs the server and reaps it (the port is closed when this returns).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts the server again on the same port, directory and config (SIGKILLing it first
    /// if it still runs); returns once it answers. Nothing is persisted, so it starts empty.
    pub async fn restart(&mut self) {
        self.proc.restart().await;
    }

    /// A plain client connection (authenticated if the server has a password).
    pub async fn client(&self) -> MultiplexedConnection {
        self.proc.client().await
    }

    pub fn dir(&self) -> &Path {
        self.proc.dir.path()
    }

    /// The end of the server's log (for failure messages).
    pub fn log(&self) -> String {
        self.proc.log_tail(60)
    }
}

// ---------------------------------------------------------------------------------------------
// Sentinel group
// ---------------------------------------------------------------------------------------------

/// One master, one replica and three sentinels (quorum 2, down after 1 s, failover timeout
/// 3 s) monitoring them as `master_name`; all killed on drop.
pub struct SentinelGroup {
    name: String,
    /// The data nodes: [0] started as master, [1] as its replica.
    nodes: Vec<Proc>,
    sentinels: Vec<Proc>,
    /// The master address at the last [`SentinelGroup::kill_master`].
    killed: Option<SocketAddr>,
}

impl SentinelGroup {
    /// Starts the group and returns once the replica is in sync and every sentinel knows the
    /// replica and the two other sentinels (so a failover can happen right away).
    pub async fn start(master_name: &str) -> SentinelGroup {
        assert!(
            !master_name.is_empty()
                && master_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "master name {master_name:?} must be a plain word"
        );
        let master = Proc::start("sentinel master", Mode::Server, None, |_, _| String::new()).await;
        let master_port = master.port;
        let replica = Proc::start("sentinel replica", Mode::Server, None, |_, _| {
            format!("replicaof 127.0.0.1 {master_port}\n")
        })
        .await;
        let mut group = SentinelGroup {
            name: master_name.to_string(),
            nodes: vec![master, replica],
            sentinels: Vec::new(),
            killed: None,
        };

        // The replica is in sync before the sentinels start, so their first INFO of the master
        // already lists it (otherwise discovery waits for the next 10 s INFO period).
        let replica_addr = group.nodes[1].addr();
        settle(
            REDIS_SETTLE_TIMEOUT,
            "the replica to sync with the master",
            || async move {
                let info: String =
                    query_once(replica_addr, None, redis::cmd("INFO").arg("replication"))
                        .await
                        .ok()?;
                (info_field(&info, "master_link_status").as_deref() == Some("up")).then_some(())
            },
            || group.logs(),
        )
        .await;

        let name = group.name.clone();
        let sentinel = |_: &Path, _: u16| {
            format!(
                "sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 3000\n\
                 sentinel parallel-syncs {name} 1\n"
            )
        };
        let (s1, s2, s3) = tokio::join!(
            Proc::start("sentinel 1", Mode::Sentinel, None, sentinel),
            Proc::start("sentinel 2", Mode::Sentinel, None, sentinel),
            Proc::start("sentinel 3", Mode::Sentinel, None, sentinel),
        );
        group.sentinels = vec![s1, s2, s3];

        let sentinels: Vec<SocketAddr> = group.sentinels.iter().map(Proc::addr).collect();
        let name = group.name.clone();
        settle(
            REDIS_SETTLE_TIMEOUT,
            "every sentinel to know the replica and the other two sentinels",
            || {
                let sentinels = sentinels.clone();
                let name = name.clone();
                async move {
                    for addr in sentinels {
                        let fields = sentinel_master(addr, &name).await?;
                        let ok = fields.get("flags").map(String::as_str) == Some("master")
                            && fields.get("num-slaves").map(String::as_str) == Some("1")
                            && fields.get("num-other-sentinels").map(String::as_str) == Some("2");
                        if !ok {
                            return None;
                        }
                    }
                    Some(())
                }
            },
            || group.logs(),
        )
        .await;
        group
    }

    /// `redis-sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/NAME`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis-sentinel://{}/{}", hosts.join(","), self.name)
    }

    pub fn master_name(&self) -> &str {
        &self.name
    }

    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels.iter().map(Proc::addr).collect()
    }

    /// Addresses of the two data nodes: [0] started as master, [1] as replica.
    pub fn node_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(Proc::addr).collect()
    }

    /// The master according to the sentinels (`SENTINEL get-master-addr-by-name`): the first
    /// sentinel that answers, retried up to [`crate::support::WAIT`].
    pub async fn master_addr(&self) -> SocketAddr {
        let sentinels = self.sentinel_addrs();
        let name = self.name.clone();
        settle(
            crate::support::WAIT,
            "a sentinel to report the master address",
            || {
                let sentinels = sentinels.clone();
                let name = name.clone();
                async move {
                    for addr in sentinels {
                        if let Some(master) = master_by_name(addr, &name).await {
                            return Some(master);
                        }
                    }
                    None
                }
            },
            || self.logs(),
        )
        .await
    }

    /// SIGKILLs the data node that the sentinels currently report as master; returns its
    /// address (remembered for [`SentinelGroup::wait_failover`]).
    pub async fn kill_master(&mut self) -> SocketAddr {
        let master = self.master_addr().await;
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.addr() == master)
            .unwrap_or_else(|| {
                panic!("sentinels report master {master}, which is none of the group's nodes")
            });
        assert!(
            node.is_running(),
            "the reported master {master} is not running"
        );
        node.kill9();
        self.killed = Some(master);
        master
    }

    /// Waits until every sentinel reports the same master, different from the one killed by
    /// [`SentinelGroup::kill_master`], and that node answers `ROLE` as master. Returns it.
    pub async fn wait_failover(&self, timeout: Duration) -> SocketAddr {
        let old = self
            .killed
            .expect("wait_failover needs a kill_master first");
        let sentinels = self.sentinel_addrs();
        let name = self.name.clone();
        let last = std::sync::Mutex::new(Vec::new());
        settle(
            timeout,
            &format!("a failover away from {old}"),
            || {
                let sentinels = sentinels.clone();
                let name = name.clone();
                let last = &last;
                async move {
                    let mut answers = Vec::new();
                    for addr in sentinels {
                        answers.push(master_by_name(addr, &name).await);
                    }
                    *last.lock().unwrap() = answers.clone();
                    let first = answers[0]?;
                    if first == old || answers.iter().any(|a| *a != Some(first)) {
                        return None;
                    }
                    (role_of(first, None).await.ok()? == "master").then_some(first)
                }
            },
            || {
                format!(
                    "sentinels last reported {:?}\n{}",
                    last.lock().unwrap(),
                    self.logs()
                )
            },
        )
        .await
    }

    /// A plain connection to the current master (per the sentinels), checked with `ROLE`.
    pub async fn client_to_master(&self) -> MultiplexedConnection {
        let deadline = Instant::now() + crate::support::WAIT;
        loop {
            let master = self.master_addr().await;
            if role_of(master, None).await.is_ok_and(|r| r == "master")
                && let Ok(con) = connect(master, None, REDIS_CLIENT_TIMEOUT).await
            {
                return con;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no reachable master (sentinels say {master}) within {:?}\n{}",
                    crate::support::WAIT,
                    self.logs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The ends of all logs of the group (for failure messages).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .chain(&self.sentinels)
            .map(|p| p.log_tail(25))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `SENTINEL get-master-addr-by-name NAME` on one sentinel; `None` if it does not answer.
async fn master_by_name(sentinel: SocketAddr, name: &str) -> Option<SocketAddr> {
    let reply: Option<(String, u16)> = query_once(
        sentinel,
        None,
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(name),
    )
    .await
    .ok()?;
    let (ip, port) = reply?;
    Some(SocketAddr::new(ip.parse().ok()?, port))
}

/// `SENTINEL MASTER NAME` as a field map; `None` if the sentinel does not answer.
async fn sentinel_master(sentinel: SocketAddr, name: &str) -> Option<HashMap<String, String>> {
    let reply: Vec<String> = query_once(
        sentinel,
        None,
        redis::cmd("SENTINEL").arg("MASTER").arg(name),
    )
    .await
    .ok()?;
    Some(
        reply
            .chunks(2)
            .filter(|kv| kv.len() == 2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

/// Bound for `redis-cli --cluster create`.
const CLUSTER_CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Three cluster masters (no replicas) covering all 16384 slots; killed on drop.
pub struct RedisCluster {
    nodes: Vec<Proc>,
}

impl RedisCluster {
    /// Starts three nodes, joins them with `redis-cli --cluster create` and returns once every
    /// node reports `cluster_state:ok`.
    pub async fn start() -> RedisCluster {
        let node = |dir: &Path, _: u16| {
            // The cluster bus gets its own free port (the default, port + 10000, may not be).
            format!(
                "cluster-enabled yes\n\
                 cluster-config-file {}\n\
                 cluster-node-timeout 2000\n\
                 cluster-port {}\n",
                dir.join("nodes.conf").display(),
                free_port()
            )
        };
        let (n1, n2, n3) = tokio::join!(
            Proc::start("cluster node 1", Mode::Server, None, node),
            Proc::start("cluster node 2", Mode::Server, None, node),
            Proc::start("cluster node 3", Mode::Server, None, node),
        );
        let cluster = RedisCluster {
            nodes: vec![n1, n2, n3],
        };

        let mut cmd = tokio::process::Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for addr in cluster.nodes() {
            cmd.arg(addr.to_string());
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn redis-cli: {e}; {INSTALL_HINT}"));
        let out = tokio::time::timeout(CLUSTER_CREATE_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!("redis-cli --cluster create did not finish within {CLUSTER_CREATE_TIMEOUT:?}\n{}", cluster.logs())
            })
            .expect("wait redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );

        let addrs = cluster.nodes();
        settle(
            REDIS_SETTLE_TIMEOUT,
            "cluster_state:ok on every node",
            || {
                let addrs = addrs.clone();
                async move {
                    for addr in addrs {
                        let info: String =
                            query_once(addr, None, redis::cmd("CLUSTER").arg("INFO"))
                                .await
                                .ok()?;
                        if info_field(&info, "cluster_state").as_deref() != Some("ok") {
                            return None;
                        }
                    }
                    Some(())
                }
            },
            || cluster.logs(),
        )
        .await;
        cluster
    }

    /// `redis://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes().iter().map(SocketAddr::to_string).collect();
        format!("redis://{}", hosts.join(","))
    }

    /// The node addresses, in start order.
    pub fn nodes(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(Proc::addr).collect()
    }

    /// A plain (not cluster-aware) connection to one node.
    pub async fn node_client(&self, node: SocketAddr) -> MultiplexedConnection {
        connect(node, None, REDIS_CLIENT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("connect to cluster node {node}: {e}"))
    }

    /// The node that serves `key`'s slot (`CLUSTER KEYSLOT` + `CLUSTER SLOTS`).
    pub async fn node_for_key(&self, key: &str) -> SocketAddr {
        let mut con = self.node_client(self.nodes()[0]).await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut con)
            .await
            .expect("CLUSTER KEYSLOT");
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut con)
            .await
            .expect("CLUSTER SLOTS");
        let Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS answered {slots:?}")
        };
        for range in ranges {
            let Value::Array(fields) = range else {
                continue;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                continue;
            };
            if (*start..=*end).contains(&slot)
                && let (Some(ip), Some(Value::Int(port))) = (master.first(), master.get(1))
            {
                return SocketAddr::new(text(ip).parse().expect("node ip"), *port as u16);
            }
        }
        panic!("no node serves slot {slot} of {key:?}")
    }

    /// Runs `cmd` about `key` on the node serving it, following `MOVED`/`ASK` redirections.
    pub async fn query<T: FromRedisValue>(&self, key: &str, cmd: &redis::Cmd) -> T {
        let mut node = self.node_for_key(key).await;
        let mut asking = false;
        for _ in 0..5 {
            let mut con = self.node_client(node).await;
            if asking {
                let _: () = redis::cmd("ASKING")
                    .query_async(&mut con)
                    .await
                    .expect("ASKING");
            }
            match cmd.query_async::<T>(&mut con).await {
                Ok(v) => return v,
                Err(e) => match e.redirect_node() {
                    Some((to, _slot)) => {
                        node = to.parse().unwrap_or_else(|_| panic!("redirect to {to:?}"));
                        asking = e.code() == Some("ASK");
                    }
                    None => panic!("{cmd:?} on {node} for {key:?}: {e}"),
                },
            }
        }
        panic!("too many redirections for {key:?}")
    }

    /// `GET key` on the right node.
    pub async fn get(&self, key: &str) -> Option<String> {
        self.query(key, redis::cmd("GET").arg(key)).await
    }

    /// `SET key value` on the right node.
    pub async fn set(&self, key: &str, value: &str) {
        let _: () = self.query(key, redis::cmd("SET").arg(key).arg(value)).await;
    }

    /// `HGETALL key` on the right node.
    pub async fn hgetall(&self, key: &str) -> HashMap<String, String> {
        self.query(key, redis::cmd("HGETALL").arg(key)).await
    }

    /// The ends of all node logs (for failure messages).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|p| p.log_tail(25))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
