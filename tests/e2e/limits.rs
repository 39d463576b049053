//! The SSH and HTTP edge limits are settings: values set in the environment are printed at
//! startup and enforced by the real binary; impossible values stop it with exit 2.

use std::time::{Duration, Instant};

use reqwest::header::HOST;
use tokio::io::AsyncReadExt;

use crate::policy::{Answer, get};
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn limit_settings_are_printed_and_enforced() {
    require_tools();
    let sb = Sandbox::new();
    let config = HostConfig::flags(&sb.data_dir())
        .env("SSH_AUTH_TIMEOUT_SECONDS", "3")
        .env("SSH_MAX_FORWARDS_PER_CONNECTION", "2")
        .env("SSH_MAX_STARTUPS", "40:10:60")
        .env("HTTP_MAX_IN_FLIGHT_PER_TUNNEL", "2")
        .env("HTTP_BODY_IDLE_TIMEOUT_SECONDS", "7");
    let host = Host::start_with(&sb, config).await;
    // The log only grows: once both lines are in, the second read holds both.
    host.wait_for_log("http limits:").await;
    let log = host.wait_for_log("ssh limits:").await;
    let ssh_line = log
        .lines()
        .find(|l| l.contains("ssh limits:"))
        .unwrap_or_else(|| panic!("no ssh limits line: {log}"));
    for part in [
        "auth deadline 3s",
        "unauthenticated connections 60",
        "random drop from 40 at 10%",
        "2 forwards",
    ] {
        assert!(ssh_line.contains(part), "{part:?} not in {ssh_line}");
    }
    let http_line = log
        .lines()
        .find(|l| l.contains("http limits:"))
        .unwrap_or_else(|| panic!("no http limits line: {log}"));
    for part in ["requests in flight per tunnel 2", "request body idle 7s"] {
        assert!(http_line.contains(part), "{part:?} not in {http_line}");
    }

    // The forward cap: of three `-R`, two are served and the third refused with the reason.
    let backend = Backend::start("limits").await;
    let key = sb.key("limits");
    let target = format!("127.0.0.1:{}", backend.port);
    let mut client = host
        .ssh(&sb, &key)
        .opt("ExitOnForwardFailure=no")
        .args([
            "-R",
            &format!("one:80:{target}"),
            "-R",
            &format!("two:80:{target}"),
            "-R",
            &format!("three:80:{target}"),
        ])
        .spawn();
    client
        .wait_line("the third forward refused", |l| {
            l.contains("refused -R three") && l.contains("at most 2 forwards per connection")
        })
        .await;

    // The auth deadline: a connection that sends nothing is closed after about 3 s, not 20.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", host.ssh_port))
        .await
        .unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), silent.read_to_end(&mut sink)).await;
    let waited = started.elapsed();
    assert!(
        closed.is_ok(),
        "a silent connection still open after {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "closed after {waited:?}, want about the 3 s deadline"
    );

    // The in-flight cap: two requests held by the backend, the third gets 503 at once.
    let other = sb.key("inflight");
    let (_tunnel, name) = host.tunnel(&sb, &other, &backend).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let request = client
            .post(host.url("/gated-sha256"))
            .header(HOST, host.host_header(&name))
            .body("payload");
        held.push(tokio::spawn(async move {
            request.send().await.map(|r| r.status().as_u16())
        }));
    }
    eventually(Duration::from_secs(20), "both held at the gate", || async {
        (backend.gated() >= 2).then_some(())
    })
    .await;
    let over = Answer::of(get(&client, &host, &name, "/whoami")).await;
    assert_eq!(over.status, 503, "{over:?}");
    assert_eq!(over.header("retry-after"), Some("1"), "{over:?}");
    // The refusal is in the host's log with its reason (and in the owner's session).
    let line = format!("{name}: tunnel busy 503 for 127.0.0.1: the tunnel is busy");
    eventually(
        Duration::from_secs(10),
        "the denial in the host log",
        || async { host.log().contains(&line).then_some(()) },
    )
    .await;
    backend.open_gate();
    for request in held {
        assert_eq!(request.await.unwrap().expect("a held request"), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn impossible_limit_settings_exit_2_naming_the_setting() {
    let sb = Sandbox::new();
    for (var, value, named) in [
        ("SSH_MAX_STARTUPS", "300:30:200", "ssh.limits.max_startups"),
        (
            "SSH_MAX_TUNNEL_CHANNELS",
            "0",
            "ssh.limits.max_tunnel_channels",
        ),
        (
            "HTTP_MAX_CONNECTIONS_PER_ADDRESS",
            "0",
            "http.limits.max_connections_per_address",
        ),
        (
            "HTTP_RESPONSE_TIMEOUT_SECONDS",
            "many",
            "HTTP_RESPONSE_TIMEOUT_SECONDS",
        ),
    ] {
        let config = HostConfig::flags(&sb.data_dir()).env(var, value);
        let (code, stderr) = run_host_to_exit(&sb, &config, Duration::from_secs(60)).await;
        assert_eq!(code, Some(2), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(named),
            "{var}={value} does not name {named}: {stderr}"
        );
        assert!(!stderr.contains("listening on"), "{stderr}");
    }
}
