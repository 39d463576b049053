//! Resource behaviour: large bodies stream through without growing the host's memory, and a
//! client that stops answering is dropped by keepalive.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::backend::Backend;
use crate::support::{Host, Sandbox, require_tools};

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status");
    kb * 1024
}

/// Bytes streamed each way; far more than any buffer the host should hold.
const BIG: u64 = 200 * 1024 * 1024;
/// Growth of the host's RSS tolerated while streaming [`BIG`] bytes.
const MAX_GROWTH: u64 = 48 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn big_bodies_stream_without_growing_host_memory() {
    require_tools();
    let sandbox = Sandbox::new();
    let host = Host::start(&sandbox).await;
    let backend = Backend::start("big").await;
    let (_tunnel, name) = host.tunnel(&sandbox, &sandbox.key("big"), &backend).await;
    let pid = host.pid();
    let baseline = rss_bytes(pid);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    // Upload: a generated stream, never in memory on either side.
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let chunks = BIG / chunk.len() as u64;
    let body = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let sampler_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = sampler_stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let res = client
        .post(host.url("/sha256"))
        .header("host", host.host_header(&name))
        .body(reqwest::Body::wrap_stream(body))
        .timeout(Duration::from_secs(240))
        .send()
        .await
        .expect("upload");
    assert_eq!(res.status(), 200);
    let answer: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(answer["len"], BIG, "every byte arrived");

    // Download with a stalled reader: backpressure must reach the SSH client, not the host's heap.
    let res = client
        .get(host.url(&format!("/bytes/{BIG}")))
        .header("host", host.host_header(&name))
        .timeout(Duration::from_secs(240))
        .send()
        .await
        .expect("download");
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let mut received: u64 = 0;
    let mut stalled = false;
    while let Some(piece) = stream.next().await {
        received += piece.expect("download body").len() as u64;
        if !stalled && received > 8 * 1024 * 1024 {
            stalled = true;
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
    assert_eq!(received, BIG);
    sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "host RSS baseline {} MiB, peak {} MiB",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        growth < MAX_GROWTH,
        "host RSS grew by {} MiB while streaming {} MiB each way",
        growth >> 20,
        BIG >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_client_is_dropped_by_keepalive_within_30s() {
    require_tools();
    let sandbox = Sandbox::new();
    let host = Host::start(&sandbox).await;
    let backend = Backend::start("frozen").await;
    let key = sandbox.key("frozen");
    let (tunnel, name) = host.tunnel(&sandbox, &key, &backend).await;

    // Freeze the ssh client: its TCP connection stays open but nothing answers.
    let pids = std::process::Command::new("pgrep")
        .args(["-f", &key.path.to_string_lossy()])
        .output()
        .expect("pgrep (procps)");
    let pids = String::from_utf8_lossy(&pids.stdout).to_string();
    let pid = pids
        .lines()
        .next()
        .expect("the ssh client's pid")
        .trim()
        .to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let frozen_at = Instant::now();

    // The tunnel is first unresponsive, then gone: 503 (known name, no tunnel).
    loop {
        let res = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(host.url("/whoami"))
            .header("host", host.host_header(&name))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        if matches!(&res, Ok(r) if r.status() == 503) {
            break;
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(40),
            "tunnel of a frozen client still registered after {:?}; p0rt stderr:\n{}",
            frozen_at.elapsed(),
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let detected = frozen_at.elapsed();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    drop(tunnel);
    eprintln!("frozen client dropped after {detected:?}");
    assert!(detected <= Duration::from_secs(35), "took {detected:?}");
}
