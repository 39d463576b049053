//! SSH flow control per channel: one stalled consumer (a visitor that stops reading a
//! download, a backend that stops reading an upload) stops only its own channel. Every other
//! request on the same tunnel keeps being served, the host holds at most a window of the
//! stalled channel's data, and the stalled transfer completes intact once it reads again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::backend::{Backend, pattern_sha256};
use crate::support::{Host, Sandbox, eventually, require_tools};

/// Size of the stalled transfer: far more than every buffer between the two ends (kernel
/// socket buffers, the SSH window, OpenSSH's and hyper's buffers).
const STALLED: u64 = 50 * 1024 * 1024;
/// Requests sent to the same tunnel while one channel is stalled.
const PROBES: usize = 20;
/// A probe that takes longer than this is stuck behind the stalled channel (a normal one
/// takes a few milliseconds; this is a hang detector, not a speed target).
const PROBE_HANG: Duration = Duration::from_secs(3);
/// Host memory growth tolerated while channels are stalled: each may hold one SSH window
/// (2 MiB) plus buffers, far below the stalled bytes.
const MAX_STALL_GROWTH: u64 = 40 * 1024 * 1024;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("VmRSS in /proc status")
        * 1024
}

/// Waits until `progress` stops moving for a while (the stall has formed), and checks it
/// stopped short of `total` (the stall is real, not a finished transfer).
async fn wait_stalled(what: &str, total: u64, progress: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = progress();
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = progress();
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if last > 0 && still_since.elapsed() >= Duration::from_millis(700) {
            assert!(
                last < total,
                "{what}: the whole transfer went through, nothing stalled"
            );
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: transfer never stalled (at {last} of {total} bytes)"
        );
    }
}

/// Sends [`PROBES`] requests to `name` one after another; each must answer 200 from the
/// backend without hanging. Returns the slowest.
async fn probe(host: &Host, name: &str, backend: &Backend) -> Duration {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..PROBES {
        let started = Instant::now();
        let res = client
            .get(host.url("/whoami"))
            .header("host", host.host_header(name))
            .timeout(PROBE_HANG)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("probe {i} while a channel is stalled did not complete: {e}")
            });
        assert_eq!(res.status(), 200, "probe {i}");
        assert_eq!(res.text().await.unwrap(), backend.id, "probe {i}");
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

#[tokio::test(flavor = "multi_thread")]
async fn a_visitor_that_stops_reading_stalls_only_its_own_download() {
    require_tools();
    let sandbox = Sandbox::new();
    let host = Host::start(&sandbox).await;
    let backend = Backend::start("slow-reader").await;
    let (_tunnel, name) = host
        .tunnel(&sandbox, &sandbox.key("slow-reader"), &backend)
        .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let baseline = rss_bytes(host.pid());

    // Two visitors start big downloads and stop reading after the first chunk.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let res = client
            .get(host.url(&format!("/bytes/{STALLED}")))
            .header("host", host.host_header(&name))
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .expect("stalled download starts");
        assert_eq!(res.status(), 200);
        let mut body = res.bytes_stream();
        let first = body.next().await.expect("a first chunk").expect("chunk");
        let mut hasher = Sha256::new();
        hasher.update(&first);
        stalled.push((body, hasher, first.len() as u64));
    }
    let produced = wait_stalled("download", 2 * STALLED, || backend.produced()).await;

    let slowest = probe(&host, &name, &backend).await;
    let growth = rss_bytes(host.pid()).saturating_sub(baseline);
    eprintln!(
        "stalled downloads: backend produced {produced} of {} bytes; slowest of {PROBES} probes {slowest:?}; host RSS +{} KiB",
        2 * STALLED,
        growth / 1024
    );
    assert!(
        growth < MAX_STALL_GROWTH,
        "host memory grew by {growth} bytes while two channels were stalled"
    );

    // The stalled visitors read again: both downloads complete, byte for byte.
    for (mut body, mut hasher, mut received) in stalled {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.expect("stalled download resumes");
            hasher.update(&chunk);
            received += chunk.len() as u64;
        }
        assert_eq!(
            received, STALLED,
            "every byte of the stalled download arrived"
        );
        assert_eq!(hex::encode(hasher.finalize()), pattern_sha256(STALLED));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_stops_reading_an_upload_stalls_only_that_upload() {
    require_tools();
    let sandbox = Sandbox::new();
    let host = Host::start(&sandbox).await;
    let backend = Backend::start("slow-backend").await;
    let (_tunnel, name) = host
        .tunnel(&sandbox, &sandbox.key("slow-backend"), &backend)
        .await;
    let baseline = rss_bytes(host.pid());

    // An upload the backend does not read until the gate opens.
    let sent = Arc::new(AtomicU64::new(0));
    let chunk = Bytes::from(vec![0x5au8; 64 * 1024]);
    let chunks = STALLED / chunk.len() as u64;
    let body = {
        let sent = sent.clone();
        futures_util::stream::iter(0..chunks).map(move |_| {
            sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            Ok::<_, std::io::Error>(chunk.clone())
        })
    };
    let upload = {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let request = client
            .post(host.url("/gated-sha256"))
            .header("host", host.host_header(&name))
            .body(reqwest::Body::wrap_stream(body))
            .timeout(Duration::from_secs(120));
        tokio::spawn(async move { request.send().await })
    };
    eventually(
        Duration::from_secs(10),
        "upload reaches the backend",
        || async { (backend.gated() == 1).then_some(()) },
    )
    .await;
    let sent_when_stalled = wait_stalled("upload", STALLED, || sent.load(Ordering::SeqCst)).await;

    let slowest = probe(&host, &name, &backend).await;
    let growth = rss_bytes(host.pid()).saturating_sub(baseline);
    eprintln!(
        "stalled upload: client sent {sent_when_stalled} of {STALLED} bytes; slowest of {PROBES} probes {slowest:?}; host RSS +{} KiB",
        growth / 1024
    );
    assert!(
        growth < MAX_STALL_GROWTH,
        "host memory grew by {growth} bytes while an upload was stalled"
    );

    // The backend reads again: the upload completes, byte for byte.
    backend.open_gate();
    let res = upload.await.unwrap().expect("stalled upload completes");
    assert_eq!(res.status(), 200);
    let answer: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(
        answer["len"], STALLED,
        "every byte of the stalled upload arrived"
    );
    let mut expected = Sha256::new();
    for _ in 0..chunks {
        expected.update([0x5au8; 64 * 1024]);
    }
    assert_eq!(answer["sha256"], hex::encode(expected.finalize()));
}
