//! The registry of live tunnels: which SSH session currently serves which name.
//!
//! Routing is in memory only. A new session of the same key replaces the entry for a name
//! in one step ([`Registry::register`]); the old session's cleanup removes an entry only
//! if it is still its own ([`Registry::unregister`]), so a late cleanup never drops the new
//! tunnel. This is the fix for the "stale name locked after reconnect" problem.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Idle upstream HTTP connections kept per tunnel for reuse across requests.
pub const MAX_IDLE_UPSTREAMS_PER_TUNNEL: usize = 32;
/// Lines queued for a session's terminal; beyond this, lines are dropped rather than
/// letting a client that does not read slow the HTTP edge down.
pub const SESSION_OUTPUT_QUEUE: usize = 256;

/// Identifies one SSH connection for the lifetime of the process.
pub type SessionId = u64;

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh, never reused session id.
pub fn next_session_id() -> SessionId {
    NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed)
}

/// Text lines for an SSH session's terminal (the URL banner, one line per request).
/// Lines sent before the client opens its session channel are kept and shown when it does.
#[derive(Clone)]
pub struct SessionOutput {
    tx: mpsc::Sender<String>,
}

impl SessionOutput {
    /// Creates the output and the task that writes it to the session channel once attached.
    pub fn new() -> (SessionOutput, SessionOutputSink) {
        let (tx, rx) = mpsc::channel(SESSION_OUTPUT_QUEUE);
        (SessionOutput { tx }, SessionOutputSink { rx })
    }

    /// Queues a line; never waits (a full queue drops the line).
    pub fn line(&self, text: impl Into<String>) {
        let _ = self.tx.try_send(text.into());
    }
}

/// The receiving end of [`SessionOutput`]; [`SessionOutputSink::run`] writes to the terminal.
pub struct SessionOutputSink {
    rx: mpsc::Receiver<String>,
}

impl SessionOutputSink {
    /// Writes queued lines to the session channel's `terminal` until the session ends.
    /// `crlf`: the client has a terminal, which needs `\r\n` line ends. The writer waits for
    /// the channel's SSH window, so a client that stops reading its terminal only fills this
    /// queue (and loses lines), never the SSH session's shared outbound buffer.
    pub async fn run(mut self, mut terminal: impl AsyncWrite + Unpin, crlf: bool) {
        while let Some(line) = self.rx.recv().await {
            let mut text = if crlf {
                line.replace('\n', "\r\n")
            } else {
                line
            };
            text.push_str(if crlf { "\r\n" } else { "\n" });
            if terminal.write_all(text.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// One live tunnel: a name served by one SSH session's remote forward.
pub struct Tunnel {
    pub name: String,
    pub session_id: SessionId,
    /// Hash of the key that owns the name.
    pub owner: String,
    pub handle: russh::server::Handle,
    /// The address and port of the client's `tcpip-forward` request, echoed back when
    /// opening `forwarded-tcpip` channels so the client matches them to its `-R`.
    pub bind_address: String,
    pub bind_port: u32,
    pub output: SessionOutput,
    idle: Mutex<Vec<SendRequest<Incoming>>>,
}

impl Tunnel {
    pub fn new(
        name: String,
        session_id: SessionId,
        owner: String,
        handle: russh::server::Handle,
        bind_address: String,
        bind_port: u32,
        output: SessionOutput,
    ) -> Tunnel {
        Tunnel {
            name,
            session_id,
            owner,
            handle,
            bind_address,
            bind_port,
            output,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An upstream connection ready for a request, if one is idle.
    pub fn take_idle(&self) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|s| !s.is_closed());
        let ready = idle.iter().position(|s| s.is_ready())?;
        Some(idle.swap_remove(ready))
    }

    /// Returns an upstream connection for reuse. A connection still streaming its last
    /// response is kept too: it becomes ready once that response ends.
    pub fn put_idle(&self, sender: SendRequest<Incoming>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_UPSTREAMS_PER_TUNNEL && !sender.is_closed() {
            idle.push(sender);
        }
    }

    /// Opens a `forwarded-tcpip` channel to the client, as if `peer` had connected to its
    /// remote-forwarded port.
    pub async fn open_channel(
        &self,
        peer: SocketAddr,
    ) -> Result<russh::Channel<russh::server::Msg>, russh::Error> {
        self.handle
            .channel_open_forwarded_tcpip(
                self.bind_address.clone(),
                self.bind_port,
                peer.ip().to_string(),
                u32::from(peer.port()),
            )
            .await
    }
}

/// Live tunnels by name.
#[derive(Default)]
pub struct Registry {
    tunnels: RwLock<HashMap<String, Arc<Tunnel>>>,
}

impl Registry {
    /// Serves `tunnel.name` with `tunnel` from now on and returns the tunnel it displaced
    /// (a reconnect of the same key). A live tunnel of another key is never displaced:
    /// `Err` returns it and nothing changes.
    pub fn register(&self, tunnel: Arc<Tunnel>) -> Result<Option<Arc<Tunnel>>, Arc<Tunnel>> {
        let mut map = self.write();
        if let Some(current) = map.get(&tunnel.name)
            && current.owner != tunnel.owner
        {
            return Err(current.clone());
        }
        Ok(map.insert(tunnel.name.clone(), tunnel))
    }

    /// Removes `name` only if `session_id` still serves it.
    pub fn unregister(&self, name: &str, session_id: SessionId) -> bool {
        let mut map = self.write();
        match map.get(name) {
            Some(t) if t.session_id == session_id => {
                map.remove(name);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Tunnel>> {
        self.tunnels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Tunnel>>> {
        self.tunnels.write().unwrap_or_else(|p| p.into_inner())
    }
}
