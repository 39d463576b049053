//! Pooled upstream connections: one the backend closed while it sat idle is replaced without
//! failing the visitor, a request that reached the backend is never sent a second time, a
//! visitor that leaves in the middle of a download closes that download's connection, and a
//! burst's surplus is closed while the most recently used stay warm.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// The backend's keep-alive timeout: far shorter than the host's idle timeout (60 s), so
/// the pool still holds the connection the backend closed.
const BACKEND_KEEP_ALIVE: Duration = Duration::from_millis(300);
/// Time for the backend's close to cross the SSH connection to the host (a channel EOF
/// from the OpenSSH client), with room for a loaded machine.
const CLOSE_CROSSES_SSH: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_backend_closed_while_idle_is_replaced_unseen() {
    let sb = Sandbox::new();
    let key = sb.key("keepalive");
    let backend = Backend::start_with_keep_alive("ka-backend", BACKEND_KEEP_ALIVE).await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let client = http_client();

    for round in 0..3 {
        // The pool holds the connection of the last request; the backend closes it.
        eventually(
            WAIT,
            "the backend to close its idle connections",
            || async { (backend.open_connections() == 0).then_some(()) },
        )
        .await;
        tokio::time::sleep(CLOSE_CROSSES_SSH).await;
        let (hits, accepted) = (backend.hits(), backend.accepted());

        // Not idempotent: it must go out once, on a connection that is still open.
        let res = client
            .post(host.url("/echo"))
            .header("host", host.host_header(&name))
            .body("form=1")
            .send()
            .await
            .expect("POST through the edge");
        let status = res.status().as_u16();
        let body = res.text().await.unwrap_or_default();
        assert_eq!(status, 200, "round {round}: {body}\n{}", host.log());
        assert!(body.contains("\"body_len\":6"), "round {round}: {body}");
        assert_eq!(
            backend.hits(),
            hits + 1,
            "round {round}: the POST arrived twice"
        );
        assert_eq!(
            backend.accepted(),
            accepted + 1,
            "round {round}: the POST went out on a new connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_reached_the_backend_is_never_sent_again() {
    let sb = Sandbox::new();
    let key = sb.key("vanish");
    let backend = Backend::start("vanish-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let client = http_client();

    // Once on the pooled connection `tunnel` left, once on a new one.
    for round in 0..2 {
        let hits = backend.hits();
        let res = client
            .post(host.url("/vanish"))
            .header("host", host.host_header(&name))
            .body("charge=100")
            .send()
            .await
            .expect("POST through the edge");
        assert_eq!(res.status().as_u16(), 502, "round {round}");
        // A second copy would arrive right behind the first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(backend.hits(), hits + 1, "round {round}: sent again");
    }
    // The tunnel still serves.
    assert_eq!(
        host.whoami(&name).await,
        (200, "vanish-backend".to_string())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_visitor_leaving_mid_download_closes_its_upstream_connection() {
    const DOWNLOAD: u64 = 100 * 1024 * 1024;
    let sb = Sandbox::new();
    let key = sb.key("leaver");
    let backend = Backend::start("leaver-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;

    let mut visitor = TcpStream::connect(host.http_addr()).await.unwrap();
    let request = format!(
        "GET /bytes/{DOWNLOAD} HTTP/1.1\r\nHost: {}\r\n\r\n",
        host.host_header(&name)
    );
    visitor.write_all(request.as_bytes()).await.unwrap();
    let mut received = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while received < 1024 * 1024 {
        let n = tokio::time::timeout(WAIT, visitor.read(&mut buf))
            .await
            .expect("download stalled")
            .expect("read the download");
        assert!(n > 0, "the edge closed the download");
        received += n;
    }
    let open = backend.open_connections();
    assert!(open >= 1, "the download has a backend connection");
    drop(visitor);

    eventually(
        WAIT,
        "the download's backend connection to close",
        || async { (backend.open_connections() < open).then_some(()) },
    )
    .await;
    assert!(
        backend.produced() < DOWNLOAD,
        "the backend produced the whole download for nobody"
    );
    assert_eq!(
        host.whoami(&name).await,
        (200, "leaver-backend".to_string())
    );
}

/// After a burst, the host closes the surplus channels (each costs the OpenSSH client on every
/// turn of its event loop) once unused for a second, and keeps the 4 most recently used.
#[tokio::test(flavor = "multi_thread")]
async fn a_bursts_surplus_channels_close_and_the_recent_ones_stay_warm() {
    /// Requests held in flight at once.
    const BURST: usize = 8;
    /// Connections the host keeps for the whole idle timeout (`UPSTREAM_IDLE_KEEP`).
    const KEPT: usize = 4;
    require_tools();
    let sb = Sandbox::new();
    let key = sb.key("bursty");
    let backend = Backend::start("burst-backend").await;
    let host = Host::start(&sb).await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    let client = http_client();
    let get_once = || async {
        let res = client
            .get(host.url("/whoami"))
            .header("host", host.host_header(&name))
            .send()
            .await
            .expect("GET through the edge");
        assert_eq!(res.status().as_u16(), 200, "{}", host.log());
    };
    get_once().await;
    let first = backend.accepted();

    // Held at the backend's gate until all of them are in flight: one channel each.
    let mut held = Vec::new();
    for i in 0..BURST {
        let request = client
            .post(host.url("/gated-sha256"))
            .header("host", host.host_header(&name))
            .body(format!("burst {i}"));
        held.push(tokio::spawn(async move {
            request.send().await.map(|r| r.status().as_u16())
        }));
    }
    eventually(WAIT, "the whole burst to wait at the gate", || async {
        (backend.gated() == BURST).then_some(())
    })
    .await;
    backend.open_gate();
    for request in held {
        assert_eq!(request.await.unwrap().expect("a held request"), 200);
    }
    let after_burst = backend.accepted();
    assert!(
        after_burst >= first + BURST - 1,
        "the burst went out on {} new connections",
        after_burst - first
    );

    // Past the surplus's second unused, the next request closes it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    get_once().await;
    eventually(WAIT, "the surplus connections to close", || async {
        (backend.open_connections() <= KEPT).then_some(())
    })
    .await;
    // The kept ones serve requests one at a time: no new channel.
    for _ in 0..3 {
        get_once().await;
    }
    assert_eq!(
        backend.accepted(),
        after_burst,
        "a request after the burst opened a new channel"
    );
    assert!(backend.open_connections() >= 1, "no connection kept warm");
}
