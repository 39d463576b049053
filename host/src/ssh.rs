//! The SSH edge: stock OpenSSH clients connect with a public key and ask for `-R 80:…`.
//!
//! Everything not needed for a reverse HTTP tunnel is refused: password and
//! keyboard-interactive auth, `-L`/`-D` (`direct-tcpip`), streamlocal, X11, agent forwarding,
//! subsystems. A remote forward to port 80 or 443 serves the key's name; `-R label:80:…`
//! serves `label-<name>`. `ssh … info` prints the key's name without forwarding anything.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::HostKeySource;
use crate::naming::{self, fingerprint, key_hash};
use crate::server::AppState;
use crate::tunnels::{SessionId, SessionOutput, SessionOutputSink, Tunnel, next_session_id};

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

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error(
        "cannot load SSH host key {path}: {detail}. Fix or remove the file \
         (a new key is generated only when none exists)"
    )]
    Load { path: String, detail: String },
    #[error("cannot write new SSH host key {path}: {detail}")]
    Write { path: String, detail: String },
    #[error("SSH_HOST_KEY holds key text that cannot be parsed: {0}")]
    Inline(String),
}

/// Loads the host key, generating an ed25519 key once if the file does not exist.
/// An existing file that cannot be read is an error, never silently replaced.
pub fn load_or_create_host_key(source: &HostKeySource) -> Result<PrivateKey, HostKeyError> {
    match source {
        HostKeySource::Inline(text) => {
            PrivateKey::from_openssh(text.expose()).map_err(|e| HostKeyError::Inline(e.to_string()))
        }
        HostKeySource::File(path) if path.exists() => {
            let key = russh::keys::load_secret_key(path, None).map_err(|e| HostKeyError::Load {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
            tracing::info!(
                "loaded SSH host key {} ({})",
                path.display(),
                key.public_key().fingerprint(russh::keys::HashAlg::Sha256)
            );
            Ok(key)
        }
        HostKeySource::File(path) => generate_host_key(path),
    }
}

fn generate_host_key(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let err = |detail: String| HostKeyError::Write {
        path: path.display().to_string(),
        detail,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let seed: [u8; 32] = rand::random();
    let keypair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(keypair);
    key.write_openssh_file(path, russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| err(e.to_string()))?;
    tracing::info!(
        "generated SSH host key {} ({}); it is reused on every start",
        path.display(),
        key.public_key().fingerprint(russh::keys::HashAlg::Sha256)
    );
    Ok(key)
}

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

/// Accepts SSH connections until the listener fails for good.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, host_key: PrivateKey) {
    let config = Arc::new(russh_config(host_key));
    let slots = Arc::new(Semaphore::new(MAX_SSH_CONNECTIONS));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!("ssh accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "refusing ssh connection from {peer}: {MAX_SSH_CONNECTIONS} connections open"
            );
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (config, state) = (config.clone(), state.clone());
        tokio::spawn(async move {
            run_connection(config, state, socket, peer).await;
            drop(slot);
        });
    }
}

async fn run_connection(
    config: Arc<russh::server::Config>,
    state: Arc<AppState>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let authenticated = Arc::new(AtomicBool::new(false));
    let handler = Connection::new(state, peer, authenticated.clone());
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
    tokio::select! {
        result = &mut session => log_session_end(peer, result),
        _ = tokio::time::sleep(AUTH_TIMEOUT) => {
            if !authenticated.load(Ordering::Acquire) {
                tracing::debug!("ssh client {peer} did not authenticate in time");
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, "authentication timeout".into(), String::new())
                    .await;
            }
            log_session_end(peer, session.await);
        }
    }
}

fn log_session_end(peer: SocketAddr, result: Result<(), russh::Error>) {
    match result {
        Ok(()) => tracing::debug!("ssh connection from {peer} closed"),
        Err(e) => tracing::debug!("ssh connection from {peer} ended: {e}"),
    }
}

struct AuthedKey {
    hash: String,
    fingerprint: String,
}

/// One SSH connection's state. Dropped when the connection ends, which unregisters
/// its tunnels (only those it still serves).
struct Connection {
    id: SessionId,
    peer: SocketAddr,
    state: Arc<AppState>,
    authenticated: Arc<AtomicBool>,
    key: Option<AuthedKey>,
    /// The key's main name, resolved on first use.
    name: Option<String>,
    /// Names this connection registered, in request order.
    forwards: Vec<String>,
    output: SessionOutput,
    output_sink: Option<SessionOutputSink>,
    session_channel: Option<ChannelId>,
    /// The writing half of the session channel, for [`SessionOutputSink`].
    session_writer: Option<russh::ChannelWriteHalf<Msg>>,
    /// A terminal was requested, so output lines end in CRLF.
    pty: bool,
}

impl Connection {
    fn new(state: Arc<AppState>, peer: SocketAddr, authenticated: Arc<AtomicBool>) -> Self {
        let (output, sink) = SessionOutput::new();
        Connection {
            id: next_session_id(),
            peer,
            state,
            authenticated,
            key: None,
            name: None,
            forwards: Vec::new(),
            output,
            output_sink: Some(sink),
            session_channel: None,
            session_writer: None,
            pty: false,
        }
    }

    fn key_allowed(&self, key: &russh::keys::PublicKey) -> bool {
        let Some(path) = &self.state.config.authorized_keys else {
            return true;
        };
        // Re-read on every attempt so keys added by the operator work without a restart.
        match russh::keys::ssh_key::AuthorizedKeys::read_file(path) {
            Ok(entries) => entries
                .iter()
                .any(|entry| entry.public_key().key_data() == key.key_data()),
            Err(e) => {
                tracing::error!(
                    "cannot read authorized keys file {}: {e}; refusing all keys until fixed",
                    path.display()
                );
                false
            }
        }
    }

    /// The key's main name, assigned (and noted in the store) on first use.
    async fn main_name(&mut self) -> Result<String, String> {
        if let Some(name) = &self.name {
            return Ok(name.clone());
        }
        let Some(key) = &self.key else {
            return Err("not authenticated".into());
        };
        let name = naming::assign_name(
            self.state.store.as_ref(),
            Some(&self.state.plugins),
            &key.hash,
            &key.fingerprint,
            crate::unix_now(),
        )
        .await
        .map_err(|e| {
            tracing::error!("naming key {} failed: {e}", key.fingerprint);
            e.to_string()
        })?;
        self.name = Some(name.clone());
        Ok(name)
    }

    fn url(&self, name: &str) -> String {
        self.state.config.public_url(name, self.state.http_port)
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
                    self.url(&name)
                ),
                true,
            ),
            Err(e) => (
                format!("p0rt: no name available for key {fingerprint}: {e}\n"),
                false,
            ),
        }
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
        if !HTTP_FORWARD_PORTS.contains(&port) {
            self.refuse(format!(
                "refused -R {port}: only remote ports 80 and 443 are served (HTTP tunnels); \
                 use -R 80:localhost:<your port>"
            ));
            return false;
        }
        if self.forwards.len() >= MAX_FORWARDS_PER_CONNECTION {
            self.refuse(format!(
                "refused -R {address}:{port}: at most {MAX_FORWARDS_PER_CONNECTION} forwards per connection"
            ));
            return false;
        }
        let label = match naming::subname_label(address) {
            Ok(label) => label,
            Err(problem) => {
                self.refuse(format!("refused -R {address}:{port}: {problem}"));
                return false;
            }
        };
        let base = match self.main_name().await {
            Ok(name) => name,
            Err(problem) => {
                self.refuse(format!("refused -R {port}: {problem}"));
                return false;
            }
        };
        let owner = self
            .key
            .as_ref()
            .map(|k| k.hash.clone())
            .unwrap_or_default();
        let name = match label {
            None => base,
            Some(label) => {
                let fingerprint = self
                    .key
                    .as_ref()
                    .map(|k| k.fingerprint.clone())
                    .unwrap_or_default();
                if let Err(problem) =
                    naming::approve_label(&self.state.plugins, &owner, &fingerprint, &label).await
                {
                    self.refuse(format!("refused -R {address}:{port}: {problem}"));
                    return false;
                }
                format!("{label}-{base}")
            }
        };
        // A sub-name must never shadow another key's main name.
        match self.state.store.owner_of(&name).await {
            Ok(Some(other)) if other != owner => {
                self.refuse(format!(
                    "refused -R {address}:{port}: {name} belongs to another key"
                ));
                return false;
            }
            Ok(_) => {}
            Err(e) => {
                self.refuse(format!(
                    "refused -R {address}:{port}: domain store unavailable ({e})"
                ));
                return false;
            }
        }
        let tunnel = Arc::new(Tunnel::new(
            name.clone(),
            self.id,
            owner,
            handle,
            address.to_string(),
            port,
            self.output.clone(),
        ));
        match self.state.registry.register(tunnel) {
            Ok(Some(old)) if old.session_id != self.id => {
                tracing::info!("{name}: taken over by a new connection from {}", self.peer);
                old.output.line(format!(
                    "p0rt: {name} is now served by a newer connection of this key"
                ));
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("{name}: refused for {}, another key serves it", self.peer);
                self.refuse(format!(
                    "refused -R {address}:{port}: {name} is served by another key"
                ));
                return false;
            }
        }
        if !self.forwards.contains(&name) {
            self.forwards.push(name.clone());
        }
        tracing::info!(peer = %self.peer, "tunnel {name} up");
        self.output
            .line(format!("Forwarding {} -> your -R target", self.url(&name)));
        true
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for name in &self.forwards {
            if self.state.registry.unregister(name, self.id) {
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
        Ok(if self.key_allowed(offer.public_key) {
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
        if !self.key_allowed(key.public_key) {
            return Ok(Auth::reject());
        }
        self.key = Some(AuthedKey {
            hash: key_hash(key.public_key),
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
        if self.forwards.is_empty() {
            // Nothing to keep open for: show who the key is and how to start a tunnel.
            let (mut text, named) = self.info_text().await;
            if !named {
                return finish_command(session, channel, &text, 1, self.pty);
            }
            text.push_str(&format!(
                "No tunnel requested. Start one with: ssh -p {} -R 80:localhost:3000 {}\n",
                self.state.ssh_port, self.state.config.domain
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
        match command.trim() {
            "info" => {
                let (text, named) = self.info_text().await;
                finish_command(session, channel, &text, if named { 0 } else { 1 }, self.pty)
            }
            other => {
                let text = format!("p0rt: unknown command {other:?}; the only command is `info`\n");
                finish_command(session, channel, &text, 1, self.pty)
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
        let (Ok(label), Some(base)) = (naming::subname_label(address), self.name.clone()) else {
            return Ok(false);
        };
        let name = match label {
            Some(label) => format!("{label}-{base}"),
            None => base,
        };
        let removed = self.state.registry.unregister(&name, self.id);
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
