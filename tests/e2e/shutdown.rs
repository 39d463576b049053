//! SIGTERM: the host stops accepting, lets the request in flight finish, tells its SSH
//! clients it is going away, flushes the store and exits 0.

use std::time::Duration;

use crate::backend::Backend;
use crate::support::{Host, Sandbox, eventually, require_tools};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    require_tools();
    let sandbox = Sandbox::new();
    let mut host = Host::start(&sandbox).await;
    let backend = Backend::start("draining").await;
    let (mut tunnel, name) = host.tunnel(&sandbox, &sandbox.key("drain"), &backend).await;

    // A request in flight: the backend holds it until the gate opens.
    let request = {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let request = client
            .post(host.url("/gated-sha256"))
            .header("host", host.host_header(&name))
            .body("payload")
            .timeout(Duration::from_secs(30));
        tokio::spawn(async move { request.send().await })
    };
    eventually(
        Duration::from_secs(10),
        "request reaches the backend",
        || async { (backend.gated() == 1).then_some(()) },
    )
    .await;

    let pid = host.pid();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    // No new connections once it is stopping.
    let http = host.http_addr();
    eventually(
        Duration::from_secs(5),
        "the HTTP listener to close",
        || async {
            tokio::net::TcpStream::connect(http)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    // The request in flight still completes through its tunnel.
    backend.open_gate();
    let res = request.await.unwrap().expect("in-flight request completes");
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(body["len"], 7);

    // Then the SSH client is told why, and its session ends.
    tunnel.wait_exit().await;
    assert!(
        tunnel.stderr().contains("shutting down"),
        "ssh client was not told the host is going away: {}",
        tunnel.stderr()
    );

    let status = host.stop_waiting().await;
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        host.log()
    );
    let log = host.log();
    assert!(log.contains("stopped"), "{log}");
    let stored = std::fs::read_to_string(host.data_dir().join("domains.json")).unwrap();
    assert!(stored.contains(&name), "the store was flushed: {stored}");
}
