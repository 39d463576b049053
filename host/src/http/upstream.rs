//! Phase 3, pick upstream: an idle HTTP/1.1 connection to the tunnel's local service, or a
//! new one over a fresh `forwarded-tcpip` channel.
//!
//! Idle connections are kept per tunnel *session*: a reconnect of the same name gets a new
//! [`SessionId`], so it never reuses channels of the session it replaced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use super::Body;
use crate::names::TunnelName;
use crate::tunnels::{LinkError, SessionId, Tunnel};

/// Time allowed to open a channel through the SSH client to its local service.
pub const CHANNEL_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream HTTP connections kept per tunnel for reuse across requests, unless the pool is
/// built with another cap. The host passes the tunnel's in-flight cap
/// (`http.limits.max_in_flight_per_tunnel`): a smaller pool makes a tunnel busier than the
/// pool close a connection after every surplus response and open a new SSH channel (a round
/// trip to the client and a new TCP connection to its service) for the next request; at 32,
/// 64 concurrent visitors served fewer requests/s than 16.
pub const MAX_IDLE_UPSTREAMS_PER_TUNNEL: usize = 32;
/// An upstream connection unused this long is closed, so a quiet tunnel holds no channels.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections per tunnel kept for the whole [`UPSTREAM_IDLE_TIMEOUT`]: the most
/// recently used ones, enough for a browser's parallel requests after a pause.
pub const UPSTREAM_IDLE_KEEP: usize = 4;
/// An idle connection beyond the [`UPSTREAM_IDLE_KEEP`] most recently used is closed once
/// unused this long. Every open channel costs the tunnel's SSH client on each turn of its
/// event loop (OpenSSH polls every channel's socket): 64 channels left from a burst made the
/// client's CPU per request at one visitor 3.4× what one channel costs (38 → 129 µs).
pub const UPSTREAM_SURPLUS_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why no upstream connection could be had. The tunnel's side is at fault in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the tunnel client did not open a channel within {CHANNEL_OPEN_TIMEOUT:?}")]
    Timeout,
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("HTTP/1.1 handshake with the local service failed")]
    Handshake(#[source] hyper::Error),
}

struct Idle {
    sender: SendRequest<Body>,
    /// Since when it has had nothing to do.
    since: Instant,
}

/// Idle connections of one name served by a session, least recently used first: a request
/// takes the most recently used ready one, so a burst's surplus sits at the front, unused,
/// until it is closed.
struct Named {
    name: TunnelName,
    idle: Vec<Idle>,
}

/// By session, then name (a session serves one name, or a few with sub-names). Looked up
/// twice per request (take, put): by a number hashed with foldhash, not SipHash, and
/// without building a key (a name would be cloned for every lookup).
type Sessions = HashMap<SessionId, Vec<Named>, foldhash::fast::RandomState>;
type IdleMap = Mutex<Sessions>;

/// Idle upstream connections of every live tunnel. A sweeper closes those idle longer than
/// the pool's timeout; it stops when the pool is dropped.
pub struct UpstreamPool {
    idle: Arc<IdleMap>,
    sweeper: JoinHandle<()>,
    /// Connections kept per tunnel session.
    max_per_tunnel: usize,
}

impl UpstreamPool {
    /// A pool whose idle connections are closed after `idle_timeout`, keeping up to
    /// [`MAX_IDLE_UPSTREAMS_PER_TUNNEL`] per tunnel. Needs a tokio runtime.
    pub fn new(idle_timeout: Duration) -> UpstreamPool {
        UpstreamPool::with_max_per_tunnel(idle_timeout, MAX_IDLE_UPSTREAMS_PER_TUNNEL)
    }

    /// The same pool keeping up to `max_per_tunnel` connections per tunnel (at least one).
    pub fn with_max_per_tunnel(idle_timeout: Duration, max_per_tunnel: usize) -> UpstreamPool {
        let idle = Arc::new(IdleMap::default());
        let sweeper = tokio::spawn({
            let idle = idle.clone();
            // Checking four times per timeout closes a connection within 1.25 × the timeout.
            let mut ticks = tokio::time::interval(idle_timeout / 4);
            async move {
                loop {
                    ticks.tick().await;
                    sweep(&idle, idle_timeout, Instant::now());
                }
            }
        });
        UpstreamPool {
            idle,
            sweeper,
            max_per_tunnel: max_per_tunnel.max(1),
        }
    }

    /// A connection ready for a request: an idle one of this tunnel session if `reuse`,
    /// else a new one.
    pub async fn checkout(
        &self,
        tunnel: &Tunnel,
        peer: SocketAddr,
        reuse: bool,
    ) -> Result<SendRequest<Body>, UpstreamError> {
        if reuse && let Some(sender) = self.take(tunnel) {
            return Ok(sender);
        }
        connect(tunnel, peer).await
    }

    /// Keeps a connection for reuse. One still streaming its last response is kept too: it
    /// becomes ready once that response ends.
    pub fn put(&self, tunnel: &Tunnel, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        let names = idle.entry(tunnel.session).or_default();
        let list = match names.iter().position(|n| n.name == tunnel.name) {
            Some(i) => &mut names[i].idle,
            None => {
                names.push(Named {
                    name: tunnel.name.clone(),
                    idle: Vec::new(),
                });
                &mut names.last_mut().expect("just pushed").idle
            }
        };
        let now = Instant::now();
        if list.len() < self.max_per_tunnel {
            list.push(Idle { sender, since: now });
        }
        // While the tunnel is busy, a burst's surplus closes here, within a request of
        // passing its timeout; the sweeper closes it on a quiet tunnel.
        while list.len() > UPSTREAM_IDLE_KEEP
            && list[0].sender.is_ready()
            && now.duration_since(list[0].since) >= UPSTREAM_SURPLUS_IDLE_TIMEOUT
        {
            list.remove(0);
        }
    }

    /// Idle connections held for `tunnel` (tests).
    #[cfg(test)]
    pub fn idle_count(&self, tunnel: &Tunnel) -> usize {
        lock(&self.idle)
            .get(&tunnel.session)
            .and_then(|names| names.iter().find(|n| n.name == tunnel.name))
            .map_or(0, |n| n.idle.len())
    }

    fn take(&self, tunnel: &Tunnel) -> Option<SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        let names = idle.get_mut(&tunnel.session)?;
        let list = &mut names.iter_mut().find(|n| n.name == tunnel.name)?.idle;
        list.retain(|i| !i.sender.is_closed());
        let ready = list.iter().rposition(|i| i.sender.is_ready())?;
        Some(list.remove(ready).sender)
    }
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

fn lock(idle: &IdleMap) -> std::sync::MutexGuard<'_, Sessions> {
    idle.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops closed connections and idle ones unused for too long: `timeout` for the
/// [`UPSTREAM_IDLE_KEEP`] most recently used of a name, [`UPSTREAM_SURPLUS_IDLE_TIMEOUT`]
/// for the others. Dropping the last handle of a connection closes it (and its SSH
/// channel). One still busy with a response restarts its idle clock.
fn sweep(idle: &IdleMap, timeout: Duration, now: Instant) {
    let mut idle = lock(idle);
    idle.retain(|_, names| {
        names.retain_mut(|named| {
            let surplus = named.idle.len().saturating_sub(UPSTREAM_IDLE_KEEP);
            let mut index = 0;
            named.idle.retain_mut(|i| {
                let limit = if index < surplus {
                    UPSTREAM_SURPLUS_IDLE_TIMEOUT
                } else {
                    timeout
                };
                index += 1;
                if !i.sender.is_ready() {
                    i.since = now;
                }
                !i.sender.is_closed() && now.duration_since(i.since) < limit
            });
            !named.idle.is_empty()
        });
        !names.is_empty()
    });
}

/// Opens a fresh upstream HTTP/1.1 connection over a new `forwarded-tcpip` channel.
async fn connect(tunnel: &Tunnel, peer: SocketAddr) -> Result<SendRequest<Body>, UpstreamError> {
    let io = tokio::time::timeout(CHANNEL_OPEN_TIMEOUT, tunnel.link.open_stream(peer))
        .await
        .map_err(|_| UpstreamError::Timeout)??;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    let name = tunnel.name.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("upstream connection of {name} ended: {e}");
        }
    });
    Ok(sender)
}
