//! The SSH edge: stock OpenSSH clients connect with a public key and ask for `-R 80:…`.
//!
//! Everything not needed for a reverse HTTP tunnel is refused: password and
//! keyboard-interactive auth, `-L`/`-D` (`direct-tcpip`), streamlocal, X11, agent forwarding,
//! subsystems. A remote forward to port 80 or 443 serves the key's name; `-R label:80:…`
//! serves `label-<name>`. `ssh … info` prints the key's name without forwarding anything.

mod access;
mod commands;
mod host_key;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use russh::keys::PrivateKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use access::KeyAccess;
use commands::Command;
pub use host_key::{HostKeyError, load_or_create_host_key};

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
/// Time a client has to exchange SSH version strings.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has from connecting to completing authentication.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent SSH connections accepted; beyond this new connections are closed at once.
pub const MAX_SSH_CONNECTIONS: usize = 20_000;
/// Remote forwards one connection may hold.
pub const MAX_FORWARDS_PER_CONNECTION: usize = 16;
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

fn russh_config(host_key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        window_size: CHANNEL_WINDOW_SIZE,
        maximum_packet_size: MAX_PACKET_SIZE,
        max_auth_attempts: 6,
        nodelay: true,
        ..Default::default()
    }
}

/// What the SSH edge needs from the rest of the host.
pub struct SshEdge {
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
}

/// Time sessions get to close after being told the host is going away.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Accepts SSH connections until `stop`; sessions keep serving (requests in flight through
/// them finish) until `disconnect`, when each is told the host is going away. Returns once
/// they have closed, or [`SHUTDOWN_GRACE`] after `disconnect`.
pub async fn serve(
    listener: TcpListener,
    edge: Arc<SshEdge>,
    host_key: PrivateKey,
    mut stop: Stop,
    mut disconnect: Stop,
) {
    let config = Arc::new(russh_config(host_key));
    let slots = Arc::new(Semaphore::new(MAX_SSH_CONNECTIONS));
    let mut connections = JoinSet::new();
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
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "refusing ssh connection from {peer}: {MAX_SSH_CONNECTIONS} connections open"
            );
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (config, edge, disconnect) = (config.clone(), edge.clone(), disconnect.clone());
        connections.spawn(async move {
            run_connection(config, edge, socket, peer, disconnect).await;
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
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    mut disconnect: Stop,
) {
    let authenticated = Arc::new(AtomicBool::new(false));
    let handler = Connection::new(edge, peer, authenticated.clone());
    let started = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        russh::server::run_stream(config, socket, handler),
    )
    .await;
    let session = match started {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            tracing::debug!("ssh handshake with {peer} failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("ssh handshake with {peer} timed out");
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    let auth_deadline = tokio::time::sleep(AUTH_TIMEOUT);
    tokio::pin!(auth_deadline);
    let mut deadline_passed = false;
    loop {
        tokio::select! {
            result = &mut session => return log_session_end(peer, result),
            _ = &mut auth_deadline, if !deadline_passed => {
                deadline_passed = true;
                if !authenticated.load(Ordering::Acquire) {
                    tracing::debug!("ssh client {peer} did not authenticate in time");
                    let _ = handle
                        .disconnect(russh::Disconnect::ByApplication, "authentication timeout".into(), String::new())
                        .await;
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
                return log_session_end(peer, session.await);
            }
        }
    }
}

fn log_session_end(peer: SocketAddr, result: Result<(), russh::Error>) {
    match result {
        Ok(()) => tracing::debug!("ssh connection from {peer} closed"),
        Err(e) => tracing::debug!("ssh connection from {peer} ended: {e}"),
    }
}

/// A remote forward's way back to the client: a new `forwarded-tcpip` channel per stream,
/// echoing the address and port of the client's `tcpip-forward` so it matches its `-R`.
struct SshLink {
    handle: russh::server::Handle,
    bind_address: String,
    bind_port: u32,
}

#[async_trait]
impl TunnelLink for SshLink {
    async fn open_stream(&self, peer: SocketAddr) -> Result<Box<dyn UpstreamIo>, LinkError> {
        let channel = self
            .handle
            .channel_open_forwarded_tcpip(
                self.bind_address.clone(),
                self.bind_port,
                peer.ip().to_string(),
                u32::from(peer.port()),
            )
            .await
            .map_err(|e| LinkError(e.to_string()))?;
        Ok(Box::new(channel.into_stream()))
    }
}

/// One SSH connection's state. Dropped when the connection ends, which unregisters
/// its tunnels (only those it still serves).
struct Connection {
    id: SessionId,
    peer: SocketAddr,
    edge: Arc<SshEdge>,
    authenticated: Arc<AtomicBool>,
    key: Option<KeyIdentity>,
    /// The key's main name, resolved on first use.
    name: Option<TunnelName>,
    /// Names this connection registered, in request order.
    forwards: Vec<TunnelName>,
    output: SessionOutput,
    output_sink: Option<SessionOutputSink>,
    session_channel: Option<ChannelId>,
    /// The writing half of the session channel, for [`SessionOutputSink`].
    session_writer: Option<russh::ChannelWriteHalf<Msg>>,
    /// A terminal was requested, so output lines end in CRLF.
    pty: bool,
    /// The owner's options (`ssh … -- allow=…`), shared with this connection's tunnels.
    options: Arc<SessionOptions>,
}

impl Connection {
    fn new(edge: Arc<SshEdge>, peer: SocketAddr, authenticated: Arc<AtomicBool>) -> Self {
        let (output, sink) = SessionOutput::new();
        Connection {
            id: SessionId::next(),
            peer,
            edge,
            authenticated,
            key: None,
            name: None,
            forwards: Vec::new(),
            output,
            output_sink: Some(sink),
            session_channel: None,
            session_writer: None,
            pty: false,
            options: Arc::new(SessionOptions::default()),
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
            return finish_command(
                session,
                channel,
                "p0rt: options apply to this connection's tunnels, and it has none; \
                 add -R 80:localhost:<port>\n",
                1,
                self.pty,
            );
        }
        if let (Some(sink), Some(writer)) = (self.output_sink.take(), &self.session_writer) {
            self.output.line("Press Ctrl-C to close the tunnel.");
            tokio::spawn(sink.run(writer.make_writer(), self.pty));
        }
        Ok(())
    }

    fn refuse(&self, message: String) {
        tracing::info!(peer = %self.peer, "{message}");
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
        if self.forwards.len() >= MAX_FORWARDS_PER_CONNECTION {
            return Err(format!(
                "at most {MAX_FORWARDS_PER_CONNECTION} forwards per connection"
            ));
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
        let link = Arc::new(SshLink {
            handle,
            bind_address: address.to_string(),
            bind_port: port,
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
        for name in &self.forwards {
            if self.edge.tunnels.close(name, self.id) {
                tracing::info!("tunnel {name} down");
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
        Ok(if self.edge.access.allows(offer.public_key).await {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.edge.access.allows(key.public_key).await {
            return Ok(Auth::reject());
        }
        self.key = Some(KeyIdentity {
            hash: KeyHash::of_key(key.public_key),
            fingerprint: fingerprint(key.public_key),
        });
        self.authenticated.store(true, Ordering::Release);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.session_channel.is_some() {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        // Requests and input arrive through the handler, so the reading half is dropped
        // (its data counts as consumed at once); the writing half carries the output.
        self.session_channel = Some(channel.id());
        let (_input, output) = channel.split();
        self.session_writer = Some(output);
        reply.accept().await;
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
        self.pty = true;
        session.channel_success(channel)
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
                return finish_command(session, channel, &text, 1, self.pty);
            }
            text.push_str(&format!(
                "No tunnel requested. Start one with: ssh -p {} -R 80:localhost:3000 {}\n",
                self.edge.ssh_port, self.edge.domain
            ));
            return finish_command(session, channel, &text, 0, self.pty);
        }
        if let (Some(sink), Some(writer)) = (self.output_sink.take(), &self.session_writer) {
            self.output.line("Press Ctrl-C to close the tunnel.");
            tokio::spawn(sink.run(writer.make_writer(), self.pty));
        }
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
                return finish_command(
                    session,
                    channel,
                    &format!("p0rt: {problem}\n"),
                    1,
                    self.pty,
                );
            }
        };
        match command {
            Command::Info => {
                let (text, named) = self.info_text().await;
                finish_command(session, channel, &text, if named { 0 } else { 1 }, self.pty)
            }
            Command::Help => finish_command(session, channel, commands::HELP, 0, self.pty),
            Command::Token { revoke } => {
                let (text, status) = self.token_command(revoke).await;
                finish_command(session, channel, &text, status, self.pty)
            }
            Command::Scan { request, json } => {
                let (Some(key), Some(writer)) = (self.key.clone(), self.session_writer.take())
                else {
                    return finish_command(
                        session,
                        channel,
                        "p0rt: not available here\n",
                        1,
                        self.pty,
                    );
                };
                // Runs beside the session: a scan takes seconds, and the connection's other
                // events (keepalives, forwards) must not wait for it.
                tokio::spawn(commands::run_scan(
                    self.edge.scans.clone(),
                    self.edge.urls.clone(),
                    key.hash,
                    request,
                    json,
                    self.pty,
                    writer,
                ));
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
        if Some(channel) == self.session_channel && data.iter().any(|b| *b == 3 || *b == 4) {
            return finish_command(
                session,
                channel,
                "p0rt: closing tunnels, bye\n",
                0,
                self.pty,
            );
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
