//! Abuse of the SSH edge: floods of connections that never authenticate, channels and forwards
//! beyond the per-connection caps, tunnel channels a client leaves open or unanswered, and a
//! key's connection quota attacked by someone who only knows the public key.
//!
//! The limits are the host's defaults (`host/src/ssh/mod.rs`, `host/src/ssh/admission.rs`).
//! Flood connections come from addresses spread over 127.0.0.0/8, so the per-address cap does
//! not hide the host-wide one; one test floods from a single address on purpose.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, ChannelOpenHandle, Msg, Session};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use russh::{AgentAuthError, Channel};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use p0rt::ssh::admission::{
    IDLE_REPLACE_AFTER, MAX_CONNECTIONS_PER_KEY, MAX_UNAUTHENTICATED,
    MAX_UNAUTHENTICATED_PER_SOURCE,
};
use p0rt::ssh::{
    AUTH_TIMEOUT, LOGGED_REFUSALS_PER_CONNECTION, MAX_FORWARDS_PER_CONNECTION,
    MAX_PENDING_CHANNEL_OPENS, MAX_SESSION_CHANNELS, MAX_TUNNEL_CHANNELS,
};
use p0rt::tunnels::MAX_TUNNELS_PER_KEY;

use crate::support::*;

/// What the issue asks of a real `ssh -R` during a flood: connected and serving within this.
const REAL_CLIENT_BOUND: Duration = Duration::from_secs(5);
/// Growth of the host's resident memory tolerated while a test abuses it.
const MAX_RSS_GROWTH: u64 = 50 * 1024 * 1024;

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

fn assert_rss_flat(host: &Host, before: u64, what: &str) {
    let after = rss_bytes(host.pid());
    let growth = after.saturating_sub(before);
    eprintln!(
        "{what}: host RSS {} MiB -> {} MiB",
        before >> 20,
        after >> 20
    );
    assert!(
        growth < MAX_RSS_GROWTH,
        "{what}: host RSS grew by {} MiB",
        growth >> 20
    );
}

/// A TCP connection to the host's SSH port from `from` (any 127.0.0.0/8 address).
async fn connect_from(from: Ipv4Addr, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap_or_else(|e| panic!("connect from {from}: {e}"))
}

/// Connections that never authenticate, each watched until the host closes it.
struct Flood {
    started: Instant,
    /// When each connection was closed by the host, after `started`; `None`: still open
    /// when the watch gave up.
    tasks: JoinSet<Option<Duration>>,
    closed: Arc<AtomicUsize>,
    total: usize,
}

impl Flood {
    fn new() -> Flood {
        Flood {
            started: Instant::now(),
            tasks: JoinSet::new(),
            closed: Arc::new(AtomicUsize::new(0)),
            total: 0,
        }
    }

    /// Opens a connection from `from` that sends nothing, or only an SSH version line.
    async fn add(&mut self, from: Ipv4Addr, port: u16, banner: bool) {
        let mut stream = connect_from(from, port).await;
        let (started, closed) = (self.started, self.closed.clone());
        self.total += 1;
        self.tasks.spawn(async move {
            if banner {
                let _ = stream.write_all(b"SSH-2.0-flood_1.0\r\n").await;
            }
            let give_up = AUTH_TIMEOUT + Duration::from_secs(15);
            let (_, was_closed) = read_until_closed(&mut stream, give_up).await;
            was_closed.then(|| {
                closed.fetch_add(1, Ordering::Relaxed);
                started.elapsed()
            })
        });
    }

    fn open(&self) -> usize {
        self.total - self.closed.load(Ordering::Relaxed)
    }

    /// Waits until the number of closed connections stops changing (for 500 ms).
    async fn settle(&self) {
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.closed.load(Ordering::Relaxed);
            if now == last {
                return;
            }
            last = now;
        }
    }

    async fn close_times(mut self) -> Vec<Option<Duration>> {
        let mut times = Vec::new();
        while let Some(done) = self.tasks.join_next().await {
            times.push(done.expect("flood task"));
        }
        times
    }
}

/// `ssh -N -R 80:…` from `bind` (or the default 127.0.0.1), timed until the key's name
/// answers from `backend`. Returns the client and the time it took.
async fn timed_tunnel(
    host: &Host,
    sb: &Sandbox,
    key: &Key,
    name: &str,
    backend: &Backend,
    bind: Option<&str>,
) -> (SshClient, Duration) {
    let started = Instant::now();
    let mut ssh = host.ssh(sb, key);
    if let Some(bind) = bind {
        ssh = ssh.opt(&format!("BindAddress={bind}"));
    }
    let mut client = ssh
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    loop {
        let (status, body) = host.whoami(name).await;
        if status == 200 && body == backend.id {
            break;
        }
        if let Some(exit) = client.try_exit() {
            panic!(
                "ssh -R exited ({exit}) during the flood after {:?}; stderr {:?}; p0rt log:\n{}",
                started.elapsed(),
                client.stderr(),
                host.log()
            );
        }
        assert!(
            started.elapsed() < WAIT,
            "ssh -R not serving after {:?}; stderr {:?}",
            started.elapsed(),
            client.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (client, started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_banner_only_floods_do_not_keep_ssh_out_and_are_closed_by_the_deadline() {
    let sb = Sandbox::new();
    let key = sb.key("real");
    let backend = Backend::start("real-client").await;
    let mut host = Host::start(&sb).await;
    let name = host.info(&sb, &key).await.name;
    // For comparison: the same client without a flood (a tunnel without a session waits up
    // to a second for owner options before its first request).
    let (tunnel, baseline) = timed_tunnel(&host, &sb, &key, &name, &backend, None).await;
    eprintln!("ssh -R connected and serving without a flood in {baseline:?}");
    drop(tunnel);
    host.wait_status(&name, 503).await;
    let rss_before = rss_bytes(host.pid());

    // 200 connections that send nothing and 200 that send only a version line, two per
    // address (127.0.1.x and 127.0.2.x), so no address nears its own cap.
    let mut flood = Flood::new();
    for i in 0..200u32 {
        let from = Ipv4Addr::new(127, 0, 1, (i / 2 + 1) as u8);
        flood.add(from, host.ssh_port, false).await;
    }
    for i in 0..200u32 {
        let from = Ipv4Addr::new(127, 0, 2, (i / 2 + 1) as u8);
        flood.add(from, host.ssh_port, true).await;
    }
    eprintln!(
        "400 flood connections opened in {:?}",
        flood.started.elapsed()
    );
    // The flood holds its slots for longer than it takes to be "silent" to the host.
    tokio::time::sleep(IDLE_REPLACE_AFTER + Duration::from_millis(500)).await;
    flood.settle().await;
    let held = flood.open();
    eprintln!("flood: {held} of 400 connections held by the host, the rest refused at accept");
    assert!(
        held <= MAX_UNAUTHENTICATED,
        "the host holds {held} unauthenticated connections, over its cap of {MAX_UNAUTHENTICATED}"
    );
    assert!(
        held >= 150,
        "only {held} flood connections held: the flood did not bring the host near its cap"
    );

    // A real client connects and serves within the bound while the flood holds on.
    let (tunnel, took) = timed_tunnel(&host, &sb, &key, &name, &backend, None).await;
    eprintln!("ssh -R connected and serving during the flood in {took:?}");
    assert!(
        took <= REAL_CLIENT_BOUND,
        "ssh -R took {took:?} during the flood"
    );
    // And a second, short-lived one (a command) as well.
    let started = Instant::now();
    let info = host.info(&sb, &sb.key("second")).await;
    let took_info = started.elapsed();
    eprintln!("ssh info during the flood in {took_info:?}");
    assert!(
        took_info <= REAL_CLIENT_BOUND,
        "ssh info took {took_info:?}"
    );
    assert!(!info.name.is_empty());
    assert_rss_flat(&host, rss_before, "flood of 400 connections");

    // The auth deadline closes every flood connection, counted from its accept.
    let times = flood.close_times().await;
    let still_open = times.iter().filter(|t| t.is_none()).count();
    assert_eq!(
        still_open,
        0,
        "{still_open} flood connections still open {:?} after the deadline",
        AUTH_TIMEOUT + Duration::from_secs(15)
    );
    let times: Vec<Duration> = times.into_iter().flatten().collect();
    let latest = times.iter().max().copied().unwrap();
    let at_deadline = times
        .iter()
        .filter(|t| **t >= AUTH_TIMEOUT - Duration::from_secs(1))
        .count();
    eprintln!(
        "flood: {at_deadline} connections closed by the {AUTH_TIMEOUT:?} deadline, the last \
         after {latest:?}"
    );
    assert!(
        latest <= AUTH_TIMEOUT + Duration::from_secs(4),
        "a flood connection was closed only after {latest:?}"
    );
    // Those held were closed by the deadline, not before (two made way for the real clients).
    assert!(
        at_deadline + 3 >= held,
        "{held} flood connections were held but only {at_deadline} lasted until the deadline"
    );

    // The host is up, the tunnel still serves, and the log was not flooded.
    assert!(host.is_running(), "p0rt exited; log:\n{}", host.log());
    assert_eq!(host.whoami(&name).await, (200, backend.id.clone()));
    let log = host.log();
    assert!(log.contains("ssh limits: auth deadline 20s"), "{log}");
    let summaries = log
        .lines()
        .filter(|l| l.contains("ssh admission: refused"))
        .count();
    assert!(
        (1..=4).contains(&summaries),
        "{summaries} admission summary lines; log:\n{log}"
    );
    let about_flood = log
        .lines()
        .filter(|l| l.contains("127.0.1.") || l.contains("127.0.2."))
        .count();
    assert!(
        about_flood < 10,
        "{about_flood} log lines about flood addresses; log:\n{log}"
    );
    drop(tunnel);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_from_one_address_meets_its_cap_and_real_clients_still_connect() {
    let sb = Sandbox::new();
    let key = sb.key("real");
    let backend = Backend::start("real-client").await;
    let host = Host::start(&sb).await;
    let name = host.info(&sb, &key).await.name;
    let rss_before = rss_bytes(host.pid());

    let flooder = Ipv4Addr::new(127, 0, 3, 7);
    let mut flood = Flood::new();
    for _ in 0..200 {
        flood.add(flooder, host.ssh_port, false).await;
    }
    tokio::time::sleep(IDLE_REPLACE_AFTER + Duration::from_millis(500)).await;
    flood.settle().await;
    let held = flood.open();
    eprintln!("flood from {flooder}: {held} of 200 connections held");
    assert_eq!(
        held, MAX_UNAUTHENTICATED_PER_SOURCE,
        "one address holds {held} unauthenticated connections"
    );

    // Another address is not affected at all.
    let (tunnel, took) = timed_tunnel(&host, &sb, &key, &name, &backend, None).await;
    eprintln!("ssh -R from 127.0.0.1 during the single-address flood: {took:?}");
    assert!(took <= REAL_CLIENT_BOUND, "ssh -R took {took:?}");
    drop(tunnel);
    host.wait_status(&name, 503).await;

    // A real client from the flooding address itself gets in too: it takes the place of one
    // of that address's silent connections.
    let (tunnel, took) = timed_tunnel(
        &host,
        &sb,
        &key,
        &name,
        &backend,
        Some(&flooder.to_string()),
    )
    .await;
    eprintln!("ssh -R from the flooding address {flooder}: {took:?}");
    assert!(took <= REAL_CLIENT_BOUND, "ssh -R took {took:?}");
    assert!(
        flood.open() < MAX_UNAUTHENTICATED_PER_SOURCE,
        "no flood connection made way"
    );
    assert_rss_flat(&host, rss_before, "flood from one address");
    drop(tunnel);
}

/// Waits until `client` printed `count` lines matching `pred`, and no more.
async fn wait_lines(client: &mut SshClient, what: &str, count: usize, pred: impl Fn(&str) -> bool) {
    eventually(WAIT, what, || {
        let n = client.lines().iter().filter(|l| pred(l)).count();
        let ok = n >= count;
        async move { ok.then_some(()) }
    })
    .await;
    let n = client.lines().iter().filter(|l| pred(l)).count();
    assert_eq!(n, count, "{what}: {:?}", client.lines());
}

#[tokio::test(flavor = "multi_thread")]
async fn forwards_and_session_channels_beyond_the_caps_are_refused_and_memory_stays_flat() {
    let sb = Sandbox::new();
    let key = sb.key("busy");
    let backend = Backend::start("capped").await;
    let mut host = Host::start(&sb).await;
    let rss_before = rss_bytes(host.pid());
    let target = format!("127.0.0.1:{}", backend.port);

    // One connection asking for 20 forwards: 16 are served, the other 4 refused, with a reason.
    let forwards = |labels: std::ops::Range<usize>| {
        labels
            .flat_map(|i| ["-R".to_string(), format!("app{i}:80:{target}")])
            .collect::<Vec<_>>()
    };
    let mut first = host
        .ssh(&sb, &key)
        .opt("ExitOnForwardFailure=no")
        .args(forwards(0..20))
        .spawn();
    wait_lines(
        &mut first,
        "16 forwards served",
        MAX_FORWARDS_PER_CONNECTION,
        |l| l.starts_with("Forwarding http://app"),
    )
    .await;
    wait_lines(&mut first, "4 forwards refused", 4, |l| {
        l.contains("refused -R app") && l.contains("at most 16 forwards per connection")
    })
    .await;
    for i in 16..20 {
        assert!(
            first
                .lines()
                .iter()
                .any(|l| l.contains(&format!("refused -R app{i}:80"))),
            "{:?}",
            first.lines()
        );
    }

    // A second connection of the key brings it to its cap of 32 live tunnels; a third gets no
    // new tunnel, but may still take over one of the key's own names (a reconnect).
    let mut second = host.ssh(&sb, &key).args(forwards(16..32)).spawn();
    wait_lines(&mut second, "16 more forwards", 16, |l| {
        l.starts_with("Forwarding http://app")
    })
    .await;
    assert_eq!(MAX_TUNNELS_PER_KEY, 32);
    let mut third = host
        .ssh(&sb, &key)
        .opt("ExitOnForwardFailure=no")
        .args([
            "-R",
            &format!("app32:80:{target}"),
            "-R",
            &format!("app0:80:{target}"),
        ])
        .spawn();
    third
        .wait_line("the 33rd tunnel refused", |l| {
            l.contains("refused -R app32:80: this key already serves 32 tunnels")
        })
        .await;
    third
        .wait_line("the takeover of app0 served", |l| {
            l.starts_with("Forwarding http://app0-")
        })
        .await;
    first
        .wait_line("the takeover notice", |l| {
            l.contains("is now served by a newer connection")
        })
        .await;

    // Session channels: OpenSSH multiplexing opens sessions on one connection. Four shells at
    // once are served; a fifth is refused; when one ends, another gets its place.
    let other = sb.key("mux");
    let socket = sb.join("mux.sock");
    let socket = socket.to_string_lossy().to_string();
    let _master = host
        .ssh(&sb, &other)
        .args(["-M", "-S", &socket, "-N", "-R", &format!("80:{target}")])
        .spawn();
    eventually(WAIT, "the multiplexing master", || async {
        std::path::Path::new(&socket).exists().then_some(())
    })
    .await;
    let mux = || {
        host.ssh(&sb, &other)
            .opt("ControlMaster=no")
            .args(["-S", &socket])
    };
    let mut shells = vec![mux().spawn()];
    shells[0]
        .wait_line("the first multiplexed shell", |l| {
            l.contains("Press Ctrl-C to close the tunnel")
        })
        .await;
    for _ in 1..MAX_SESSION_CHANNELS {
        shells.push(mux().spawn());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, shell) in shells.iter_mut().enumerate() {
        assert!(
            shell.try_exit().is_none(),
            "shell {i} exited: {:?}",
            shell.stderr()
        );
    }
    // OpenSSH reports the refusal, then falls back to a connection of its own.
    let mut fifth = mux().spawn();
    fifth.wait_exit().await;
    assert!(
        fifth.stderr().contains("Session open refused by peer"),
        "a fifth session channel was served: stdout {:?} stderr {:?}",
        fifth.lines(),
        fifth.stderr()
    );
    shells[0]
        .wait_line("the refusal in the owner's terminal", |l| {
            l.contains("refused a session channel: at most 4 open per connection")
        })
        .await;
    shells[MAX_SESSION_CHANNELS - 1].kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut again = mux().spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        again.try_exit().is_none(),
        "a session after one closed was refused: {:?}",
        again.stderr()
    );

    // Many refused -L channels on one connection: all refused, the connection stays, and only
    // the first few refusals reach the log.
    let local = free_port();
    let relay_key = sb.key("relay");
    let mut relay = host
        .ssh(&sb, &relay_key)
        .args(["-N", "-L", &format!("{local}:{target}")])
        .spawn();
    let mut tries = 0;
    while tries < 60 {
        match TcpStream::connect(("127.0.0.1", local)).await {
            Ok(mut stream) => {
                tries += 1;
                let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
                let (bytes, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
                assert!(bytes.is_empty(), "-L relayed data");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(relay.try_exit().is_none(), "the -L connection was dropped");
    let log = host.log();
    let logged = log.lines().filter(|l| l.contains("refused -L/-D")).count();
    assert_eq!(
        logged, LOGGED_REFUSALS_PER_CONNECTION as usize,
        "{logged} refusals logged for 60 refused channels"
    );
    assert!(
        log.contains("further refusals are logged at debug level"),
        "{log}"
    );
    assert_eq!(backend.hits(), 0, "a refused channel reached the backend");

    assert_rss_flat(&host, rss_before, "caps");
    assert!(host.is_running());
    drop((first, second, third, shells, again, relay));
    host.stop().await;
}

// ---------------------------------------------------------------------------------------------
// A raw SSH client (russh) for what OpenSSH will not do: leave channel opens unanswered, hold
// channels without reading, claim a key it cannot sign with.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Opens {
    /// Accept every `forwarded-tcpip` channel and hold it without a word.
    AcceptAndHold,
    /// Never answer a channel open.
    LeaveUnanswered,
}

/// Channels a [`Raw`] client holds, with the open it left unanswered.
type Held = Arc<Mutex<Vec<(Channel<Msg>, Option<ChannelOpenHandle>)>>>;

struct Raw {
    opens: Opens,
    /// Channel opens the host sent.
    opened: Arc<AtomicUsize>,
    held: Held,
}

impl client::Handler for Raw {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
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
        self.opened.fetch_add(1, Ordering::SeqCst);
        let reply = match self.opens {
            Opens::AcceptAndHold => {
                reply.accept().await;
                None
            }
            Opens::LeaveUnanswered => Some(reply),
        };
        self.held.lock().unwrap().push((channel, reply));
        Ok(())
    }
}

struct RawClient {
    handle: client::Handle<Raw>,
    opened: Arc<AtomicUsize>,
}

async fn raw_connect(port: u16, from: Ipv4Addr, opens: Opens) -> RawClient {
    let opened = Arc::new(AtomicUsize::new(0));
    let handler = Raw {
        opens,
        opened: opened.clone(),
        held: Arc::default(),
    };
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        ..Default::default()
    });
    let stream = connect_from(from, port).await;
    let handle = client::connect_stream(config, stream, handler)
        .await
        .expect("ssh handshake");
    RawClient { handle, opened }
}

/// A raw client authenticated with `key` that asked for `-R <label>:80` for each label.
async fn raw_tunnel(host: &Host, key: &Key, labels: &[&str], opens: Opens) -> RawClient {
    let mut raw = raw_connect(host.ssh_port, Ipv4Addr::LOCALHOST, opens).await;
    let private = russh::keys::load_secret_key(&key.path, None).expect("load key");
    let auth = raw
        .handle
        .authenticate_publickey("p0rt", PrivateKeyWithHashAlg::new(Arc::new(private), None))
        .await
        .expect("auth");
    assert!(auth.success(), "raw client not authenticated");
    for label in labels {
        raw.handle
            .tcpip_forward(*label, 80)
            .await
            .unwrap_or_else(|e| panic!("-R {label}:80 refused: {e}"));
    }
    raw
}

/// `n` concurrent GETs of `name` from `visitor`; each result (status, 0 for an error, and
/// time taken) lands in `results` as it completes.
fn visitors(
    host: &Host,
    name: &str,
    visitor: IpAddr,
    n: usize,
    tasks: &mut JoinSet<()>,
    results: &Arc<Mutex<Vec<(u16, Duration)>>>,
) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(visitor)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    for i in 0..n {
        let (client, results) = (client.clone(), results.clone());
        let (url, host_header) = (host.url(&format!("/v{i}")), host.host_header(name));
        tasks.spawn(async move {
            let started = Instant::now();
            let status = match client.get(url).header("host", host_header).send().await {
                Ok(res) => res.status().as_u16(),
                Err(_) => 0,
            };
            results.lock().unwrap().push((status, started.elapsed()));
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tunnel_channel_opens_left_unanswered_are_capped() {
    let sb = Sandbox::new();
    let key = sb.key("mute");
    let host = Host::start(&sb).await;
    let name = host.info(&sb, &key).await.name;
    let rss_before = rss_bytes(host.pid());
    let raw = raw_tunnel(&host, &key, &[""], Opens::LeaveUnanswered).await;

    // 40 visitors of a tunnel whose client answers no channel open: the host sends 32 opens
    // and no more; the other visitors wait (and, like the first 32, give up at the HTTP
    // edge's channel-open timeout) instead of adding unanswered opens.
    let visitors_n = MAX_PENDING_CHANNEL_OPENS + 8;
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    visitors(
        &host,
        &name,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        visitors_n,
        &mut tasks,
        &results,
    );
    eventually(WAIT, "32 channel opens sent", || {
        let opened = raw.opened.load(Ordering::SeqCst);
        async move { (opened >= MAX_PENDING_CHANNEL_OPENS).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        raw.opened.load(Ordering::SeqCst),
        MAX_PENDING_CHANNEL_OPENS,
        "channel opens sent to a client that answers none"
    );
    assert_rss_flat(&host, rss_before, "unanswered channel opens");
    while tasks.join_next().await.is_some() {}
    let done = results.lock().unwrap().clone();
    eprintln!(
        "pending cap: {} visitors answered {:?} within {:?}",
        done.len(),
        done.iter()
            .map(|(s, _)| *s)
            .collect::<std::collections::BTreeSet<_>>(),
        started.elapsed()
    );
    assert_eq!(done.len(), visitors_n);
    assert!(
        done.iter()
            .all(|(status, _)| *status == 502 || *status == 504),
        "{done:?}"
    );
    assert_eq!(
        raw.opened.load(Ordering::SeqCst),
        MAX_PENDING_CHANNEL_OPENS,
        "more opens after the visitors gave up"
    );
    let log = host.log();
    assert_eq!(
        log.matches(&format!(
            "visitor streams wait: the tunnel client has not answered {MAX_PENDING_CHANNEL_OPENS} channel opens"
        ))
        .count(),
        1,
        "one notice for the burst: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tunnel_channels_held_open_are_capped_per_connection_and_come_back() {
    let sb = Sandbox::new();
    let key = sb.key("holder");
    let host = Host::start(&sb).await;
    let name = host.info(&sb, &key).await.name;
    let rss_before = rss_bytes(host.pid());
    let labels = ["", "t1", "t2", "t3", "t4", "t5"];
    let raw = raw_tunnel(&host, &key, &labels, Opens::AcceptAndHold).await;
    let names: Vec<String> = labels
        .iter()
        .map(|l| {
            if l.is_empty() {
                name.clone()
            } else {
                format!("{l}-{name}")
            }
        })
        .collect();

    // 600 visitors (100 per tunnel, each tunnel from its own address) whose requests hang:
    // the client accepts the channels and never answers. 512 channels open; the visitors
    // beyond are answered 502 at once.
    let per_tunnel = 100;
    let beyond = names.len() * per_tunnel - MAX_TUNNEL_CHANNELS;
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for (i, tunnel) in names.iter().enumerate() {
        let visitor = IpAddr::V4(Ipv4Addr::new(127, 0, 6, i as u8 + 1));
        visitors(&host, tunnel, visitor, per_tunnel, &mut tasks, &results);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (opened, done) = (
            raw.opened.load(Ordering::SeqCst),
            results.lock().unwrap().len(),
        );
        if opened >= MAX_TUNNEL_CHANNELS && done >= beyond {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "channel cap not reached: {opened} channels opened, {done} visitors answered; \
             log:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{MAX_TUNNEL_CHANNELS} channels open after {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = results.lock().unwrap().clone();
    assert_eq!(raw.opened.load(Ordering::SeqCst), MAX_TUNNEL_CHANNELS);
    assert_eq!(
        done.len(),
        beyond,
        "answered while the others hang: {done:?}"
    );
    assert!(done.iter().all(|(status, _)| *status == 502), "{done:?}");
    assert!(
        host.log().contains(&format!(
            "the tunnel's SSH connection has {MAX_TUNNEL_CHANNELS} channels open"
        )),
        "{}",
        host.log()
    );
    assert_rss_flat(&host, rss_before, "512 channels held open");

    // The visitors give up: their channels close and new ones can be opened.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = JoinSet::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    visitors(
        &host,
        &name,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        1,
        &mut tasks,
        &results,
    );
    eventually(WAIT, "a new channel after the visitors left", || {
        let opened = raw.opened.load(Ordering::SeqCst);
        async move { (opened > MAX_TUNNEL_CHANNELS).then_some(()) }
    })
    .await;
    tasks.abort_all();
}

/// Signs nothing: answers the host's request for a signature with garbage of the right shape,
/// as someone who has a victim's public key but not its private key would.
struct Forger;

impl russh::Signer for Forger {
    type Error = AgentAuthError;

    #[allow(clippy::manual_async_fn)]
    fn auth_sign(
        &mut self,
        _key: &russh::keys::agent::AgentIdentity,
        _hash_alg: Option<russh::keys::HashAlg>,
        mut to_sign: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, Self::Error>> + Send {
        async move {
            fn string(out: &mut Vec<u8>, bytes: &[u8]) {
                out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                out.extend_from_slice(bytes);
            }
            let mut signature = Vec::new();
            string(&mut signature, b"ssh-ed25519");
            string(&mut signature, &[0x5a; 64]);
            string(&mut to_sign, &signature);
            Ok(to_sign)
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn knowing_a_public_key_does_not_use_up_its_connection_quota() {
    let sb = Sandbox::new();
    let victim = sb.key("victim");
    let backend = Backend::start("victim").await;
    let host = Host::start(&sb).await;
    let public = PublicKey::from_openssh(&victim.public).expect("public key");

    // More connections than the key's quota offer the victim's key and fail to sign; they
    // stay open (unauthenticated) for the rest of the test.
    let attack_started = Instant::now();
    let mut attackers = Vec::new();
    for i in 0..MAX_CONNECTIONS_PER_KEY + 4 {
        let from = Ipv4Addr::new(127, 0, 4, i as u8 + 1);
        let mut raw = raw_connect(host.ssh_port, from, Opens::LeaveUnanswered).await;
        let result = raw
            .handle
            .authenticate_publickey_with("p0rt", public.clone(), None, &mut Forger)
            .await
            .expect("auth exchange");
        assert!(!result.success(), "a forged signature was accepted");
        attackers.push(raw);
    }

    // The victim still has its whole quota: 8 connections at once, each serving a tunnel.
    let info = host.info(&sb, &victim).await;
    let mut tunnels = Vec::new();
    for i in 0..MAX_CONNECTIONS_PER_KEY {
        tunnels.push(
            host.ssh(&sb, &victim)
                .args(["-N", "-R", &format!("c{i}:80:127.0.0.1:{}", backend.port)])
                .spawn(),
        );
    }
    for i in 0..MAX_CONNECTIONS_PER_KEY {
        host.wait_served(&format!("c{i}-{}", info.name), &backend)
            .await;
    }
    // The quota is real: a ninth connection of the key is refused, with the reason.
    let out = host.ssh(&sb, &victim).command("info").output().await;
    assert!(
        !out.status.success(),
        "a ninth connection was served: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains("already has 8 connections open"),
        "{}",
        out.stderr
    );
    // The attackers were connected the whole time.
    assert!(
        attack_started.elapsed() < AUTH_TIMEOUT,
        "the test took too long to show anything"
    );
    assert!(
        attackers.iter().all(|a| !a.handle.is_closed()),
        "attackers were dropped"
    );
    // One connection closes, and the key gets its place back.
    tunnels.pop().unwrap().kill().await;
    eventually(WAIT, "the freed place", || async {
        let out = host.ssh(&sb, &victim).command("info").output().await;
        out.status.success().then_some(())
    })
    .await;
    drop(attackers);
}

#[tokio::test(flavor = "multi_thread")]
async fn compression_is_never_negotiated_even_when_the_client_asks() {
    let sb = Sandbox::new();
    let key = sb.key("zip");
    let host = Host::start(&sb).await;
    // `-C` makes OpenSSH prefer zlib@openssh.com and zlib; the host offers only `none`.
    let out = host
        .ssh(&sb, &key)
        .args(["-v", "-C"])
        .command("info")
        .output()
        .await;
    assert!(out.status.success(), "{}", out.stderr);
    let negotiated: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("debug1: kex: ") && l.contains("compression:"))
        .collect();
    eprintln!("{negotiated:#?}");
    assert_eq!(negotiated.len(), 2, "{}", out.stderr);
    assert!(
        negotiated.iter().all(|l| l.ends_with("compression: none")),
        "{negotiated:?}"
    );
    assert!(host.log().contains("compression off"), "{}", host.log());
}
