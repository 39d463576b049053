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

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use super::options::SessionOptions;
use super::output::SessionOutput;
use crate::names::{KeyHash, TunnelName};

/// Identifies one SSH connection for the lifetime of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(u64);

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

impl SessionId {
    /// A fresh, never reused session id.
    pub fn next() -> SessionId {
        SessionId(NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed))
    }
}

/// A byte stream to a tunnel client's local service.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> UpstreamIo for T {}

/// The tunnel client refused or failed to open a stream to its local service.
#[derive(Debug, thiserror::Error)]
#[error("the tunnel client refused the connection ({0})")]
pub struct LinkError(pub String);

/// How a tunnel reaches its client's local service: over SSH, a new `forwarded-tcpip`
/// channel per stream (see [`crate::ssh`]).
#[async_trait]
pub trait TunnelLink: Send + Sync {
    /// Opens a stream to the local service, as if `peer` had connected to the forwarded port.
    async fn open_stream(&self, peer: SocketAddr) -> Result<Box<dyn UpstreamIo>, LinkError>;
    /// The tunnel client's address (the SSH peer), for the operator's views.
    fn client_addr(&self) -> Option<SocketAddr> {
        None
    }
    /// Ends the tunnel client's connection (the operator's disconnect), telling it `reason`.
    async fn disconnect(&self, _reason: &str) {}
}

/// Live counters of one tunnel (the admin API, the console, `ssh … stats`): cheap relaxed
/// atomics bumped by the HTTP edge.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Requests that reached the tunnel (whatever their outcome).
    pub requests: AtomicU64,
    /// Body bytes sent to the visitors (responses).
    pub bytes_out: AtomicU64,
    /// Body bytes received from the visitors (requests).
    pub bytes_in: AtomicU64,
}

/// One live tunnel: a name served by one SSH session's remote forward.
pub struct Tunnel {
    pub name: TunnelName,
    pub session: SessionId,
    /// The key that owns the name.
    pub owner: KeyHash,
    pub link: Arc<dyn TunnelLink>,
    pub output: SessionOutput,
    /// The owner's options for this connection's tunnels.
    pub options: Arc<SessionOptions>,
    pub opened: std::time::Instant,
    /// HTTP requests in flight to this tunnel (the HTTP edge caps it).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The owner key's `SHA256:…` fingerprint (empty when not known).
    pub fingerprint: String,
    /// When it opened, Unix seconds.
    pub since: i64,
    pub stats: Arc<TunnelStats>,
}

impl Tunnel {
    pub fn new(
        name: TunnelName,
        session: SessionId,
        owner: KeyHash,
        link: Arc<dyn TunnelLink>,
        output: SessionOutput,
        options: Arc<SessionOptions>,
    ) -> Tunnel {
        Tunnel {
            name,
            session,
            owner,
            link,
            output,
            options,
            opened: std::time::Instant::now(),
            in_flight: Arc::default(),
            fingerprint: String::new(),
            since: crate::unix_now(),
            stats: Arc::default(),
        }
    }

    /// The same tunnel, owned by the key with this `SHA256:…` fingerprint.
    pub fn with_fingerprint(mut self, fingerprint: &str) -> Tunnel {
        self.fingerprint = fingerprint.to_string();
        self
    }

    /// The owner key's tier in the operator's key list, for the request policies.
    pub fn tier(&self) -> Option<&str> {
        self.options.tier()
    }
}

/// Live tunnels by name.
#[derive(Default)]
pub struct Registry {
    tunnels: RwLock<HashMap<TunnelName, Arc<Tunnel>>>,
    /// Live tunnels per owner; changed only under the `tunnels` write lock.
    per_owner: Mutex<HashMap<KeyHash, usize>>,
}

/// Why [`Registry::register`] refused a tunnel; nothing changed.
pub enum Refused {
    /// Another key serves the name; its tunnel.
    Taken(Arc<Tunnel>),
    /// The owner already serves the most tunnels it may.
    OwnerFull,
}

impl Registry {
    /// Serves `tunnel.name` with `tunnel` from now on and returns the tunnel it displaced
    /// (a reconnect of the same key, which does not count as another tunnel of the key). A
    /// live tunnel of another key is never displaced, and an owner serving `max_per_owner`
    /// names gets no new one: `Err` says which, and nothing changes.
    pub fn register(
        &self,
        tunnel: Arc<Tunnel>,
        max_per_owner: usize,
    ) -> Result<Option<Arc<Tunnel>>, Refused> {
        let mut map = self.write();
        match map.get(&tunnel.name) {
            Some(current) if current.owner != tunnel.owner => {
                return Err(Refused::Taken(current.clone()));
            }
            Some(_) => {}
            None => {
                let mut per_owner = self.owners();
                let count = per_owner.entry(tunnel.owner.clone()).or_insert(0);
                if *count >= max_per_owner {
                    if *count == 0 {
                        per_owner.remove(&tunnel.owner);
                    }
                    return Err(Refused::OwnerFull);
                }
                *count += 1;
            }
        }
        Ok(map.insert(tunnel.name.clone(), tunnel))
    }

    /// Removes `name` only if `session` still serves it.
    pub fn unregister(&self, name: &TunnelName, session: SessionId) -> bool {
        let mut map = self.write();
        match map.get(name) {
            Some(t) if t.session == session => {
                let owner = t.owner.clone();
                map.remove(name);
                let mut per_owner = self.owners();
                if let Some(count) = per_owner.get_mut(&owner) {
                    *count -= 1;
                    if *count == 0 {
                        per_owner.remove(&owner);
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Names `owner` serves now.
    pub fn count_of(&self, owner: &KeyHash) -> usize {
        self.owners().get(owner).copied().unwrap_or(0)
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<KeyHash, usize>> {
        self.per_owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Tunnel>> {
        let map = self.tunnels.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned()
    }

    /// Every live tunnel (shutdown, status).
    pub fn all(&self) -> Vec<Arc<Tunnel>> {
        let map = self.tunnels.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TunnelName, Arc<Tunnel>>> {
        self.tunnels.write().unwrap_or_else(|p| p.into_inner())
    }
}
