//! The host reads SSH packets however TCP cuts them: a tunnel whose client→host bytes arrive
//! one byte per write, or held back and delivered in large bursts of many packets at once,
//! serves downloads and uploads byte for byte; a bogus packet length closes only that
//! connection. (The host reads ahead several packets per syscall; see vendor/README.md.)

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::backend::{Backend, pattern, pattern_sha256};
use crate::support::{Host, Sandbox, Ssh, require_tools};

/// How the proxy cuts the client→host direction.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// One byte per write (TCP_NODELAY): every packet split across many reads.
    ByteByByte,
    /// Everything the client sends is held until it pauses or 256 KiB are waiting, then
    /// written at once: many packets in one read.
    Bursts,
}

/// A TCP proxy in front of the host's SSH port for one connection, cutting the client's
/// bytes as `cut` says; the host→client direction is copied as it comes. Returns its port.
async fn proxy(to: u16, cut: Cut) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let host = TcpStream::connect(("127.0.0.1", to)).await.unwrap();
        host.set_nodelay(true).unwrap();
        client.set_nodelay(true).unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut host_read, mut host_write) = host.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut host_read, &mut client_write).await;
            let _ = client_write.shutdown().await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut held = Vec::new();
        loop {
            let read = match cut {
                Cut::ByteByByte => client_read.read(&mut buf).await,
                // A pause of the client (no bytes for 30 ms) releases what is held.
                Cut::Bursts => {
                    match tokio::time::timeout(
                        Duration::from_millis(30),
                        client_read.read(&mut buf),
                    )
                    .await
                    {
                        Ok(read) => read,
                        Err(_) => {
                            if !held.is_empty() && host_write.write_all(&held).await.is_err() {
                                return;
                            }
                            held.clear();
                            continue;
                        }
                    }
                }
            };
            let n = match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let ok = match cut {
                Cut::ByteByByte => {
                    let mut ok = true;
                    for byte in &buf[..n] {
                        if host_write
                            .write_all(std::slice::from_ref(byte))
                            .await
                            .is_err()
                        {
                            ok = false;
                            break;
                        }
                    }
                    ok
                }
                Cut::Bursts => {
                    held.extend_from_slice(&buf[..n]);
                    if held.len() >= 256 * 1024 {
                        let ok = host_write.write_all(&held).await.is_ok();
                        held.clear();
                        ok
                    } else {
                        true
                    }
                }
            };
            if !ok {
                return;
            }
        }
        let _ = host_write.write_all(&held).await;
        let _ = host_write.shutdown().await;
    });
    port
}

/// Downloads and uploads of several sizes at once through `name`, each checked byte for byte.
async fn transfers(host: &Host, name: &str, upload_sizes: &[usize]) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let downloads = [0u64, 1, 1000, 40_000, 1_000_000].map(|n| {
        let client = client.clone();
        async move {
            let res = client
                .get(host.url(&format!("/bytes/{n}")))
                .header("host", host.host_header(name))
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET /bytes/{n}: {e}"));
            assert_eq!(res.status(), 200, "GET /bytes/{n}");
            let body = res.bytes().await.expect("download body");
            assert_eq!(body.len() as u64, n, "download of {n} bytes");
            assert_eq!(hex::encode(Sha256::digest(&body)), pattern_sha256(n));
        }
    });
    let uploads = upload_sizes.iter().map(|&n| {
        let client = client.clone();
        async move {
            let body = pattern(0, n);
            let expected = hex::encode(Sha256::digest(&body));
            let res = client
                .post(host.url("/sha256"))
                .header("host", host.host_header(name))
                .timeout(Duration::from_secs(120))
                .body(body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST of {n} bytes: {e}"));
            assert_eq!(res.status(), 200, "POST of {n} bytes");
            let answer: Value = serde_json::from_slice(&res.bytes().await.expect("sha256 answer"))
                .expect("sha256 answer is JSON");
            assert_eq!(answer["len"].as_u64(), Some(n as u64), "POST of {n} bytes");
            assert_eq!(answer["sha256"].as_str(), Some(expected.as_str()));
        }
    });
    tokio::join!(join_all(downloads), join_all(uploads));
}

async fn tunnel_through(cut: Cut, upload_sizes: &[usize]) {
    require_tools();
    let sandbox = Sandbox::new();
    let host = Host::start(&sandbox).await;
    let backend = Backend::start(&format!("{cut:?}")).await;
    let key = sandbox.key("segments");
    let name = host.info(&sandbox, &key).await.name;
    let port = proxy(host.ssh_port, cut).await;
    let _tunnel = Ssh::new(port, &key, &sandbox)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    host.wait_served(&name, &backend).await;
    transfers(&host, &name, upload_sizes).await;
    // Twice: the second round runs on a connection that has already read ahead.
    transfers(&host, &name, upload_sizes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn packets_split_into_single_bytes_are_read_whole() {
    tunnel_through(Cut::ByteByByte, &[0, 1, 5000, 40_000]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_packets_in_one_read_are_all_served() {
    tunnel_through(Cut::Bursts, &[0, 1, 5000, 40_000, 700_000]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bogus_packet_length_closes_only_that_connection() {
    require_tools();
    let sandbox = Sandbox::new();
    let host = Host::start(&sandbox).await;
    let backend = Backend::start("bogus-length").await;
    let (_tunnel, name) = host
        .tunnel(&sandbox, &sandbox.key("bogus-length"), &backend)
        .await;

    for length in [u32::MAX, 0x0100_0000, 0] {
        let mut raw = TcpStream::connect(("127.0.0.1", host.ssh_port))
            .await
            .unwrap();
        // The identification string and the first packet in one segment, then padding bytes.
        let mut hello = b"SSH-2.0-bogus\r\n".to_vec();
        hello.extend_from_slice(&length.to_be_bytes());
        hello.extend_from_slice(&[0u8; 64]);
        raw.write_all(&hello).await.unwrap();
        // The host closes the connection: reading ends (EOF or reset) instead of hanging.
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(30), raw.read_to_end(&mut sink))
            .await
            .is_ok();
        assert!(
            closed,
            "the host kept a connection with packet length {length:#x} open"
        );
    }
    let (status, body) = host.whoami(&name).await;
    assert_eq!((status, body.as_str()), (200, "bogus-length"));
}
