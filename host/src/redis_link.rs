//! Connections to Redis for the domain store and the cache.
//!
//! Accepts every URL form of the seed: `redis://host:port`, `redis://:password@host:port`,
//! `redis://host:port/1`, `rediss://…` (TLS), `redis-sentinel://s1:26379,s2:26379/mymaster`
//! and a comma-separated node list for Redis Cluster (`redis://n1:6379,n2:6379,n3:6379`).
//! `REDIS_PASSWORD` and `REDIS_DB` apply on top of the URL.
//!
//! Every operation has a timeout that covers everything, waiting for a connection included,
//! so a slow, hung or unreachable Redis never stalls a caller for longer than it asked.
//! A broken connection is dropped and re-made on the next use: one attempt at a time, in its
//! own task, at most once per [`RECONNECT_BACKOFF`]; callers wait on it within their own
//! deadline. Under Sentinel, re-making it asks the sentinels for the current master, which is
//! how a failover is followed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisFuture, Value};

/// Time allowed to open a connection (and, under Sentinel, to find the master).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Most time one connection attempt may take (under Sentinel: the sentinels, then the master).
pub const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2000);
/// Pause between reconnection attempts while Redis is unreachable; callers fail fast meanwhile.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);
/// Keys fetched per `SCAN` step.
pub const SCAN_BATCH: usize = 1000;

/// Where Redis is, parsed from the URL plus `REDIS_PASSWORD` / `REDIS_DB`.
#[derive(Clone)]
pub enum RedisTarget {
    Standalone(redis::ConnectionInfo),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        password: Option<String>,
        db: i64,
        tls: bool,
    },
    Cluster {
        nodes: Vec<String>,
        password: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("REDIS_URL {url}: {problem}")]
    BadUrl { url: String, problem: String },
}

/// Why a Redis operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisOpError {
    #[error("redis did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("redis is unreachable: {0}")]
    Unreachable(String),
    #[error("redis refused the credentials: {0} (check REDIS_PASSWORD or the URL's password)")]
    Auth(String),
    #[error("cannot set up the connection: {0} (check the URL and, for rediss://, REDIS_CA_CERT)")]
    Config(String),
    #[error("unexpected data at {key}: {detail}")]
    WrongType { key: String, detail: String },
    #[error("redis error: {0}")]
    Other(String),
}

/// `redis://user:secret@host` → `redis://user:****@host`, for logs and messages.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(user, _)| user);
            format!("{scheme}://{user}:****@{host}")
        }
        None => url.to_string(),
    }
}

fn bad_url(url: &str, problem: impl Into<String>) -> RedisSetupError {
    RedisSetupError::BadUrl {
        url: mask_url(url),
        problem: problem.into(),
    }
}

/// Splits `user:pass@h1:p1,h2:p2/path` into (password, hosts, path).
fn split_authority(rest: &str) -> (Option<String>, &str, &str) {
    let (userinfo, tail) = match rest.rsplit_once('@') {
        Some((userinfo, tail)) => (Some(userinfo), tail),
        None => (None, rest),
    };
    let password = userinfo
        .and_then(|u| u.split_once(':').map(|(_, p)| p.to_string()))
        .filter(|p| !p.is_empty());
    let (hosts, path) = tail.split_once('/').unwrap_or((tail, ""));
    (password, hosts, path)
}

fn check_hosts(url: &str, hosts: &str) -> Result<Vec<String>, RedisSetupError> {
    let list: Vec<String> = hosts.split(',').map(|h| h.trim().to_string()).collect();
    for host in &list {
        let (name, port) = host
            .rsplit_once(':')
            .ok_or_else(|| bad_url(url, format!("node {host:?} needs a port, as host:port")))?;
        if name.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad_url(url, format!("node {host:?} is not host:port")));
        }
    }
    Ok(list)
}

/// Parses a Redis URL. `password` and `db` (from `REDIS_PASSWORD` / `REDIS_DB`) override the URL's.
pub fn parse_target(
    url: &str,
    password: Option<&str>,
    db: Option<u32>,
) -> Result<RedisTarget, RedisSetupError> {
    let url = url.trim();
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad_url(url, "expected redis://, rediss:// or redis-sentinel://"))?;
    match scheme {
        "redis-sentinel" | "rediss-sentinel" => {
            let (url_password, hosts, path) = split_authority(rest);
            let sentinels = check_hosts(url, hosts)?;
            let mut parts = path.split('/').filter(|p| !p.is_empty());
            let master = parts
                .next()
                .ok_or_else(|| bad_url(url, "name the master after the sentinels: redis-sentinel://s1:26379,s2:26379/mymaster"))?
                .to_string();
            let url_db = match parts.next() {
                Some(n) => n
                    .parse::<i64>()
                    .map_err(|_| bad_url(url, format!("database {n:?} is not a number")))?,
                None => 0,
            };
            Ok(RedisTarget::Sentinel {
                sentinels,
                master,
                password: password.map(str::to_string).or(url_password),
                db: db.map(i64::from).unwrap_or(url_db),
                tls: scheme == "rediss-sentinel",
            })
        }
        "redis" | "rediss" => {
            let (url_password, hosts, path) = split_authority(rest);
            if hosts.contains(',') {
                let nodes = check_hosts(url, hosts)?;
                if !path.is_empty() && path != "0" || db.is_some_and(|d| d != 0) {
                    return Err(bad_url(
                        url,
                        "Redis Cluster has only database 0; drop the /db part and REDIS_DB",
                    ));
                }
                return Ok(RedisTarget::Cluster {
                    nodes: nodes
                        .into_iter()
                        .map(|n| format!("{scheme}://{n}"))
                        .collect(),
                    password: password.map(str::to_string).or(url_password),
                });
            }
            let mut info = url
                .into_connection_info()
                .map_err(|e| bad_url(url, e.to_string()))?;
            let mut settings = info.redis_settings().clone();
            if let Some(password) = password {
                settings = settings.set_password(password);
            }
            if let Some(db) = db {
                settings = settings.set_db(i64::from(db));
            }
            info = info.set_redis_settings(settings);
            Ok(RedisTarget::Standalone(info))
        }
        other => Err(bad_url(
            url,
            format!("unknown scheme {other:?}; expected redis://, rediss:// or redis-sentinel://"),
        )),
    }
}

/// One live connection, to a single server or to a cluster.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection attempt in flight: `None` until it ends.
type Attempt = tokio::sync::watch::Receiver<Option<Result<Conn, RedisOpError>>>;

#[derive(Default)]
struct LinkState {
    conn: Option<Conn>,
    /// The one connection attempt in flight; everyone who needs a connection waits on it.
    connecting: Option<Attempt>,
    retry_at: Option<Instant>,
    last_error: Option<RedisOpError>,
}

/// A self-healing connection to Redis, shared by everything that talks to it.
pub struct RedisLink {
    target: RedisTarget,
    /// PEM root certificate(s) trusted for `rediss://`, instead of the system's.
    ca_cert: Option<Vec<u8>>,
    /// The URL with its password masked, for messages.
    pub display: String,
    /// Held only for short, non-async updates: never across a connection attempt.
    state: std::sync::Mutex<LinkState>,
}

fn classify(e: &redis::RedisError) -> RedisOpError {
    let text = e.to_string();
    if matches!(e.code(), Some("WRONGPASS") | Some("NOAUTH")) {
        return RedisOpError::Auth(text);
    }
    // Also inside a script, where older servers wrap the code in "ERR Error running script".
    if e.code() == Some("WRONGTYPE") || text.contains("WRONGTYPE") {
        return RedisOpError::WrongType {
            key: String::new(),
            detail: text,
        };
    }
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        return RedisOpError::Auth(text);
    }
    if e.kind() == redis::ErrorKind::InvalidClientConfig || text.contains("certificate") {
        return RedisOpError::Config(text);
    }
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        return RedisOpError::Unreachable(text);
    }
    RedisOpError::Other(text)
}

/// True if the connection should be dropped and made again (includes a demoted master,
/// which answers READONLY after a Sentinel failover).
fn needs_reconnect(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || e.is_timeout()
        || e.code() == Some("READONLY")
        || e.code() == Some("MASTERDOWN")
}

impl RedisLink {
    pub fn new(target: RedisTarget, display_url: &str, ca_cert: Option<Vec<u8>>) -> Arc<RedisLink> {
        Arc::new(RedisLink {
            target,
            ca_cert,
            display: mask_url(display_url),
            state: std::sync::Mutex::new(LinkState::default()),
        })
    }

    /// True for Redis Cluster, where a pipeline's keys must share a slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, RedisTarget::Cluster { .. })
    }

    fn certificates(&self) -> Option<redis::TlsCertificates> {
        self.ca_cert.as_ref().map(|pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        })
    }

    /// A client for one server, trusting REDIS_CA_CERT for `rediss://` if it is set.
    fn client(&self, info: redis::ConnectionInfo) -> Result<redis::Client, RedisOpError> {
        match self.certificates() {
            Some(certs) => redis::Client::build_with_tls(info, certs),
            None => redis::Client::open(info),
        }
        .map_err(|e| classify(&e))
    }

    async fn connect(&self) -> Result<Conn, RedisOpError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        let err = |e: redis::RedisError| classify(&e);
        match &self.target {
            RedisTarget::Standalone(info) => Ok(Conn::Single(
                self.client(info.clone())?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(err)?,
            )),
            RedisTarget::Sentinel { .. } => Ok(Conn::Single(
                self.sentinel_client()
                    .await?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(err)?,
            )),
            RedisTarget::Cluster { nodes, password } => {
                let mut builder = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(CONNECT_TIMEOUT)
                    .retries(1);
                if let Some(password) = password {
                    builder = builder.password(password.clone());
                }
                if nodes.iter().any(|n| n.starts_with("rediss://")) {
                    builder = builder.tls(redis::TlsMode::Secure);
                    if let Some(certs) = self.certificates() {
                        builder = builder.certs(certs);
                    }
                }
                let client = builder.build().map_err(err)?;
                Ok(Conn::Cluster(
                    client.get_async_connection().await.map_err(err)?,
                ))
            }
        }
    }

    /// A client for the current master, as the sentinels name it.
    async fn sentinel_client(&self) -> Result<redis::Client, RedisOpError> {
        let err = |e: redis::RedisError| classify(&e);
        let RedisTarget::Sentinel {
            sentinels,
            master,
            password,
            db,
            tls,
        } = &self.target
        else {
            return Err(RedisOpError::Config("not a Sentinel target".into()));
        };
        let addrs: Vec<redis::ConnectionAddr> = sentinels
            .iter()
            .filter_map(|s| {
                let (host, port) = s.rsplit_once(':')?;
                Some(redis::ConnectionAddr::Tcp(
                    host.to_string(),
                    port.parse().ok()?,
                ))
            })
            .collect();
        let mut builder = redis::sentinel::SentinelClientBuilder::new(
            addrs,
            master.clone(),
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(err)?
        .set_client_to_redis_db(*db);
        if let Some(password) = password {
            builder = builder.set_client_to_redis_password(password);
        }
        if *tls {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = self.certificates() {
                builder = builder.set_client_to_redis_certificates(certs);
            }
        }
        let mut sentinel = builder.build().map_err(err)?;
        sentinel.async_get_client().await.map_err(err)
    }

    /// A new connection for `SUBSCRIBE` (pub/sub needs one of its own): to the server, to
    /// the current master under Sentinel, or to the first Cluster node that answers (a
    /// cluster hands every `PUBLISH` to the subscribers of every node).
    pub async fn pubsub(self: &Arc<Self>) -> Result<redis::aio::PubSub, RedisOpError> {
        let err = |e: redis::RedisError| classify(&e);
        let attempt = async {
            match &self.target {
                RedisTarget::Standalone(info) => self
                    .client(info.clone())?
                    .get_async_pubsub()
                    .await
                    .map_err(err),
                RedisTarget::Sentinel { .. } => self
                    .sentinel_client()
                    .await?
                    .get_async_pubsub()
                    .await
                    .map_err(err),
                RedisTarget::Cluster { nodes, password } => {
                    let mut last = RedisOpError::Unreachable("no cluster node".into());
                    for node in nodes {
                        let mut info = node
                            .as_str()
                            .into_connection_info()
                            .map_err(|e| RedisOpError::Config(e.to_string()))?;
                        if let Some(password) = password {
                            let settings = info.redis_settings().clone().set_password(password);
                            info = info.set_redis_settings(settings);
                        }
                        match self.client(info)?.get_async_pubsub().await {
                            Ok(pubsub) => return Ok(pubsub),
                            Err(e) => last = classify(&e),
                        }
                    }
                    Err(last)
                }
            }
        };
        tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(RedisOpError::Timeout(CONNECT_ATTEMPT_TIMEOUT)))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        // Every update is a plain assignment, so a poisoned lock still holds a sane state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current connection, or the outcome of the one attempt in flight (starting it if
    /// there is none and the backoff since the last failure has passed; failing fast if not).
    async fn connection(self: &Arc<Self>) -> Result<Conn, RedisOpError> {
        let mut attempt = {
            let mut state = self.state();
            if let Some(conn) = &state.conn {
                return Ok(conn.clone());
            }
            match &state.connecting {
                Some(attempt) => attempt.clone(),
                None => {
                    if let Some(retry_at) = state.retry_at
                        && Instant::now() < retry_at
                    {
                        return Err(state
                            .last_error
                            .clone()
                            .unwrap_or_else(|| RedisOpError::Unreachable("reconnecting".into())));
                    }
                    let attempt = self.start_connecting();
                    state.connecting = Some(attempt.clone());
                    attempt
                }
            }
        };
        if let Ok(outcome) = attempt.wait_for(Option::is_some).await {
            return outcome
                .clone()
                .unwrap_or_else(|| unreachable!("waited for Some"));
        }
        // The attempt's task ended without a word (a panic): let the next caller start anew.
        let mut state = self.state();
        if (state.connecting.as_ref()).is_some_and(|a| a.same_channel(&attempt)) {
            state.connecting = None;
        }
        Err(RedisOpError::Unreachable(
            "the connection attempt was abandoned".into(),
        ))
    }

    /// Runs one connection attempt in its own task, so a caller that gives up (its deadline)
    /// never cancels the attempt the others are waiting on.
    fn start_connecting(self: &Arc<Self>) -> Attempt {
        let (done, attempt) = tokio::sync::watch::channel(None);
        let link = self.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, link.connect())
                .await
                .unwrap_or(Err(RedisOpError::Timeout(CONNECT_ATTEMPT_TIMEOUT)));
            {
                let mut state = link.state();
                state.connecting = None;
                match &result {
                    Ok(conn) => {
                        state.conn = Some(conn.clone());
                        state.retry_at = None;
                        state.last_error = None;
                    }
                    Err(e) => {
                        state.retry_at = Some(Instant::now() + RECONNECT_BACKOFF);
                        state.last_error = Some(e.clone());
                    }
                }
            }
            let _ = done.send(Some(result));
        });
        attempt
    }

    /// The connection, waited for until `deadline` at most: a caller's budget covers the wait.
    async fn connection_by(
        self: &Arc<Self>,
        deadline: tokio::time::Instant,
        budget: Duration,
    ) -> Result<Conn, RedisOpError> {
        tokio::time::timeout_at(deadline, self.connection())
            .await
            .unwrap_or(Err(RedisOpError::Timeout(budget)))
    }

    fn drop_connection(&self) {
        self.state().conn = None;
    }

    /// Runs one command; `timeout` covers everything, waiting for a connection included.
    pub async fn query<T: FromRedisValue>(
        self: &Arc<Self>,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Result<T, RedisOpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut conn = self.connection_by(deadline, timeout).await?;
        let outcome = tokio::time::timeout_at(deadline, cmd.query_async::<T>(&mut conn)).await;
        self.settle(outcome, timeout)
    }

    /// Runs a pipeline, like [`query`](Self::query). On Cluster all its keys must share a slot.
    pub async fn query_pipeline<T: FromRedisValue>(
        self: &Arc<Self>,
        pipe: &Pipeline,
        timeout: Duration,
    ) -> Result<T, RedisOpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut conn = self.connection_by(deadline, timeout).await?;
        let outcome = tokio::time::timeout_at(deadline, pipe.query_async::<T>(&mut conn)).await;
        self.settle(outcome, timeout)
    }

    /// Maps a command's outcome, dropping the connection when it is no longer usable.
    fn settle<T>(
        &self,
        outcome: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        timeout: Duration,
    ) -> Result<T, RedisOpError> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if needs_reconnect(&e) {
                    self.drop_connection();
                }
                Err(classify(&e))
            }
            Err(_) => {
                self.drop_connection();
                Err(RedisOpError::Timeout(timeout))
            }
        }
    }

    /// `PING`, returning the round-trip time.
    pub async fn ping(self: &Arc<Self>, timeout: Duration) -> Result<Duration, RedisOpError> {
        let started = Instant::now();
        let _: String = self.query(&redis::cmd("PING"), timeout).await?;
        Ok(started.elapsed())
    }

    /// Keys matching `pattern` (on every master of a cluster), via `SCAN`; stops as soon as
    /// `limit` have been found. `timeout` applies to each step.
    pub async fn scan(
        self: &Arc<Self>,
        pattern: &str,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, RedisOpError> {
        let RedisTarget::Cluster { nodes, password } = &self.target else {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut conn = self.connection_by(deadline, timeout).await?;
            return scan_one(&mut conn, pattern, limit, timeout).await;
        };
        // SCAN is per node: ask every master, connecting to each the way the cluster is reached.
        let scheme = if nodes.iter().any(|n| n.starts_with("rediss://")) {
            "rediss"
        } else {
            "redis"
        };
        let listing: String = self
            .query(redis::cmd("CLUSTER").arg("NODES"), timeout)
            .await?;
        let mut keys = Vec::new();
        for line in listing.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 3 || !fields[2].split(',').any(|f| f == "master") {
                continue;
            }
            let addr = fields[1].split('@').next().unwrap_or("");
            if fields[2].contains("fail") {
                // Its keys cannot be listed: an answer without them would be wrong.
                return Err(RedisOpError::Unreachable(format!(
                    "cluster master {addr} is failing ({})",
                    fields[2]
                )));
            }
            let mut info = format!("{scheme}://{addr}")
                .into_connection_info()
                .map_err(|e| RedisOpError::Other(e.to_string()))?;
            if let Some(password) = password {
                let settings = info.redis_settings().clone().set_password(password);
                info = info.set_redis_settings(settings);
            }
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(timeout));
            let mut conn = Conn::Single(
                self.client(info)?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| classify(&e))?,
            );
            keys.extend(scan_one(&mut conn, pattern, limit - keys.len(), timeout).await?);
            if keys.len() >= limit {
                break;
            }
        }
        Ok(keys)
    }

    /// Opens a connection now, to report a bad URL or password at startup.
    pub async fn check(self: &Arc<Self>) -> Result<Duration, RedisOpError> {
        self.ping(CONNECT_ATTEMPT_TIMEOUT).await
    }
}

/// Up to `limit` keys matching `pattern` on one server.
async fn scan_one(
    conn: &mut Conn,
    pattern: &str,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<String>, RedisOpError> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_BATCH);
        let (next, batch): (u64, Vec<String>) =
            match tokio::time::timeout(timeout, cmd.query_async(conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(classify(&e)),
                Err(_) => return Err(RedisOpError::Timeout(timeout)),
            };
        keys.extend(batch);
        if keys.len() >= limit {
            keys.truncate(limit);
            return Ok(keys);
        }
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operations against a Redis that accepts connections and never answers, in waves over
    /// several connection attempts: each returns within its own deadline, none queues
    /// behind another's connection attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_operation_waits_past_its_deadline_for_a_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let target = parse_target(&format!("redis://{addr}"), None, None).unwrap();
        let link = RedisLink::new(target, "redis://blackhole", None);
        let deadline = Duration::from_millis(150);
        let mut ops = Vec::new();
        for _wave in 0..12 {
            for _ in 0..10 {
                let link = link.clone();
                ops.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let result = link.ping(deadline).await;
                    (started.elapsed(), result)
                }));
            }
            // Pacing, not waiting: the waves span more than one attempt and its backoff.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for op in ops {
            let (took, result) = op.await.unwrap();
            assert!(result.is_err(), "a black hole never answers");
            assert!(
                took < deadline + Duration::from_millis(150),
                "took {took:?}"
            );
        }
    }

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url("redis://:hunter2@h:6379/1"),
            "redis://:****@h:6379/1"
        );
        assert_eq!(mask_url("redis://u:p@h:1"), "redis://u:****@h:1");
        assert_eq!(mask_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn parses_every_seed_form() {
        assert!(matches!(
            parse_target("redis://localhost:6379", None, None),
            Ok(RedisTarget::Standalone(_))
        ));
        let Ok(RedisTarget::Standalone(info)) =
            parse_target("redis://:pw@localhost:6379/1", None, None)
        else {
            panic!()
        };
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert_eq!(info.redis_settings().db(), 1);
        let Ok(RedisTarget::Standalone(info)) =
            parse_target("redis://:pw@localhost:6379/1", Some("env"), Some(3))
        else {
            panic!()
        };
        assert_eq!(info.redis_settings().password(), Some("env"));
        assert_eq!(info.redis_settings().db(), 3);
        let Ok(RedisTarget::Sentinel {
            sentinels, master, ..
        }) = parse_target("redis-sentinel://s1:26379,s2:26379/mymaster", None, None)
        else {
            panic!()
        };
        assert_eq!((sentinels.len(), master.as_str()), (2, "mymaster"));
        let Ok(RedisTarget::Cluster { nodes, .. }) =
            parse_target("redis://n1:6379,n2:6379,n3:6379", None, None)
        else {
            panic!()
        };
        assert_eq!(
            nodes,
            vec!["redis://n1:6379", "redis://n2:6379", "redis://n3:6379"]
        );
    }

    #[test]
    fn bad_urls_name_the_problem_without_the_password() {
        for (url, needle) in [
            ("http://:secret@h:1", "unknown scheme"),
            ("redis-sentinel://:secret@s1:26379", "name the master"),
            ("redis://:secret@n1:6379,n2", "host:port"),
            ("redis://:secret@n1:1,n2:2/3", "only database 0"),
            ("localhost:6379", "expected redis://"),
        ] {
            let e = parse_target(url, None, None).err().unwrap().to_string();
            assert!(e.contains(needle), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: {e}");
        }
    }
}
