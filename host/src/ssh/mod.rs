//! The SSH edge: stock OpenSSH clients connect with a public key and ask for `-R 80:…`.
//!
//! Everything not needed for a reverse HTTP tunnel is refused: password and
//! keyboard-interactive auth, `-L`/`-D` (`direct-tcpip`), streamlocal, X11, agent forwarding,
//! subsystems. A remote forward to port 80 or 443 serves the key's name; `-R label:80:…`
//! serves `label-<name>`. `ssh … info` prints the key's name without forwarding anything.
//!
//! Limits (all printed once at startup): an authentication deadline from accept, caps on
//! unauthenticated connections ([`admission`]), on connections and tunnels per key (counted
//! only once the key's signature is verified), and per connection on session channels,
//! forwards and tunnel channels open or opening. Compression is never negotiated.

mod access;
pub mod admission;
pub mod banned;
mod commands;
mod host_key;
pub mod key_list;
pub mod limits;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use russh::keys::PrivateKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use admission::{
    Admission, KeyConnections, KeySlot, REFUSAL_SUMMARY_INTERVAL, Unauthenticated, Watched,
};

pub use access::{KeyAccess, KeyListSource, KeyVerdict};
use commands::Command;
pub use host_key::{HostKeyError, load_host_keys};
pub use limits::{
    AUTH_TIMEOUT, MAX_FORWARDS_PER_CONNECTION, MAX_PENDING_CHANNEL_OPENS, MAX_SESSION_CHANNELS,
    MAX_SSH_CONNECTIONS, MAX_TUNNEL_CHANNELS, SshLimits,
};

use crate::config::PublicUrls;
use crate::names::{KeyHash, Label, TunnelName, fingerprint};
use crate::scan::ScanService;
use crate::shutdown::Stop;
use crate::tokens::TokenStore;
use crate::tunnels::options::{self, SessionOptions};
use crate::tunnels::{
    KeyIdentity, LinkError, SessionId, SessionOutput, SessionOutputSink, TunnelLink, TunnelService,
    UpstreamIo,
};

/// Keepalive probe interval; with [`KEEPALIVE_MAX`] a dead client is dropped within 30 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered keepalives before the connection is closed.
pub const KEEPALIVE_MAX: usize = 2;
/// Time a client gets to go after the auth deadline's disconnect before its socket is closed.
const DEADLINE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Refusals logged at info per connection; later ones are logged at debug.
pub const LOGGED_REFUSALS_PER_CONNECTION: u32 = 16;
/// At most one notice per connection about refused or waiting tunnel channels per interval.
pub const CHANNEL_REFUSAL_NOTICE_INTERVAL: Duration = Duration::from_secs(10);
/// Receive window per channel: the most a client may send on one channel before the host has
/// passed it on. The window is returned to the client only as the channel's reader (the HTTP
/// edge, writing to one visitor) consumes the data, so a visitor that stops reading stops
/// only its own channel, and the host holds at most this much of it. Stock russh returned
/// the window on receipt and then waited for the reader, freezing every channel of the SSH
/// session behind one slow visitor; the fix is the patch in `vendor/russh` (see
/// `vendor/README.md`).
pub const CHANNEL_WINDOW_SIZE: u32 = 2 * 1024 * 1024;
/// Largest SSH packet payload accepted per channel message.
pub const MAX_PACKET_SIZE: u32 = 32 * 1024;
/// Remote ports served as HTTP tunnels.
pub const HTTP_FORWARD_PORTS: [u32; 2] = [80, 443];

fn russh_config(host_keys: Vec<PrivateKey>) -> russh::server::Config {
    russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: host_keys,
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        window_size: CHANNEL_WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET_SIZE,
        max_auth_attempts: 6,
        nodelay: true,
        // Never compression: zlib on a shared host is memory and CPU per connection for the
        // client to spend, and a decompression-bomb surface. Only `none` is offered.
        preferred: russh::Preferred {
            compression: std::borrow::Cow::Borrowed(&[russh::compression::NONE]),
            // Host keys are offered as rsa-sha2-512/256, never SHA-1 `ssh-rsa`.
            key: std::borrow::Cow::Borrowed(host_key::KEY_ALGORITHMS),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// What the SSH edge counts across connections.
struct Guards {
    admission: Arc<Admission>,
    keys: Arc<KeyConnections>,
}

/// What the SSH edge needs from the rest of the host.
pub struct SshEdge {
    /// Caps and deadlines (`ssh.limits.*`).
    pub limits: SshLimits,
    /// Failed-auth bans: checked at accept, fed when a connection fails to authenticate.
    pub bans: Arc<crate::bans::BanList>,
    pub tunnels: Arc<TunnelService>,
    pub access: KeyAccess,
    pub urls: PublicUrls,
    /// The port clients connect to, for the hint printed to a key without a tunnel.
    pub ssh_port: u16,
    /// The base domain, for the same hint.
    pub domain: String,
    /// For `ssh … scan`.
    pub scans: Arc<ScanService>,
    /// For `ssh … token`.
    pub tokens: Arc<TokenStore>,
    /// Authenticated sessions, for closing those of a banned key.
    pub sessions: banned::LiveSessions,
}

/// Time sessions get to close after being told the host is going away.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Accepts SSH connections until `stop`; sessions keep serving (requests in flight through
/// them finish) until `disconnect`, when each is told the host is going away. Returns once
/// they have closed, or [`SHUTDOWN_GRACE`] after `disconnect`.
pub async fn serve(
    listener: TcpListener,
    edge: Arc<SshEdge>,
    host_keys: Vec<PrivateKey>,
    mut stop: Stop,
    mut disconnect: Stop,
) {
    let config = Arc::new(russh_config(host_keys));
    let guards = Arc::new(Guards {
        admission: Admission::new(edge.limits.unauthenticated),
        keys: KeyConnections::new(edge.limits.max_connections_per_key),
    });
    tracing::info!("{}", edge.limits.describe());
    let max_connections = edge.limits.max_connections;
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut connections = JoinSet::new();
    // Refusals are counted and summed up at most once per interval, so a flood of
    // connections is a line every ten seconds in the log, not a line per connection.
    let mut summary = tokio::time::interval(REFUSAL_SUMMARY_INTERVAL);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused_at_max = 0u64;
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!("ssh accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = summary.tick() => {
                if let Some(line) = guards.admission.take_summary() {
                    tracing::info!("{line}");
                }
                if refused_at_max > 0 {
                    tracing::warn!(
                        "refused {refused_at_max} ssh connections: {max_connections} connections open"
                    );
                    refused_at_max = 0;
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                "refusing ssh connection from {peer}: {max_connections} connections open"
            );
            refused_at_max += 1;
            continue;
        };
        // Closed before a byte of SSH is sent when refused.
        let pending = match guards.admission.admit(peer.ip()) {
            Ok(pending) => pending,
            Err(refusal) => {
                tracing::debug!("refusing ssh connection from {peer}: {refusal}");
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        crate::metrics::ssh_connection();
        let (config, edge, guards, disconnect) = (
            config.clone(),
            edge.clone(),
            guards.clone(),
            disconnect.clone(),
        );
        connections.spawn(async move {
            // Checked here, not in the accept loop: a ban lookup in Redis must not hold up
            // accepting other clients.
            if let Some(ban) = edge.bans.banned(peer.ip()).await {
                crate::metrics::ssh_auth_failure("banned");
                tracing::debug!(
                    "refusing ssh connection from {peer}: banned until {} ({})",
                    ban.until,
                    ban.reason
                );
                return;
            }
            run_connection(config, edge, guards, socket, peer, pending, disconnect).await;
            drop(slot);
        });
    }
    drop(listener);
    disconnect.stopped().await;
    let closing = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, closing).await.is_err() {
        tracing::warn!("ssh sessions still open after {SHUTDOWN_GRACE:?}; dropping them");
    }
}

async fn run_connection(
    config: Arc<russh::server::Config>,
    edge: Arc<SshEdge>,
    guards: Arc<Guards>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    pending: Unauthenticated,
    mut disconnect: Stop,
) {
    // One deadline from accept covers the version exchange, key exchange and authentication.
    let auth_timeout = edge.limits.auth_timeout;
    let deadline = tokio::time::Instant::now() + auth_timeout;
    let watch = pending.watch();
    let connected_at = std::time::Instant::now();
    // The authenticated key's fingerprint, once its signature is verified.
    let authenticated: Arc<OnceLock<String>> = Arc::default();
    let handler = Connection::new(edge, guards, peer, authenticated.clone(), pending);
    let stream = Watched::new(socket, watch.clone());
    // Boxed: the handshake's future is over a kilobyte and would otherwise stay in this
    // task, for as long as the connection lives, after the handshake has ended.
    let handshake = Box::pin(russh::server::run_stream(config, stream, handler));
    let started = tokio::time::timeout_at(deadline, handshake).await;
    let session = match started {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            tracing::debug!("ssh handshake with {peer} failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("ssh client {peer} sent no version line within {auth_timeout:?}");
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    let auth_deadline = tokio::time::sleep_until(deadline);
    tokio::pin!(auth_deadline);
    let mut deadline_passed = false;
    loop {
        tokio::select! {
            result = &mut session => {
                let reason = match result {
                    Ok(()) => "closed".to_string(),
                    Err(e) => format!("ended: {e}"),
                };
                return log_session_end(peer, authenticated.get(), connected_at, &reason);
            }
            _ = &mut auth_deadline, if !deadline_passed => {
                deadline_passed = true;
                if authenticated.get().is_none() {
                    tracing::debug!("ssh client {peer} did not authenticate within {auth_timeout:?}");
                    let bye = handle.disconnect(
                        russh::Disconnect::ByApplication,
                        format!("authentication timeout ({}s)", auth_timeout.as_secs()),
                        String::new(),
                    );
                    let _ = tokio::time::timeout(DEADLINE_CLOSE_GRACE, bye).await;
                    // A client that neither finishes nor reads is cut off: its stream fails.
                    if tokio::time::timeout(DEADLINE_CLOSE_GRACE, &mut session).await.is_err() {
                        watch.close();
                        let _ = tokio::time::timeout(DEADLINE_CLOSE_GRACE, &mut session).await;
                    }
                    return;
                }
            }
            _ = disconnect.stopped() => {
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "the p0rt host is shutting down; reconnect shortly".into(),
                        String::new(),
                    )
                    .await;
                let _ = session.await;
                let reason = "closed: the host is shutting down";
                return log_session_end(peer, authenticated.get(), connected_at, reason);
            }
        }
    }
}

/// The one line an SSH connection leaves in the host log when it ends: at info for a
/// connection that authenticated (with its key, how long it lasted and why it ended), at
/// debug for one that never did (those are counted toward bans and summed up by admission,
/// so a flood of them does not flood the log).
fn log_session_end(
    peer: SocketAddr,
    key: Option<&String>,
    started: std::time::Instant,
    reason: &str,
) {
    let seconds = started.elapsed().as_secs();
    match key {
        Some(key) => tracing::info!(
            peer = %peer,
            key = %key,
            "ssh connection from {peer} (key {key}) {reason} after {seconds} s"
        ),
        None => tracing::debug!(
            "ssh connection from {peer} {reason} after {seconds} s without authenticating"
        ),
    }
}

/// The tunnel channels of one connection: those open, and those the client has not answered.
struct ChannelBudget {
    open: Arc<Semaphore>,
    max_open: usize,
    pending: Arc<Semaphore>,
    max_pending: usize,
    peer: SocketAddr,
    output: SessionOutput,
    /// Visitor streams refused for want of a channel.
    refused: Notice,
    /// Visitor streams that waited for the client to answer earlier opens.
    waited: Notice,
}

impl ChannelBudget {
    fn new(peer: SocketAddr, output: SessionOutput, limits: &SshLimits) -> ChannelBudget {
        let (max_open, max_pending) =
            (limits.max_tunnel_channels, limits.max_pending_channel_opens);
        ChannelBudget {
            open: Arc::new(Semaphore::new(max_open)),
            max_open,
            pending: Arc::new(Semaphore::new(max_pending)),
            max_pending,
            peer,
            output,
            refused: Notice::new(),
            waited: Notice::new(),
        }
    }

    /// Counts one more event of `notice`; at most one line per
    /// [`CHANNEL_REFUSAL_NOTICE_INTERVAL`] goes to the host log and the owner's terminal,
    /// `line` making it from the number of events since the last one.
    fn note(&self, notice: &Notice, line: impl FnOnce(u64) -> String) {
        if let Some(count) = notice.count() {
            let line = line(count);
            tracing::info!(peer = %self.peer, "{line}");
            self.output.line(format!("p0rt: {line}"));
        }
    }
}

/// A rate-limited count of one kind of event.
struct Notice {
    created: Instant,
    /// Milliseconds after `created` of the last line, 0 for none yet.
    last_ms: AtomicU64,
    since_last: AtomicU64,
}

impl Notice {
    fn new() -> Notice {
        Notice {
            created: Instant::now(),
            last_ms: AtomicU64::new(0),
            since_last: AtomicU64::new(0),
        }
    }

    /// Counts an event; `Some(events since the last line)` when a line is due.
    fn count(&self) -> Option<u64> {
        self.since_last.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.created.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let interval = CHANNEL_REFUSAL_NOTICE_INTERVAL.as_millis() as u64;
        let due = (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        due.then(|| self.since_last.swap(0, Ordering::Relaxed))
    }
}

/// A remote forward's way back to the client: a new `forwarded-tcpip` channel per stream,
/// echoing the address and port of the client's `tcpip-forward` so it matches its `-R`.
struct SshLink {
    handle: russh::server::Handle,
    bind_address: String,
    bind_port: u32,
    budget: Arc<ChannelBudget>,
}

#[async_trait]
impl TunnelLink for SshLink {
    async fn open_stream(&self, peer: SocketAddr) -> Result<Box<dyn UpstreamIo>, LinkError> {
        let budget = &self.budget;
        let Ok(open) = budget.open.clone().try_acquire_owned() else {
            let reason = format!(
                "the tunnel's SSH connection has {} channels open, the most it may",
                budget.max_open
            );
            budget.note(&budget.refused, |n| {
                format!("refused {n} visitor streams: {reason}")
            });
            return Err(LinkError(reason));
        };
        // A client slow to answer makes visitors wait here (bounded by the HTTP edge's
        // channel-open timeout), not the host hold more unanswered opens.
        let pending = match budget.pending.clone().try_acquire_owned() {
            Ok(pending) => pending,
            Err(_) => {
                budget.note(&budget.waited, |n| {
                    format!(
                        "{n} visitor streams wait: the tunnel client has not answered \
                         {} channel opens",
                        budget.max_pending
                    )
                });
                budget
                    .pending
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| LinkError("the connection is closing".into()))?
            }
        };
        let (handle, address, port) = (
            self.handle.clone(),
            self.bind_address.clone(),
            self.bind_port,
        );
        // The open holds its pending place until the client answers, even when the visitor
        // gives up first: what counts as pending is what the client has left unanswered.
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let opened = handle
                .channel_open_forwarded_tcpip(
                    address,
                    port,
                    peer.ip().to_string(),
                    u32::from(peer.port()),
                )
                .await;
            drop(pending);
            if let Err(Ok(channel)) = answer.send(opened) {
                // Nobody waits for it any more: close it (the stream closes on drop).
                drop(channel.into_stream());
            }
        });
        let channel = answered
            .await
            .map_err(|_| LinkError("the connection is closing".into()))?
            .map_err(|e| LinkError(e.to_string()))?;
        Ok(Box::new(Counted {
            inner: channel.into_stream(),
            _open: open,
        }))
    }

    fn client_addr(&self) -> Option<SocketAddr> {
        Some(self.budget.peer)
    }

    async fn disconnect(&self, reason: &str) {
        let _ = self
            .handle
            .disconnect(
                russh::Disconnect::ByApplication,
                reason.into(),
                String::new(),
            )
            .await;
    }
}

/// A tunnel stream holding its place among the connection's open channels.
struct Counted<S> {
    inner: S,
    _open: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One open session channel.
struct SessionChannel {
    /// The writing half, for command output and [`SessionOutputSink`]; taken by `scan`.
    writer: Option<russh::ChannelWriteHalf<Msg>>,
    /// A terminal was requested, so output lines end in CRLF.
    pty: bool,
    /// A `scan` writing to this channel: alive while the scan runs.
    scan: Option<Weak<()>>,
}

impl SessionChannel {
    /// Still counts among the connection's session channels.
    fn live(&self) -> bool {
        self.scan
            .as_ref()
            .is_none_or(|scan| scan.strong_count() > 0)
    }
}

/// One SSH connection's state. Dropped when the connection ends, which unregisters
/// its tunnels (only those it still serves) and frees its places in the host's counts.
struct Connection {
    id: SessionId,
    peer: SocketAddr,
    edge: Arc<SshEdge>,
    guards: Arc<Guards>,
    authenticated: Arc<OnceLock<String>>,
    /// The connection's place among unauthenticated ones, until its signature is verified.
    unauthenticated: Option<Unauthenticated>,
    /// From then on, its place in its key's connection quota.
    key_slot: Option<KeySlot>,
    /// A verified key that may not stay (over its connection quota, or inactive or expired
    /// in the key list): the reason and message the connection is closed with.
    closing: Option<(russh::Disconnect, String)>,
    key: Option<KeyIdentity>,
    /// The key's main name, resolved on first use.
    name: Option<TunnelName>,
    /// Names this connection registered, in request order.
    forwards: Vec<TunnelName>,
    output: SessionOutput,
    output_sink: Option<SessionOutputSink>,
    sessions: HashMap<ChannelId, SessionChannel>,
    channels: Arc<ChannelBudget>,
    /// Requests refused so far (only the first ones are logged at info).
    refusals: u32,
    /// The owner's options (`ssh … -- allow=…`), shared with this connection's tunnels.
    options: Arc<SessionOptions>,
    /// An authentication attempt was refused (a key not accepted here). A connection that
    /// ends without authenticating after one counts as a failure toward a ban.
    auth_refused: bool,
}

impl Connection {
    fn new(
        edge: Arc<SshEdge>,
        guards: Arc<Guards>,
        peer: SocketAddr,
        authenticated: Arc<OnceLock<String>>,
        unauthenticated: Unauthenticated,
    ) -> Self {
        let (output, sink) = SessionOutput::new();
        let channels = Arc::new(ChannelBudget::new(peer, output.clone(), &edge.limits));
        Connection {
            id: SessionId::next(),
            peer,
            edge,
            guards,
            authenticated,
            unauthenticated: Some(unauthenticated),
            key_slot: None,
            closing: None,
            key: None,
            name: None,
            forwards: Vec::new(),
            channels,
            output,
            output_sink: Some(sink),
            sessions: HashMap::new(),
            refusals: 0,
            options: Arc::new(SessionOptions::default()),
            auth_refused: false,
        }
    }

    /// Session channels open now (a channel running `scan` counts until the scan ends).
    fn open_sessions(&mut self) -> usize {
        self.sessions.retain(|_, s| s.live());
        self.sessions.len()
    }

    fn pty(&self, channel: ChannelId) -> bool {
        self.sessions.get(&channel).is_some_and(|s| s.pty)
    }

    /// Writes `text` to a session channel and ends it with `status`.
    fn finish(
        &mut self,
        session: &mut Session,
        channel: ChannelId,
        text: &str,
        status: u32,
    ) -> Result<(), russh::Error> {
        let pty = self.pty(channel);
        self.sessions.remove(&channel);
        finish_command(session, channel, text, status, pty)
    }

    /// Starts writing the tunnels' output lines to `channel`, once per connection.
    fn attach_output(&mut self, channel: ChannelId) {
        let pty = self.pty(channel);
        let writer = self.sessions.get(&channel).and_then(|s| s.writer.as_ref());
        if let (Some(writer), true) = (writer, self.output_sink.is_some()) {
            let terminal = writer.make_writer();
            if let Some(sink) = self.output_sink.take() {
                self.output.line("Press Ctrl-C to close the tunnel.");
                tokio::spawn(sink.run(terminal, pty));
            }
        }
    }

    /// The key's main name, assigned (and noted in the store) on first use.
    async fn main_name(&mut self) -> Result<TunnelName, String> {
        if let Some(name) = &self.name {
            return Ok(name.clone());
        }
        let Some(key) = &self.key else {
            return Err("not authenticated".into());
        };
        let name = self
            .edge
            .tunnels
            .main_name(key, crate::unix_now())
            .await
            .map_err(|e| {
                tracing::error!("naming key {} failed: {e}", key.fingerprint);
                e.to_string()
            })?;
        self.name = Some(name.clone());
        Ok(name)
    }

    /// The `info` answer, and whether the key has a name.
    async fn info_text(&mut self) -> (String, bool) {
        let fingerprint = self
            .key
            .as_ref()
            .map(|k| k.fingerprint.clone())
            .unwrap_or_default();
        match self.main_name().await {
            Ok(name) => (
                format!(
                    "name: {name}\nurl:  {}\nkey:  {fingerprint}\n",
                    self.edge.urls.of(name.as_str())
                ),
                true,
            ),
            Err(e) => (
                format!("p0rt: no name available for key {fingerprint}: {e}\n"),
                false,
            ),
        }
    }

    /// `token`: a new API token (replacing the key's previous one), or `--revoke`.
    async fn token_command(&self, revoke: bool) -> (String, u32) {
        let Some(key) = &self.key else {
            return ("p0rt: not authenticated\n".into(), 1);
        };
        let tokens = &self.edge.tokens;
        if revoke {
            return match tokens.revoke(&key.hash).await {
                Ok(true) => ("API token revoked.\n".into(), 0),
                Ok(false) => ("This key has no API token.\n".into(), 0),
                Err(e) => (format!("p0rt: {e}\n"), 1),
            };
        }
        match tokens.issue(&key.hash).await {
            Ok(token) => (
                format!(
                    "{}\n\nAPI token for key {} (shown once; a new `token` replaces it, \
                     `token --revoke` removes it). Use it as\n  \
                     curl -H 'Authorization: Bearer <token>' -X POST {}/api/scans\n",
                    token.expose(),
                    key.fingerprint,
                    self.edge.urls.base()
                ),
                0,
            ),
            Err(e) => (format!("p0rt: {e}\n"), 1),
        }
    }

    /// `ssh -R … host -- allow=… auth=…`: applies the options to this connection's tunnels,
    /// echoes what was accepted and refused, and then serves like a shell (the session stays
    /// open, showing the request log), since the command is the owner's way of configuring
    /// the tunnels, not a command that ends.
    fn set_options(
        &mut self,
        line: &str,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let parsed = options::parse(line);
        for echo in parsed.echo() {
            self.output.line(format!("p0rt: {echo}"));
        }
        if !parsed.refused.is_empty() {
            tracing::info!(peer = %self.peer, "refused tunnel options: {:?}", parsed.refused);
        }
        self.options.set(parsed.accepted);
        if self.forwards.is_empty() {
            return self.finish(
                session,
                channel,
                "p0rt: options apply to this connection's tunnels, and it has none; \
                 add -R 80:localhost:<port>\n",
                1,
            );
        }
        self.attach_output(channel);
        Ok(())
    }

    /// Tells the client (in its terminal) and the host log why a request was refused. Only
    /// the first [`LOGGED_REFUSALS_PER_CONNECTION`] go to the log at info, so a client
    /// repeating a refused request cannot flood it.
    fn refuse(&mut self, message: String) {
        self.refusals = self.refusals.saturating_add(1);
        if self.refusals <= LOGGED_REFUSALS_PER_CONNECTION {
            tracing::info!(peer = %self.peer, "{message}");
            if self.refusals == LOGGED_REFUSALS_PER_CONNECTION {
                tracing::info!(
                    peer = %self.peer,
                    "{LOGGED_REFUSALS_PER_CONNECTION} requests refused on this connection; \
                     further refusals are logged at debug level"
                );
            }
        } else {
            tracing::debug!(peer = %self.peer, "{message}");
        }
        self.output.line(format!("p0rt: {message}"));
    }

    async fn add_forward(
        &mut self,
        address: &str,
        port: u32,
        handle: russh::server::Handle,
    ) -> bool {
        match self.try_add_forward(address, port, handle).await {
            Ok(name) => {
                tracing::info!(peer = %self.peer, "tunnel {name} up");
                self.output.line(format!(
                    "Forwarding {} -> your -R target",
                    self.edge.urls.of(name.as_str())
                ));
                true
            }
            Err(problem) => {
                // As the client typed it: `-R 8080:…` or `-R api:80:…`.
                let forward = match Label::from_bind_address(address) {
                    Ok(None) => port.to_string(),
                    _ => format!("{address}:{port}"),
                };
                self.refuse(format!("refused -R {forward}: {problem}"));
                false
            }
        }
    }

    async fn try_add_forward(
        &mut self,
        address: &str,
        port: u32,
        handle: russh::server::Handle,
    ) -> Result<TunnelName, String> {
        if !HTTP_FORWARD_PORTS.contains(&port) {
            return Err("only remote ports 80 and 443 are served (HTTP tunnels); \
                 use -R 80:localhost:<your port>"
                .into());
        }
        let max_forwards = self.edge.limits.max_forwards_per_connection;
        if self.forwards.len() >= max_forwards {
            return Err(format!("at most {max_forwards} forwards per connection"));
        }
        let label = Label::from_bind_address(address)?;
        let main = self.main_name().await?;
        let Some(key) = self.key.clone() else {
            return Err("not authenticated".into());
        };
        let tunnels = &self.edge.tunnels;
        let name = tunnels
            .forward_name(&key, &main, label.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        if let Some(ban) = self.edge.bans.name_banned(name.as_str()) {
            return Err(banned::name_message(name.as_str(), &ban));
        }
        let link = Arc::new(SshLink {
            handle,
            bind_address: address.to_string(),
            bind_port: port,
            budget: self.channels.clone(),
        });
        let opened = tunnels
            .open(
                &key,
                self.id,
                name.clone(),
                link,
                self.output.clone(),
                self.options.clone(),
            )
            .map_err(|e| {
                tracing::warn!("{name}: refused for {}: {e}", self.peer);
                e.to_string()
            })?;
        if let Some(old) = opened.displaced {
            tracing::info!("{name}: taken over by a new connection from {}", self.peer);
            old.output.line(format!(
                "p0rt: {name} is now served by a newer connection of this key"
            ));
        }
        if !self.forwards.contains(&name) {
            self.forwards.push(name.clone());
        }
        Ok(name)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.key.is_none() && self.auth_refused {
            crate::metrics::ssh_auth_failure("key_refused");
            let (bans, ip) = (self.edge.bans.clone(), self.peer.ip());
            tokio::spawn(async move {
                match bans.record_failure(ip, "ssh authentication failed").await {
                    Ok(Some(ban)) => tracing::warn!(
                        "banned {ip} for {} s after {} failed ssh authentications",
                        ban.until - ban.since,
                        ban.failures
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("could not count a failed login of {ip}: {e}"),
                }
            });
        }
        self.edge.sessions.remove(self.id);
        for name in &self.forwards {
            if self.edge.tunnels.close(name, self.id) {
                tracing::info!(peer = %self.peer, "tunnel {name} down: its ssh connection ended");
            }
        }
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(match self.edge.access.check(offer.public_key).await {
            // A key the list refuses (inactive, expired) is accepted here so its holder can
            // prove it holds it and then be told why it may not connect (`auth_publickey`);
            // someone who only knows the public key learns nothing more.
            KeyVerdict::Allowed { .. } | KeyVerdict::Refused(_) => Auth::Accept,
            KeyVerdict::Unlisted => {
                self.auth_refused = true;
                Auth::reject()
            }
            // The list cannot be read now: refused, but not counted toward a ban.
            KeyVerdict::Unavailable => Auth::reject(),
        })
    }

    /// p0rt takes no OpenSSH certificates (russh's `auth_openssh_certificate` refuses them
    /// all), so an offered certificate is refused at once: the client is not told "key
    /// accepted" and made to sign for nothing, and moves on to its plain key. Counted toward
    /// a ban exactly as an offer of the key inside would be.
    async fn auth_openssh_certificate_offered(
        &mut self,
        user: &str,
        _certificate: &russh::keys::Certificate,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        self.auth_publickey_offered(user, offer).await?;
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let tier = match self.edge.access.check(key.public_key).await {
            KeyVerdict::Allowed { tier } => tier,
            KeyVerdict::Refused(message) => {
                tracing::info!(
                    peer = %self.peer,
                    "refused key {}: {message}",
                    fingerprint(key.public_key)
                );
                // Accepted so the holder is told why (in `auth_succeeded`), then
                // disconnected; it gets no key and no slot, and the connection counts as a
                // failed authentication of its address.
                self.auth_refused = true;
                self.closing = Some((russh::Disconnect::NoMoreAuthMethodsAvailable, message));
                return Ok(Auth::Accept);
            }
            KeyVerdict::Unlisted => {
                self.auth_refused = true;
                return Ok(Auth::reject());
            }
            KeyVerdict::Unavailable => return Ok(Auth::reject()),
        };
        // The signature is verified: from here on the connection counts against its key,
        // never before (someone who only knows the public key cannot use up its quota).
        let identity = KeyIdentity {
            hash: KeyHash::of_key(key.public_key),
            fingerprint: fingerprint(key.public_key),
        };
        if let Some(ban) = self
            .edge
            .bans
            .key_banned(&identity.fingerprint, identity.hash.as_str())
        {
            crate::metrics::ssh_auth_failure("key_banned");
            tracing::info!(
                peer = %self.peer,
                "refused key {}: banned by the operator ({})",
                identity.fingerprint,
                ban.reason
            );
            // Accepted so the holder is told why (in `auth_succeeded`), then disconnected,
            // as for a key the key list refuses; not counted against the address.
            self.closing = Some((
                russh::Disconnect::NoMoreAuthMethodsAvailable,
                banned::key_message(&identity.fingerprint, &ban),
            ));
            return Ok(Auth::Accept);
        }
        let Some(slot) = self.guards.keys.try_acquire(&identity.hash) else {
            let max = self.guards.keys.max();
            tracing::info!(
                peer = %self.peer,
                "refused a connection of key {}: it has {max} connections open, the most one key may",
                identity.fingerprint
            );
            // Accepted so the client is told why (in `auth_succeeded`), then disconnected;
            // it gets no key and the auth deadline still applies.
            self.closing = Some((
                russh::Disconnect::TooManyConnections,
                format!(
                    "p0rt: key {} already has {max} connections open, the most one key may; \
                     close one and retry",
                    identity.fingerprint
                ),
            ));
            return Ok(Auth::Accept);
        };
        self.key_slot = Some(slot);
        let _ = self.authenticated.set(identity.fingerprint.clone());
        self.key = Some(identity);
        // No tunnel exists yet: every tunnel of the connection carries the key's tier.
        self.options = Arc::new(SessionOptions::for_tier(tier));
        self.unauthenticated = None;
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some((reason, message)) = self.closing.take() {
            session.disconnect(reason, &message, "")?;
        } else if let Some(key) = &self.key {
            self.edge
                .sessions
                .add(self.id, key.clone(), session.handle());
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.key.is_none() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let max_sessions = self.edge.limits.max_session_channels;
        if self.open_sessions() >= max_sessions {
            self.refuse(format!(
                "refused a session channel: at most {max_sessions} open per connection"
            ));
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        // Requests and input arrive through the handler, so the reading half is dropped
        // (its data counts as consumed at once); the writing half carries the output.
        let id = channel.id();
        let (_input, output) = channel.split();
        self.sessions.insert(
            id,
            SessionChannel {
                writer: Some(output),
                pty: false,
                scan: None,
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sessions.remove(&channel);
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse(format!(
            "refused -L/-D to {host}:{port}: p0rt is not a relay, only -R tunnels are served"
        ));
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("refused unix socket forwarding: only -R tunnels are served".into());
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host: &str,
        _port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.sessions.get_mut(&channel) {
            Some(open) => {
                open.pty = true;
                session.channel_success(channel)
            }
            None => session.channel_failure(channel),
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("refused X11 forwarding".into());
        session.channel_failure(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse("refused agent forwarding".into());
        Ok(false)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse(format!("refused subsystem {name:?}"));
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        self.options.settle();
        if self.forwards.is_empty() {
            // Nothing to keep open for: show who the key is and how to start a tunnel.
            let (mut text, named) = self.info_text().await;
            if !named {
                return self.finish(session, channel, &text, 1);
            }
            text.push_str(&format!(
                "No tunnel requested. Start one with: ssh -p {} -R 80:localhost:3000 {}\n",
                self.edge.ssh_port, self.edge.domain
            ));
            return self.finish(session, channel, &text, 0);
        }
        self.attach_output(channel);
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let command = String::from_utf8_lossy(data);
        if options::looks_like_options(&command) {
            return self.set_options(&command, channel, session);
        }
        self.options.settle();
        let command = match commands::parse(&command) {
            Ok(command) => command,
            Err(problem) => {
                return self.finish(session, channel, &format!("p0rt: {problem}\n"), 1);
            }
        };
        match command {
            Command::Info => {
                let (text, named) = self.info_text().await;
                self.finish(session, channel, &text, if named { 0 } else { 1 })
            }
            Command::Help => {
                let max = self.edge.tunnels.max_tunnels_per_key();
                let text = commands::help_text(max, self.options.tier());
                self.finish(session, channel, &text, 0)
            }
            Command::Stats => {
                let mine: Vec<_> = match &self.key {
                    Some(key) => self
                        .edge
                        .tunnels
                        .live_tunnels()
                        .into_iter()
                        .filter(|t| t.owner == key.hash)
                        .collect(),
                    None => Vec::new(),
                };
                let text = commands::stats_text(&mine, &self.edge.urls);
                self.finish(session, channel, &text, 0)
            }
            Command::Token { revoke } => {
                let (text, status) = self.token_command(revoke).await;
                self.finish(session, channel, &text, status)
            }
            Command::Scan { request, json } => {
                let pty = self.pty(channel);
                let open = self.sessions.get_mut(&channel);
                let (Some(key), Some(open)) = (self.key.clone(), open) else {
                    return self.finish(session, channel, "p0rt: not available here\n", 1);
                };
                let Some(writer) = open.writer.take() else {
                    return self.finish(session, channel, "p0rt: not available here\n", 1);
                };
                // The channel counts as open while the scan writes to it.
                let running = Arc::new(());
                open.scan = Some(Arc::downgrade(&running));
                // Runs beside the session: a scan takes seconds, and the connection's other
                // events (keepalives, forwards) must not wait for it.
                let (scans, urls) = (self.edge.scans.clone(), self.edge.urls.clone());
                tokio::spawn(async move {
                    commands::run_scan(scans, urls, key.hash, request, json, pty, writer).await;
                    drop(running);
                });
                Ok(())
            }
        }
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Ctrl-C or Ctrl-D in the terminal closes the session (and so the tunnels).
        if self.sessions.contains_key(&channel) && data.iter().any(|b| *b == 3 || *b == 4) {
            return self.finish(session, channel, "p0rt: closing tunnels, bye\n", 0);
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.add_forward(address, *port, session.handle()).await)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        _port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let (Ok(label), Some(main)) = (Label::from_bind_address(address), self.name.clone()) else {
            return Ok(false);
        };
        let name = match label {
            Some(label) => match main.subname(&label) {
                Ok(name) => name,
                Err(_) => return Ok(false),
            },
            None => main,
        };
        let removed = self.edge.tunnels.close(&name, self.id);
        self.forwards.retain(|n| n != &name);
        Ok(removed)
    }

    async fn streamlocal_forward(
        &mut self,
        _socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse("refused unix socket forwarding: only -R <port> tunnels are served".into());
        Ok(false)
    }
}

/// Writes `text` to a session channel, then ends it with `status`.
fn finish_command(
    session: &mut Session,
    channel: ChannelId,
    text: &str,
    status: u32,
    pty: bool,
) -> Result<(), russh::Error> {
    let text = if pty {
        text.replace('\n', "\r\n")
    } else {
        text.to_string()
    };
    session.data(channel, text.into_bytes())?;
    session.exit_status_request(channel, status)?;
    session.eof(channel)?;
    session.close(channel)
}
