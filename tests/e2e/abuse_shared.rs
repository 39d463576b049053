//! Abuse controls that several hosts share through one Redis (issue 13), through the real
//! binary, real `redis-server` processes (standalone and a three-master Cluster), the real
//! OpenSSH client and real HTTP clients: one client's rate limit holds across two hosts, a
//! failed-auth ban earned on one host holds on the other (and `p0rt security unban` lifts it
//! for both), and a rate-limit plugin that traps leaves the built-in limiter in charge (fail
//! open, never unlimited).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::plugins::{client_from, install_hostile, plugins_dir, wait_active, write_atomic};
use crate::policy::{Answer, get};
use crate::redis_support::{RedisCluster, RedisServer, require_redis};
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The Redis that two hosts share: one server, or a three-master Cluster.
enum SharedRedis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl SharedRedis {
    async fn start(cluster: bool) -> SharedRedis {
        require_redis();
        if cluster {
            SharedRedis::Cluster(RedisCluster::start().await)
        } else {
            SharedRedis::One(RedisServer::start().await)
        }
    }

    fn url(&self) -> String {
        match self {
            SharedRedis::One(redis) => redis.url(),
            SharedRedis::Cluster(cluster) => cluster.url(),
        }
    }

    /// `GET key` (on the node that serves it, for the Cluster).
    async fn get(&self, key: &str) -> Option<String> {
        match self {
            SharedRedis::One(redis) => {
                let mut con = redis.client().await;
                redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut con)
                    .await
                    .unwrap_or_else(|e| panic!("GET {key}: {e}"))
            }
            SharedRedis::Cluster(cluster) => cluster.get(key).await,
        }
    }

    fn logs(&self) -> String {
        match self {
            SharedRedis::One(redis) => redis.log(),
            SharedRedis::Cluster(cluster) => cluster.logs(),
        }
    }
}

/// A host whose store (and so cache and ban list) is the Redis at `url`, with its own data
/// directory `<sandbox>/<name>`.
fn redis_host(sb: &Sandbox, name: &str, url: &str) -> HostConfig {
    HostConfig::flags(&sb.join(name))
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", url)
}

/// Waits until the host's plugin cache runs on Redis (`/health/redis` healthy): until then
/// the cache is the in-memory fallback, which other hosts do not see.
async fn wait_cache_on_redis(host: &Host) {
    let mut last = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let res = host.get_base("/health/redis").await;
        last = serde_json::from_str(&res.text().await.unwrap_or_default())
            .unwrap_or(serde_json::Value::Null);
        if last["status"] == "healthy" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the cache of the host on port {} is not on Redis within {WAIT:?}: /health/redis says \
         {last}; log:\n{}",
        host.http_port,
        host.log()
    );
}

/// Log lines that say a host answered without its shared state (by design, fail open): a
/// plugin call that fell back to the built-in limiter, or a cache that fell back to memory.
fn fallbacks(hosts: &[&Host]) -> usize {
    hosts
        .iter()
        .map(|h| {
            let log = h.log();
            log.matches("rate limiting falls back").count()
                + log.matches("benched for").count()
                + log.matches("redis cache unavailable").count()
        })
        .sum()
}

/// Waits until the host's rate-limit plugin is active and not benched (while benched, the
/// built-in limiter answers without a log line per request).
async fn wait_rate_limit_plugin_serving(host: &Host, origin: &str) {
    crate::plugins::wait_plugin(host, origin, "the rate-limit plugin to serve", |p| {
        p["active"] == true && p["role"] == "rate-limit" && p["error"].is_null()
    })
    .await;
}

/// One answer of a burst.
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: String,
}

/// `n` requests, one after the other, to `name` on `host` from `client`.
async fn sequential(client: &reqwest::Client, host: &Host, name: &str, n: usize) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(n);
    for i in 0..n {
        let answer = Answer::of(get(client, host, name, &format!("/echo/{i}"))).await;
        replies.push(Reply {
            status: answer.status,
            retry_after: answer.header("retry-after").map(str::to_string),
            body: answer.body,
        });
    }
    replies
}

/// `n` requests to `name` on `host` from `client`, on `connections` connections at once.
async fn burst(
    client: &reqwest::Client,
    host: &Host,
    name: &str,
    connections: usize,
    n: usize,
) -> Vec<Reply> {
    assert_eq!(
        n % connections,
        0,
        "{n} requests on {connections} connections"
    );
    futures_util::future::join_all(
        (0..connections).map(|_| sequential(client, host, name, n / connections)),
    )
    .await
    .into_iter()
    .flatten()
    .collect()
}

/// Checks that every reply is a 2xx or a 429 with a `Retry-After` of 1..=`window` seconds
/// naming `message`; returns how many were 2xx.
fn admitted(replies: &[Reply], window: u64, message: &str, what: &str) -> usize {
    for (i, reply) in replies.iter().enumerate() {
        match reply.status {
            200..=299 => {}
            429 => {
                let retry: u64 = reply
                    .retry_after
                    .as_deref()
                    .unwrap_or_else(|| panic!("{what}: reply {i} is a 429 without Retry-After"))
                    .parse()
                    .unwrap_or_else(|e| panic!("{what}: reply {i}: Retry-After: {e}"));
                assert!(
                    (1..=window).contains(&retry),
                    "{what}: reply {i}: Retry-After {retry} is not within 1..={window}"
                );
                assert!(
                    reply.body.contains(message),
                    "{what}: reply {i}: 429 body {:?} does not say {message:?}",
                    reply.body
                );
            }
            other => panic!(
                "{what}: reply {i} is neither 2xx nor 429 but {other}: {:?}",
                reply.body
            ),
        }
    }
    replies
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .count()
}

/// Sleeps, if needed, so that at least `margin` seconds are left in the current fixed
/// window of `window` seconds; returns the window's index.
async fn window_with_room(window: i64, margin: i64) -> i64 {
    let left = window - p0rt::unix_now().rem_euclid(window);
    if left < margin {
        tokio::time::sleep(Duration::from_secs(left as u64 + 1)).await;
    }
    p0rt::unix_now().div_euclid(window)
}

// ---------------------------------------------------------------------------------------------
// 1. One rate limit across two hosts on one Redis
// ---------------------------------------------------------------------------------------------

/// The per-client-IP limit (requests per window) of the burst tests.
const LIMIT: usize = 40;
/// Its window: long, so that a burst rarely straddles two windows (one that does is retried).
const WINDOW_SECONDS: i64 = 3600;
/// Requests each host receives: more than [`LIMIT`], see [`same_limit_across_two_hosts`].
const PER_HOST: usize = 96;
/// Connections each host's share comes on, all at once (one request after the other on each).
const CONNECTIONS_PER_HOST: usize = 8;
/// The 429 body of the per-IP bucket (plugins/ratelimit).
const PER_IP_MESSAGE: &str = "too many requests from your address";

/// Two hosts on one Redis (store, so cache, there), each serving one tunnel, with the
/// bundled ratelimit plugin configured by a `ratelimit.json` sidecar: [`LIMIT`] requests per
/// client IP per window (the tunnel and key buckets are on, with limits the test never
/// reaches, so every request counts three keys in one `increment-many`; on Cluster those are
/// in different slots). One client address sends [`PER_HOST`] requests to each host's
/// tunnel, on [`CONNECTIONS_PER_HOST`] connections per host, both hosts at once.
///
/// Tolerance: none, the admitted count is exactly [`LIMIT`]. The counters live in Redis. A
/// lease (the plugin counts up to 64 further requests of a busy client up front, never more
/// than a quarter of what a bucket has left, and the
/// host admits them without asking) is counted in Redis before the host uses it, and the
/// part of it that the other host's requests pushed over the limit meanwhile is given back,
/// so the hosts together never admit more than the limit. Leased requests left unused would
/// deny early (by at most one lease, ≤ 64, per host); none is left here, because the host
/// keeps a lease it holds when concurrent requests bring it another one (it adds them up)
/// and each host sends more requests (96) than it can be admitted (40), so every leased
/// request is used before its requests run out.
/// An attempt is inconclusive (and repeated from a fresh address) when the window ended
/// during it, or when a host logged that it answered without Redis (a plugin call over its
/// deadline falls back to the built-in per-host limiter; a slow Redis call moves the cache
/// to memory): both are the designed fail-open paths on a busy machine, not the shared limit.
async fn same_limit_across_two_hosts(cluster: bool) {
    let redis = SharedRedis::start(cluster).await;
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let sidecar = dir.join("ratelimit.json");
    let sidecar_text = json!({ "config": {
        "per_ip": { "limit": LIMIT, "window_seconds": WINDOW_SECONDS },
        "per_tunnel": { "limit": 1_000_000, "window_seconds": WINDOW_SECONDS },
        "per_key": { "limit": 1_000_000, "window_seconds": WINDOW_SECONDS },
    }})
    .to_string();
    write_atomic(&sidecar, sidecar_text.as_bytes());
    let config = |name: &str| {
        redis_host(&sb, name, &redis.url())
            .arg("--plugins-dir")
            .arg(dir.to_string_lossy())
    };
    let (a, b) = tokio::join!(
        Host::start_with(&sb, config("a")),
        Host::start_with(&sb, config("b"))
    );
    let origin = sidecar.display().to_string();
    for host in [&a, &b] {
        wait_rate_limit_plugin_serving(host, &origin).await;
        wait_cache_on_redis(host).await;
    }
    let (key_a, key_b) = (sb.key("on-a"), sb.key("on-b"));
    let (backend_a, backend_b) = (Backend::start("a").await, Backend::start("b").await);
    let (_ssh_a, name_a) = a.tunnel(&sb, &key_a, &backend_a).await;
    let (_ssh_b, name_b) = b.tunnel(&sb, &key_b, &backend_b).await;

    let mut inconclusive = Vec::new();
    for attempt in 0..3 {
        let ip = format!("127.0.5.{}", 10 + attempt);
        let window = window_with_room(WINDOW_SECONDS, 30).await;
        for host in [&a, &b] {
            wait_rate_limit_plugin_serving(host, &origin).await;
            wait_cache_on_redis(host).await;
        }
        let before = fallbacks(&[&a, &b]);
        let hits = (backend_a.hits(), backend_b.hits());
        let (to_a, to_b) = (client_from(&ip), client_from(&ip));
        let (replies_a, replies_b) = tokio::join!(
            burst(&to_a, &a, &name_a, CONNECTIONS_PER_HOST, PER_HOST),
            burst(&to_b, &b, &name_b, CONNECTIONS_PER_HOST, PER_HOST)
        );
        let ok_a = admitted(&replies_a, WINDOW_SECONDS as u64, PER_IP_MESSAGE, "host A");
        let ok_b = admitted(&replies_b, WINDOW_SECONDS as u64, PER_IP_MESSAGE, "host B");
        let figures = format!(
            "{ip}: {} requests ({PER_HOST} per host on {CONNECTIONS_PER_HOST} connections), \
             limit {LIMIT}: 2xx {} (A {ok_a}, B {ok_b}), 429 {}",
            2 * PER_HOST,
            ok_a + ok_b,
            2 * PER_HOST - ok_a - ok_b
        );
        if p0rt::unix_now().div_euclid(WINDOW_SECONDS) != window {
            inconclusive.push(format!("{figures}, across a window rollover"));
            continue;
        }
        if fallbacks(&[&a, &b]) != before {
            inconclusive.push(format!("{figures}, with a fallback from Redis"));
            continue;
        }
        println!(
            "shared rate limit on {}: {figures}",
            if cluster { "Redis Cluster" } else { "Redis" }
        );
        assert_eq!(
            ok_a + ok_b,
            LIMIT,
            "two hosts on one Redis admitted {} requests of one client against a limit of \
             {LIMIT} ({figures}); host A log:\n{}\nhost B log:\n{}\n{}",
            ok_a + ok_b,
            a.log(),
            b.log(),
            redis.logs()
        );
        // Both hosts took part (neither had the whole budget to itself).
        assert!(ok_a > 0 && ok_b > 0, "{figures}");
        assert_eq!(
            (backend_a.hits() - hits.0, backend_b.hits() - hits.1),
            (ok_a, ok_b),
            "a 429 reached a backend ({figures})"
        );
        // The counter both hosts used is in Redis, under the plugin's namespace.
        let counter = format!("p0rt:plugin:ratelimit:ip:{ip}:{window}");
        let counted: i64 = redis
            .get(&counter)
            .await
            .unwrap_or_else(|| panic!("no counter {counter} in Redis ({figures})"))
            .parse()
            .expect("the counter is an integer");
        assert!(
            counted >= LIMIT as i64,
            "{counter} is {counted} ({figures})"
        );
        return;
    }
    panic!(
        "every attempt was inconclusive: {inconclusive:?}; host A log:\n{}\nhost B log:\n{}",
        a.log(),
        b.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_clients_rate_limit_holds_across_two_hosts_on_one_redis() {
    same_limit_across_two_hosts(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_clients_rate_limit_holds_across_two_hosts_on_redis_cluster() {
    same_limit_across_two_hosts(true).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Bans shared across hosts on one Redis
// ---------------------------------------------------------------------------------------------

/// `ssh … info` with `key` from `source` to `host`.
async fn info_from(host: &Host, sb: &Sandbox, key: &Key, source: &str) -> SshOutput {
    host.ssh(sb, key)
        .args(["-b", source])
        .command("info")
        .output()
        .await
}

/// `p0rt security <args…>` on the store of the Redis host whose data directory is
/// `data_dir`: (exit code, stdout, stderr).
async fn security(url: &str, data_dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    p0rt_security(
        data_dir,
        &[("STORAGE_TYPE", "redis"), ("REDIS_URL", url)],
        args,
    )
    .await
}

/// The address bans `p0rt security bans --json` lists for the store of `data_dir`.
async fn bans_json(url: &str, data_dir: &Path) -> Vec<serde_json::Value> {
    let (code, stdout, stderr) = security(url, data_dir, &["bans", "--json"]).await;
    assert_eq!(code, Some(0), "p0rt security bans --json: {stdout}{stderr}");
    let all: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("p0rt security bans --json is not JSON ({e}): {stdout}"));
    all["addresses"]
        .as_array()
        .unwrap_or_else(|| panic!("no addresses in p0rt security bans --json: {stdout}"))
        .clone()
}

/// Asserts that `host` refuses `key` from the banned `source`. A ban lookup that fails (over
/// its 300 ms budget on a busy machine) lets the connection in by design; such an attempt
/// (the host says so in its debug log) is repeated.
async fn assert_refused(host: &Host, sb: &Sandbox, key: &Key, source: &str, what: &str) {
    let lookups_failed = || {
        host.log()
            .matches(&format!("ban lookup for {source} failed"))
            .count()
    };
    for _ in 0..3 {
        let before = lookups_failed();
        let out = info_from(host, sb, key, source).await;
        if out.status.success() && lookups_failed() != before {
            continue;
        }
        assert!(
            !out.status.success() && !out.stdout.contains("name:"),
            "{what}: the banned address {source} got in: {}; log:\n{}",
            out.stdout,
            host.log()
        );
        return;
    }
    panic!(
        "{what}: every ban lookup for {source} failed; log:\n{}",
        host.log()
    );
}

async fn bans_shared_across_hosts(cluster: bool) {
    let redis = SharedRedis::start(cluster).await;
    let sb = Sandbox::new();
    let good = sb.key("good");
    let bad = sb.key("bad");
    let allowed = sb.join("authorized_keys");
    std::fs::write(&allowed, format!("{}\n", good.public)).unwrap();
    let url = redis.url();
    let config = |name: &str| {
        redis_host(&sb, name, &url)
            .arg("--authorized-keys")
            .arg(allowed.to_string_lossy())
            .env("BAN_TIERS", "3:600s")
            // The refusal of a banned address and a failed ban lookup are debug lines.
            .env("RUST_LOG", "info,p0rt::ssh=debug,p0rt::bans=debug")
    };
    let (a, b) = tokio::join!(
        Host::start_with(&sb, config("a")),
        Host::start_with(&sb, config("b"))
    );
    // The default exempts no address, loopback included.
    for host in [&a, &b] {
        assert!(
            host.log().contains("exempt: none"),
            "startup log does not print the ban exemptions; log:\n{}",
            host.log()
        );
    }
    let (victim, bystander) = ("127.0.7.5", "127.0.7.6");

    // Three connections with a key host A does not accept.
    for attempt in 1..=3 {
        let out = info_from(&a, &sb, &bad, victim).await;
        assert!(
            !out.status.success(),
            "attempt {attempt}: an unlisted key got into host A"
        );
    }
    // The ban is in the shared store: B's settings list it (failures are counted when the
    // refused connection ends, so this may take a moment).
    let b_dir: PathBuf = b.data_dir().to_path_buf();
    let ban = eventually(WAIT, "the ban to be listed on B's store", || async {
        bans_json(&url, &b_dir)
            .await
            .into_iter()
            .find(|ban| ban["ip"] == victim)
    })
    .await;
    assert_eq!(ban["failures"], 3, "{ban}");
    let length = ban["until"].as_i64().unwrap() - ban["since"].as_i64().unwrap();
    assert_eq!(length, 600, "{ban}");
    assert!(a.log().contains(&format!("banned {victim}")), "{}", a.log());

    // Host B, which never saw a failure from that address, refuses it, even with a good key.
    assert_refused(&b, &sb, &good, victim, "host B").await;
    assert!(
        b.log()
            .contains(&format!("refusing ssh connection from {victim}:")),
        "host B did not refuse {victim} for its ban; log:\n{}",
        b.log()
    );
    assert_refused(&a, &sb, &good, victim, "host A").await;
    // Another address with the right key is unaffected, on both hosts.
    for (host, what) in [(&b, "B"), (&a, "A")] {
        let out = info_from(host, &sb, &good, bystander).await;
        assert!(
            out.status.success() && out.stdout.contains("name:"),
            "host {what} refused {bystander}: {}",
            out.stderr
        );
    }
    let listed: Vec<serde_json::Value> = bans_json(&url, &b_dir).await;
    assert_eq!(listed.len(), 1, "{listed:?}");

    // One unban (with A's settings) lifts it for both hosts.
    let (code, stdout, stderr) = security(&url, a.data_dir(), &["unban", victim]).await;
    assert_eq!(code, Some(0), "p0rt security unban: {stdout}{stderr}");
    assert!(stdout.contains("ban lifted"), "{stdout}");
    for (host, what) in [(&b, "B"), (&a, "A")] {
        let out = info_from(host, &sb, &good, victim).await;
        assert!(
            out.status.success() && out.stdout.contains("name:"),
            "host {what} still refuses {victim} after the unban: {}; log:\n{}",
            out.stderr,
            host.log()
        );
    }
    assert!(bans_json(&url, &b_dir).await.is_empty());
    let (code, stdout, _) = security(&url, b.data_dir(), &["unban", victim]).await;
    assert_eq!(code, Some(1), "unbanning twice: {stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ban_earned_on_one_host_holds_on_another_on_one_redis() {
    bans_shared_across_hosts(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ban_earned_on_one_host_holds_on_another_on_redis_cluster() {
    bans_shared_across_hosts(true).await;
}

// ---------------------------------------------------------------------------------------------
// 3. A trapping rate-limit plugin: the built-in limiter applies
// ---------------------------------------------------------------------------------------------

/// The body of the built-in limiter's 429 (host/src/plugins/fallback.rs).
const FALLBACK_MESSAGE: &str = "too many requests";

/// The rate-limit plugin traps on every call. The host keeps serving (fail open) but under
/// its built-in limiter, [`p0rt::plugins::FALLBACK_REQUESTS_PER_IP_PER_MINUTE`] (600)
/// requests per client IP per minute (never unlimited): a burst of 660 from one address gets
/// exactly 600 through and 60 answered 429 with `Retry-After`. The built-in limiter is an
/// in-process counter, so there is no tolerance; a burst that straddles a minute is repeated.
#[tokio::test(flavor = "multi_thread")]
async fn a_trapping_rate_limit_plugin_leaves_a_limit_never_none() {
    let limit = p0rt::plugins::FALLBACK_REQUESTS_PER_IP_PER_MINUTE as usize;
    let (connections, requests) = (6, limit + 60);
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let wasm = install_hostile(&dir, "rate-limit", "trap");
    let mut host = crate::plugins::host_with_plugins(&sb, &dir).await;
    wait_active(&host, "rate-limit", &wasm).await;
    let key = sb.key("trapped");
    let backend = Backend::start("trapped").await;
    let (_ssh, name) = host.tunnel(&sb, &key, &backend).await;

    let mut inconclusive = Vec::new();
    for ip in ["127.0.6.1", "127.0.6.2"] {
        let minute = window_with_room(60, 30).await;
        let hits = backend.hits();
        let client = client_from(ip);
        let replies = burst(&client, &host, &name, connections, requests).await;
        assert_eq!(replies.len(), requests);
        let ok = admitted(&replies, 60, FALLBACK_MESSAGE, "trapping plugin");
        let figures = format!(
            "{ip}: {requests} requests on {connections} connections, built-in limit \
             {limit}/min: 2xx {ok}, 429 {}",
            requests - ok
        );
        if p0rt::unix_now().div_euclid(60) != minute {
            inconclusive.push(format!("{figures}, across a minute"));
            continue;
        }
        println!("trapping rate-limit plugin: {figures}");
        assert_eq!(ok, limit, "{figures}; log:\n{}", host.log());
        assert_eq!(backend.hits() - hits, ok, "a 429 reached the backend");
        let log = host.log();
        assert!(
            log.contains("rate limiting falls back to the built-in limiter: plugin hostile ("),
            "{log}"
        );
        assert!(host.is_running(), "{log}");
        // Another address still has its own budget.
        let other = Answer::of(get(&client_from("127.0.6.9"), &host, &name, "/whoami")).await;
        assert_eq!(other.status, 200, "{other:?}");
        return;
    }
    panic!("every attempt was inconclusive: {inconclusive:?}");
}
