//! `swarm`: opens many concurrent SSH reverse tunnels to a p0rt host and holds them open.
//!
//! Each session has its own in-memory ed25519 key (derived from its index and `--salt`, so
//! distinct sessions get distinct names and a rerun with the same salt gets the same ones),
//! asks `info` for its name over the same connection, then requests `tcpip_forward("localhost",
//! 80)`. Every `forwarded-tcpip` channel the host opens is answered with a minimal HTTP/1.1
//! response whose body is the session index, so requests through any tunnel can be checked.
//!
//! Output (stdout), one JSON object per line:
//! 1. once every session has connected or failed: counts, timings and the names
//!    (`names[i]` is session i's name, `null` if it failed);
//! 2. when told to stop (stdin closed, SIGTERM/SIGINT, or `--max-seconds`): how many sessions
//!    were still open and how many requests they served.
//!
//! With `--names-file FILE` the names are also written there, one per line in session order
//! (`-` for a session that failed). `--deadline SECS` bounds the whole connect phase: sessions
//! not up by then count as failed. `--max-seconds` bounds the whole run.
//!
//! Usage: swarm --addr 127.0.0.1:2222 [--count 1000] [--concurrency 100] [--timeout 60]
//!              [--deadline 600] [--salt 1] [--max-seconds 900] [--hold stdin|signal]
//!              [--names-file FILE] [--kex NAME]
//!
//! `--kex NAME` puts that key exchange first in the client's offer (the client picks; the
//! default is russh's order, `mlkem768x25519-sha256` first, as OpenSSH 10 clients), to
//! measure what a client choosing another one costs the host.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use russh::client::{self, ChannelOpenHandle, Msg, Session};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::{Channel, ChannelMsg};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// Largest request head a tunnel reads before giving up on it.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Time a forwarded channel has to deliver its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Distinct error messages kept in the report.
const MAX_ERROR_KINDS: usize = 20;

struct Options {
    addr: String,
    count: usize,
    concurrency: usize,
    timeout: Duration,
    deadline: Duration,
    salt: u64,
    names_file: Option<String>,
    max_seconds: u64,
    hold_stdin: bool,
    kex: Option<russh::kex::Name>,
}

fn usage(problem: &str) -> ! {
    eprintln!("swarm: {problem}");
    eprintln!(
        "usage: swarm --addr HOST:PORT [--count N] [--concurrency N] [--timeout SECS] \
         [--deadline SECS] [--salt N] [--max-seconds SECS] [--hold stdin|signal] [--names-file FILE] \
         [--kex NAME]"
    );
    std::process::exit(2);
}

fn parse_options() -> Options {
    let mut options = Options {
        addr: String::new(),
        count: 1000,
        concurrency: 100,
        timeout: Duration::from_secs(60),
        deadline: Duration::from_secs(600),
        salt: 1,
        names_file: None,
        max_seconds: 900,
        hold_stdin: true,
        kex: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        fn number<T: std::str::FromStr>(flag: &str, text: String) -> T {
            text.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: not a number: {text}")))
        }
        match flag.as_str() {
            "--addr" => options.addr = value(),
            "--count" => options.count = number(&flag, value()),
            "--concurrency" => options.concurrency = number::<usize>(&flag, value()).max(1),
            "--timeout" => options.timeout = Duration::from_secs(number(&flag, value())),
            "--deadline" => options.deadline = Duration::from_secs(number(&flag, value())),
            "--salt" => options.salt = number(&flag, value()),
            "--names-file" => options.names_file = Some(value()),
            "--max-seconds" => options.max_seconds = number(&flag, value()),
            "--kex" => {
                let name = value();
                options.kex = Some(
                    russh::kex::Name::try_from(name.as_str())
                        .unwrap_or_else(|()| usage(&format!("--kex: unknown key exchange {name}"))),
                );
            }
            "--hold" => {
                options.hold_stdin = match value().as_str() {
                    "stdin" => true,
                    "signal" => false,
                    other => usage(&format!("--hold: stdin or signal, not {other}")),
                }
            }
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if options.addr.is_empty() {
        usage("--addr is required");
    }
    options
}

/// Session `index`'s key: a fixed function of (index, salt).
fn session_key(index: usize, salt: u64) -> PrivateKey {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(index as u64).to_le_bytes());
    seed[8..16].copy_from_slice(&salt.to_le_bytes());
    seed[16..].copy_from_slice(b"p0rt-bench-swarm");
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

struct Tunnel {
    index: usize,
    served: Arc<AtomicU64>,
}

impl client::Handler for Tunnel {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // A benchmark against a host this script just started on loopback.
        Ok(true)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        let (index, served) = (self.index, self.served.clone());
        tokio::spawn(async move {
            if answer(channel, index).await {
                served.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(())
    }
}

/// Reads one request head and answers it with the session index; true if answered.
async fn answer(mut channel: Channel<Msg>, index: usize) -> bool {
    let mut head = Vec::new();
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, channel.wait()).await {
            Ok(Some(ChannelMsg::Data { data })) => {
                head.extend_from_slice(&data);
                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
                if head.len() > MAX_REQUEST_HEAD {
                    let _ = channel.close().await;
                    return false;
                }
            }
            Ok(Some(ChannelMsg::Eof | ChannelMsg::Close)) | Ok(None) | Err(_) => {
                let _ = channel.close().await;
                return false;
            }
            Ok(Some(_)) => {}
        }
    }
    let body = index.to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sent = channel.data_bytes(response.into_bytes()).await.is_ok();
    let _ = channel.eof().await;
    let _ = channel.close().await;
    sent
}

struct Connected {
    handle: client::Handle<Tunnel>,
    name: String,
    elapsed: Duration,
}

/// A TCP connection to `addr` for session `index`. The host caps unauthenticated connections
/// per client address (20), so against loopback each session connects from an address of its
/// own in 127.0.0.0/8, as sessions from many machines would.
async fn connect_tcp(addr: &str, index: usize) -> std::io::Result<TcpStream> {
    let target = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr}: no address")))?;
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let IpAddr::V4(ip) = target.ip()
        && ip.is_loopback()
    {
        let n = index as u32;
        let source = [
            127,
            1 + (n / 62_500 % 250) as u8,
            (n / 250 % 250) as u8,
            (n % 250 + 1) as u8,
        ];
        socket.bind(SocketAddr::from((source, 0)))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(target).await
}

/// Connects session `index` with its `key`, learns its name with `info`, and opens its tunnel.
async fn connect_one(
    config: Arc<client::Config>,
    addr: String,
    index: usize,
    key: Arc<PrivateKey>,
    served: Arc<AtomicU64>,
) -> Result<Connected, String> {
    let started = Instant::now();
    let stream = connect_tcp(&addr, index)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut handle = client::connect_stream(config, stream, Tunnel { index, served })
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let auth = handle
        .authenticate_publickey("bench", PrivateKeyWithHashAlg::new(key, None))
        .await
        .map_err(|e| format!("auth: {e}"))?;
    if !auth.success() {
        return Err("auth: key refused".into());
    }
    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("session channel: {e}"))?;
    channel
        .exec(true, "info")
        .await
        .map_err(|e| format!("exec info: {e}"))?;
    let mut output = Vec::new();
    while let Some(message) = channel.wait().await {
        match message {
            ChannelMsg::Data { data } => output.extend_from_slice(&data),
            ChannelMsg::Eof | ChannelMsg::Close => break,
            _ => {}
        }
    }
    let text = String::from_utf8_lossy(&output);
    let name = text
        .lines()
        .find_map(|line| line.strip_prefix("name:"))
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("info: no name in {:?}", text.trim()))?;
    drop(channel);
    handle
        .tcpip_forward("localhost", 80)
        .await
        .map_err(|e| format!("tcpip_forward: {e}"))?;
    Ok(Connected {
        handle,
        name,
        elapsed: started.elapsed(),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Resolves when the holder says stop: stdin closed (if held), SIGTERM/SIGINT, or the deadline.
async fn stop_signal(hold_stdin: bool, max_seconds: u64) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let stdin_closed = async {
        if !hold_stdin {
            return std::future::pending().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = stdin_closed => "stdin closed",
        _ = tokio::time::sleep(Duration::from_secs(max_seconds)) => "max-seconds reached",
    }
}

#[tokio::main]
async fn main() {
    let options = parse_options();
    let default_kex = russh::Preferred::default().kex;
    let kex = match options.kex {
        Some(first) => std::borrow::Cow::Owned(
            std::iter::once(first)
                .chain(default_kex.iter().copied().filter(|k| *k != first))
                .collect(),
        ),
        None => default_kex,
    };
    let config = Arc::new(client::Config {
        // The same cipher the OpenSSH clients of the benchmark are told to use.
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(&[russh::cipher::CHACHA20_POLY1305]),
            kex,
            ..Default::default()
        },
        nodelay: true,
        inactivity_timeout: None,
        ..Default::default()
    });
    let served = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(Semaphore::new(options.concurrency));
    // Every session's key exists before the clock starts, as a real client's key file does
    // (deriving an ed25519 public key is a scalar multiplication, ~14 µs of the two cores per
    // session that no OpenSSH client spends while connecting).
    let keys: Vec<Arc<PrivateKey>> = (0..options.count)
        .map(|index| Arc::new(session_key(index, options.salt)))
        .collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, key) in keys.into_iter().enumerate() {
        let (config, addr, served, slots) = (
            config.clone(),
            options.addr.clone(),
            served.clone(),
            slots.clone(),
        );
        let timeout = options.timeout;
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.expect("semaphore open");
            let result =
                tokio::time::timeout(timeout, connect_one(config, addr, index, key, served))
                    .await
                    .unwrap_or_else(|_| Err(format!("timed out after {} s", timeout.as_secs())));
            (index, result)
        });
    }

    let mut sessions: Vec<Option<Connected>> = (0..options.count).map(|_| None).collect();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0usize;
    let mut last_progress = Instant::now();
    let mut done = 0usize;
    let deadline = tokio::time::Instant::now() + options.deadline;
    let mut deadline_hit = false;
    loop {
        let joined = tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => joined,
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                deadline_hit = true;
                let left = tasks.len();
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                failed += left;
                *errors.entry(format!("not connected within --deadline {} s", options.deadline.as_secs())).or_default() += left;
                break;
            }
        };
        done += 1;
        match joined {
            Ok((index, Ok(connected))) => sessions[index] = Some(connected),
            Ok((_, Err(e))) => {
                failed += 1;
                if errors.len() < MAX_ERROR_KINDS || errors.contains_key(&e) {
                    *errors.entry(e).or_default() += 1;
                }
            }
            Err(e) => {
                failed += 1;
                *errors.entry(format!("task: {e}")).or_default() += 1;
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "swarm: {done}/{} done, {failed} failed, {:.1} s",
                options.count,
                started.elapsed().as_secs_f64()
            );
            last_progress = Instant::now();
        }
    }
    let connect_all = started.elapsed();

    let mut times: Vec<f64> = sessions
        .iter()
        .flatten()
        .map(|c| c.elapsed.as_secs_f64() * 1000.0)
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let names: Vec<Option<&str>> = sessions
        .iter()
        .map(|s| s.as_ref().map(|c| c.name.as_str()))
        .collect();
    let connected = times.len();
    let report = json!({
        "event": "connected",
        "requested": options.count,
        "connected": connected,
        "failed": failed,
        "concurrency": options.concurrency,
        "deadline_hit": deadline_hit,
        "connect_all_s": round3(connect_all.as_secs_f64()),
        "sessions_per_s": round3(connected as f64 / connect_all.as_secs_f64().max(1e-9)),
        "session_ms": {
            "p50": round3(percentile(&times, 50.0)),
            "p90": round3(percentile(&times, 90.0)),
            "p99": round3(percentile(&times, 99.0)),
            "max": round3(times.last().copied().unwrap_or(0.0)),
        },
        "errors": errors,
        "names": names,
    });
    if let Some(path) = &options.names_file {
        let text: String = names
            .iter()
            .map(|n| format!("{}\n", n.unwrap_or("-")))
            .collect();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("swarm: cannot write {path}: {e}");
        }
    }
    println!("{report}");

    let reason = stop_signal(options.hold_stdin, options.max_seconds).await;
    let still_open = sessions
        .iter()
        .flatten()
        .filter(|c| !c.handle.is_closed())
        .count();
    println!(
        "{}",
        json!({
            "event": "stopped",
            "reason": reason,
            "connected": connected,
            "still_open": still_open,
            "served": served.load(Ordering::Relaxed),
        })
    );
    // Close politely, but never wait long: the host may be gone already.
    let mut closing = tokio::task::JoinSet::new();
    for connected in sessions.into_iter().flatten() {
        closing.spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                connected
                    .handle
                    .disconnect(russh::Disconnect::ByApplication, "bench done", "en"),
            )
            .await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while closing.join_next().await.is_some() {}
    })
    .await;
    std::process::exit(0);
}
