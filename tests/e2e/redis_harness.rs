//! Tests of the Redis harness itself (`redis_support`): each shape starts, answers, and
//! behaves as the tests that use it rely on (auth, restart on the same port, sentinel
//! failover, cluster slot distribution).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::redis_support::*;

/// The failover bound the harness promises (down after 1 s, then election and promotion).
const FAILOVER_BOUND: Duration = Duration::from_secs(15);

fn assert_loopback_url(url: &str, port: u16) {
    assert_eq!(url, format!("redis://127.0.0.1:{port}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_ping_set_get() {
    let started = Instant::now();
    let mut server = RedisServer::start().await;
    eprintln!("standalone server up in {:?}", started.elapsed());
    assert_loopback_url(&server.url(), server.port());
    assert!(server.is_running());
    assert!(
        std::path::Path::new("/proc")
            .join(server.pid().to_string())
            .exists()
    );
    assert!(
        server.dir().join("redis.conf").exists(),
        "own config file in its own dir"
    );

    let mut con = server.client().await;
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let _: () = con.set("greeting", "hello redis").await.unwrap();
    let value: Option<String> = con.get("greeting").await.unwrap();
    assert_eq!(value.as_deref(), Some("hello redis"));
    let missing: Option<String> = con.get("nope").await.unwrap();
    assert_eq!(missing, None);

    // The config the harness promised: no persistence, not daemonized, loopback only.
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(save, ["save", ""]);
    let aof: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(aof, ["appendonly", "no"]);
    let bind: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("bind")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(bind, ["bind", "127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn password_server_rejects_no_auth_and_accepts_the_password() {
    let server = RedisServer::start_with_password("s3cret-pw").await;
    assert_loopback_url(&server.url(), server.port());
    assert_eq!(
        server.url_with_password(),
        format!("redis://:s3cret-pw@127.0.0.1:{}", server.port())
    );

    // No password: connecting works, every command is refused with NOAUTH.
    let mut anon = connect(server.addr(), None, REDIS_CLIENT_TIMEOUT)
        .await
        .expect("connect without auth");
    let err = redis::cmd("PING")
        .query_async::<String>(&mut anon)
        .await
        .expect_err("PING without auth must fail");
    assert_eq!(err.code(), Some("NOAUTH"), "{err}");
    let err = anon
        .set::<_, _, ()>("k", "v")
        .await
        .expect_err("SET without auth must fail");
    assert_eq!(err.code(), Some("NOAUTH"), "{err}");

    // A wrong password fails the handshake.
    let wrong = connect(server.addr(), Some("wrong"), REDIS_CLIENT_TIMEOUT).await;
    let err = wrong.expect_err("a wrong password must be refused");
    assert_eq!(err.kind(), redis::ErrorKind::AuthenticationFailed, "{err}");

    // The harness client authenticates.
    let mut con = server.client().await;
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let _: () = con.set("k", "v").await.unwrap();
    let v: String = con.get("k").await.unwrap();
    assert_eq!(v, "v");

    // And so does a client built from the URL with credentials.
    let client = redis::Client::open(server.url_with_password()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let v: String = con.get("k").await.unwrap();
    assert_eq!(v, "v");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_then_restart_answers_on_the_same_port() {
    let mut server = RedisServer::start().await;
    let port = server.port();
    let first_pid = server.pid();
    let mut con = server.client().await;
    let _: () = con.set("before", "kill").await.unwrap();

    server.kill9();
    assert!(!server.is_running());
    // Gone for real: the process is reaped and the port refuses connections.
    assert!(
        !std::path::Path::new("/proc")
            .join(first_pid.to_string())
            .exists(),
        "pid {first_pid} still exists"
    );
    assert!(
        tokio::net::TcpStream::connect(server.addr()).await.is_err(),
        "port {port} still accepts connections after SIGKILL"
    );
    let err = redis::cmd("PING")
        .query_async::<String>(&mut con)
        .await
        .expect_err("old connection must be dead");
    assert!(
        err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error(),
        "{err}"
    );

    let started = Instant::now();
    server.restart().await;
    eprintln!("restart on port {port} took {:?}", started.elapsed());
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), first_pid);
    let mut con = server.client().await;
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    // Nothing is persisted: the restarted server starts empty.
    let before: Option<String> = con.get("before").await.unwrap();
    assert_eq!(before, None);
    let _: () = con.set("after", "restart").await.unwrap();
    let after: String = con.get("after").await.unwrap();
    assert_eq!(after, "restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinel_group_fails_over_to_the_replica() {
    let started = Instant::now();
    let mut group = SentinelGroup::start("p0rt-test").await;
    eprintln!("sentinel group up in {:?}", started.elapsed());

    let sentinels = group.sentinel_addrs();
    assert_eq!(sentinels.len(), 3);
    let hosts: Vec<String> = sentinels.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        group.url(),
        format!("redis-sentinel://{}/p0rt-test", hosts.join(","))
    );

    let nodes = group.node_addrs();
    let master = group.master_addr().await;
    assert_eq!(master, nodes[0], "the sentinels report the initial master");
    assert_eq!(role_of(nodes[0], None).await.unwrap(), "master");
    assert_eq!(role_of(nodes[1], None).await.unwrap(), "slave");
    for sentinel in &sentinels {
        assert_eq!(role_of(*sentinel, None).await.unwrap(), "sentinel");
    }

    // A write that has reached the replica before the master dies.
    let mut con = group.client_to_master().await;
    let _: () = con.set("survives", "failover").await.unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(acked, 1, "the replica acknowledged the write");

    let killed = group.kill_master().await;
    assert_eq!(killed, nodes[0]);
    let killed_at = Instant::now();
    let new_master = group.wait_failover(FAILOVER_BOUND).await;
    let took = killed_at.elapsed();
    eprintln!("sentinel failover took {took:?} (new master {new_master})");
    assert_eq!(new_master, nodes[1], "the replica was promoted");
    assert_eq!(group.master_addr().await, new_master);

    let mut con = group.client_to_master().await;
    let kept: Option<String> = con.get("survives").await.unwrap();
    assert_eq!(kept.as_deref(), Some("failover"));
    let _: () = con.set("written", "after failover").await.unwrap();
    let written: String = con.get("written").await.unwrap();
    assert_eq!(written, "after failover");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_is_ok_and_spreads_keys_over_the_nodes() {
    let started = Instant::now();
    let cluster = RedisCluster::start().await;
    eprintln!(
        "cluster up (3 nodes started, created, state ok) in {:?}",
        started.elapsed()
    );

    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 3);
    let hosts: Vec<String> = nodes.iter().map(|a| a.to_string()).collect();
    assert_eq!(cluster.url(), format!("redis://{}", hosts.join(",")));

    for node in &nodes {
        let mut con = cluster.node_client(*node).await;
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut con)
            .await
            .unwrap();
        for expected in [
            "cluster_state:ok",
            "cluster_slots_assigned:16384",
            "cluster_known_nodes:3",
            "cluster_size:3",
        ] {
            assert!(
                info.lines().any(|l| l.trim() == expected),
                "{node}: no {expected:?} in\n{info}"
            );
        }
    }

    // Keys spread over all three masters; each is readable through the harness and lives on
    // exactly one node (the others redirect with MOVED).
    let mut owners = HashSet::new();
    for i in 0..30 {
        let key = format!("key-{i}");
        cluster.set(&key, &format!("value-{i}")).await;
        let owner = cluster.node_for_key(&key).await;
        owners.insert(owner);
        assert_eq!(
            cluster.get(&key).await.as_deref(),
            Some(format!("value-{i}").as_str())
        );
        for node in &nodes {
            let mut con = cluster.node_client(*node).await;
            let direct = redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<String>>(&mut con)
                .await;
            if *node == owner {
                assert_eq!(
                    direct.unwrap().as_deref(),
                    Some(format!("value-{i}").as_str())
                );
            } else {
                let err = direct.expect_err("a non-owner must redirect");
                assert_eq!(err.code(), Some("MOVED"), "{err}");
                assert_eq!(
                    err.redirect_node().map(|(to, _)| to.to_string()),
                    Some(owner.to_string())
                );
            }
        }
    }
    assert_eq!(
        owners.len(),
        3,
        "30 keys should land on all three nodes, got {owners:?}"
    );

    // Hashes too (what a plugin's store would write).
    let _: () = cluster
        .query(
            "hash-key",
            redis::cmd("HSET")
                .arg("hash-key")
                .arg("a")
                .arg("1")
                .arg("b")
                .arg("2"),
        )
        .await;
    let expected: HashMap<String, String> = [
        ("a".to_string(), "1".to_string()),
        ("b".to_string(), "2".to_string()),
    ]
    .into();
    assert_eq!(cluster.hgetall("hash-key").await, expected);
    assert!(cluster.hgetall("no-such-hash").await.is_empty());
}
