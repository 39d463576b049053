//! Scale-out: several hosts on one Redis serve every tunnel, whichever host the client
//! reached. Redis is the only shared engine:
//!
//! - [`leases`]: where each tunnel is served (name → host, internal address, session, owner),
//!   with a lease the serving host renews; a dead host's records expire within the lease.
//! - [`hosts`]: the hosts alive now (`/status/cluster`).
//! - [`takeover`]: a key reconnecting to another host takes its names over at once.
//! - [`auth`]: requests between hosts are signed with the shared secret.
//! - [`client`]: pooled connections to the other hosts' internal listeners.
//!
//! The HTTP edge forwards a request for a name served elsewhere to that host's internal
//! listener (`crate::http::peer`), which serves it from its own tunnels only, so a request
//! is forwarded at most once.

pub mod auth;
pub mod client;
pub mod hosts;
pub mod leases;
pub mod settings;
pub mod takeover;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::net::TcpListener;

use crate::names::{KeyHash, TunnelName};
use crate::redis_link::RedisLink;
use crate::tunnels::{Placement, RemoteTunnel, SessionId, Tunnel, TunnelService};
use settings::ClusterConfig;

/// Lease writes in flight at once during a renewal round.
const RENEW_CONCURRENCY: usize = 32;

/// Why clustering could not start. The operator's settings are at fault.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("clustering needs Redis (cluster.enabled): set STORAGE_TYPE=redis and REDIS_URL")]
    NoRedis,
    #[error("cannot listen for other hosts on {addr} (cluster.listen / CLUSTER_LISTEN): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A name this host serves, as written to Redis.
struct Held {
    session: SessionId,
    owner: KeyHash,
    /// The record's exact text: renewals and the final delete compare against it.
    record: String,
}

/// This host's part in the cluster.
pub struct Cluster {
    id: String,
    advertise: String,
    lease: std::time::Duration,
    signer: auth::Signer,
    link: Arc<RedisLink>,
    prefix: String,
    held: Mutex<HashMap<TunnelName, Held>>,
    tunnels: Weak<TunnelService>,
    /// Connections to the other hosts' internal listeners.
    pub peers: client::PeerClient,
    since: i64,
    /// Wakes the renewal loop early (after Redis came back).
    renew_now: tokio::sync::Notify,
}

/// A started cluster and its internal listener, for the HTTP edge to serve.
pub struct Started {
    pub cluster: Arc<Cluster>,
    pub listener: TcpListener,
}

/// Binds the internal listener and joins the cluster, when `cluster.enabled`; the tunnel
/// service reports its tunnels to it from now on. Background work starts with
/// [`Cluster::spawn`].
pub async fn start(
    config: &ClusterConfig,
    link: Option<&Arc<RedisLink>>,
    prefix: &str,
    tunnels: &Arc<TunnelService>,
) -> Result<Option<Started>, ClusterError> {
    if !config.enabled {
        return Ok(None);
    }
    let link = link.ok_or(ClusterError::NoRedis)?;
    let listener = crate::listen::listen(config.listen).map_err(|source| ClusterError::Bind {
        addr: config.listen,
        source,
    })?;
    let bound = listener.local_addr().map_err(|source| ClusterError::Bind {
        addr: config.listen,
        source,
    })?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());
    let secret = config.secret.as_ref().map(|s| s.expose()).unwrap_or("");
    let cluster = Arc::new(Cluster {
        id: config.host_id().to_string(),
        advertise,
        lease: config.lease,
        signer: auth::Signer::new(secret),
        link: link.clone(),
        prefix: prefix.to_string(),
        held: Mutex::default(),
        tunnels: Arc::downgrade(tunnels),
        peers: client::new_client(),
        since: crate::unix_now(),
        renew_now: tokio::sync::Notify::new(),
    });
    tracing::info!(
        "cluster: host id {} on {} (internal listener {bound}), leases {} s in {}",
        cluster.id,
        cluster.advertise,
        cluster.lease.as_secs(),
        link.display
    );
    cluster.warn_if_id_taken().await;
    tunnels.set_placement(cluster.clone());
    Ok(Some(Started { cluster, listener }))
}

impl Cluster {
    pub fn host_id(&self) -> &str {
        &self.id
    }

    pub fn signer(&self) -> &auth::Signer {
        &self.signer
    }

    /// Two live hosts with one id would ignore each other's tunnels: say so at start.
    async fn warn_if_id_taken(&self) {
        let key = hosts::key(&self.prefix, &self.id);
        let found: Result<Option<String>, _> = self
            .link
            .query(redis::cmd("GET").arg(&key), leases::LOCATE_TIMEOUT)
            .await;
        let other = found
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_str::<hosts::HostRecord>(&v).ok())
            .filter(|record| record.advertise != self.advertise);
        if let Some(other) = other {
            tracing::warn!(
                "cluster: another host with id {} ({}) was alive within the lease; two live \
                 hosts with one id do not forward to each other: give each its own \
                 CLUSTER_HOST_ID (or none: the default is random)",
                self.id,
                other.advertise
            );
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<TunnelName, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the lease renewals, the host record and the takeover subscription until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: crate::shutdown::Stop) {
        let cluster = self.clone();
        let mut renewal_stop = stop.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(cluster.lease / 3);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = cluster.renew_now.notified() => {}
                    _ = renewal_stop.stopped() => return,
                }
                cluster.renew_all().await;
            }
        });
        let (on_subscribed, on_takeover) = (self.clone(), self.clone());
        tokio::spawn(takeover::listen(
            self.link.clone(),
            self.prefix.clone(),
            stop,
            move || on_subscribed.renew_now.notify_one(),
            move |t| on_takeover.taken_over(t),
        ));
    }

    /// One renewal round: this host's record and every lease it holds. A lease another
    /// host holds now means the name was taken over (a missed takeover message): let go.
    async fn renew_all(self: &Arc<Self>) {
        let record = hosts::HostRecord {
            id: self.id.clone(),
            advertise: self.advertise.clone(),
            tunnels: self.held().len(),
            since: self.since,
        };
        if let Err(e) = hosts::heartbeat(&self.link, &self.prefix, &record, self.lease).await {
            tracing::warn!("cluster: cannot renew this host's record: {e}");
        }
        let held: Vec<(TunnelName, String, KeyHash)> = self
            .held()
            .iter()
            .map(|(name, h)| (name.clone(), h.record.clone(), h.owner.clone()))
            .collect();
        let results: Vec<_> = futures_util::stream::iter(held)
            .map(|(name, record, owner)| async move {
                let key = leases::key(&self.prefix, name.as_str());
                let outcome = leases::renew(&self.link, &key, &record, self.lease).await;
                (name, record, owner, outcome)
            })
            .buffer_unordered(RENEW_CONCURRENCY)
            .collect()
            .await;
        for (name, record, owner, outcome) in results {
            match outcome {
                Ok(leases::Renewal::Renewed) => {}
                Ok(leases::Renewal::Rewritten) => {
                    tracing::info!("cluster: {name}: location record was gone; written again")
                }
                Ok(leases::Renewal::Lost) => {
                    let mine = {
                        let mut held = self.held();
                        let mine = held.get(&name).is_some_and(|h| h.record == record);
                        if mine {
                            held.remove(&name);
                        }
                        mine
                    };
                    if mine {
                        self.let_go(name.as_str(), &owner, "another host");
                    }
                }
                Err(e) => tracing::warn!("cluster: cannot renew the lease of {name}: {e}"),
            }
        }
    }

    /// A takeover message: if it names a tunnel this host serves for the same key, let go.
    fn taken_over(&self, takeover: takeover::Takeover) {
        if takeover.host == self.id {
            return;
        }
        let Ok(name) = TunnelName::parse(&takeover.name) else {
            return;
        };
        let owner = KeyHash::from_stored(takeover.owner.clone());
        {
            let mut held = self.held();
            match held.get(&name) {
                Some(h) if h.owner == owner => {
                    held.remove(&name);
                }
                Some(_) => {
                    tracing::warn!(
                        "cluster: host {} claims {name} for another key; keeping this host's tunnel",
                        takeover.host
                    );
                    return;
                }
                None => return,
            }
        }
        self.let_go(name.as_str(), &owner, &format!("host {}", takeover.host));
    }

    /// Stops serving `name` here (its lease is someone else's already).
    fn let_go(&self, name: &str, owner: &KeyHash, by: &str) {
        let Some(tunnels) = self.tunnels.upgrade() else {
            return;
        };
        if let Some(old) = tunnels.hand_over(name, owner) {
            tracing::info!("{name}: taken over by a newer connection of its key on {by}");
            old.output.line(format!(
                "p0rt: {name} is now served by a newer connection of this key (on another host)"
            ));
        }
    }

    fn record(&self, tunnel: &Tunnel) -> String {
        serde_json::to_string(&leases::Location {
            host: self.id.clone(),
            addr: self.advertise.clone(),
            session: format!("{}/{:?}", self.id, tunnel.session),
            owner: tunnel.owner.to_string(),
        })
        .unwrap_or_default()
    }

    /// The cluster as this host sees it, for `/status/cluster`.
    pub async fn status(&self) -> serde_json::Value {
        let hosts = hosts::list(&self.link, &self.prefix).await;
        let mut status = serde_json::json!({
            "enabled": true,
            "host_id": self.id,
            "advertise": self.advertise,
            "lease_seconds": self.lease.as_secs(),
            "tunnels_here": self.held().len(),
        });
        match hosts {
            Ok(hosts) => status["hosts"] = serde_json::to_value(hosts).unwrap_or_default(),
            Err(e) => status["error"] = format!("cannot list the hosts: {e}").into(),
        }
        status
    }

    /// Gives up every lease and this host's record (a graceful shutdown), so the others stop
    /// routing here now rather than when the leases run out.
    pub async fn leave(&self) {
        let held: Vec<(TunnelName, String)> = self
            .held()
            .drain()
            .map(|(name, h)| (name, h.record))
            .collect();
        for (name, record) in held {
            let key = leases::key(&self.prefix, name.as_str());
            let _ = leases::withdraw(&self.link, &key, &record).await;
        }
        let _ = hosts::remove(&self.link, &self.prefix, &self.id).await;
    }
}

#[async_trait]
impl Placement for Cluster {
    fn opened(&self, tunnel: &Arc<Tunnel>) {
        let record = self.record(tunnel);
        self.held().insert(
            tunnel.name.clone(),
            Held {
                session: tunnel.session,
                owner: tunnel.owner.clone(),
                record: record.clone(),
            },
        );
        let (link, prefix, lease) = (self.link.clone(), self.prefix.clone(), self.lease);
        let takeover = takeover::Takeover {
            name: tunnel.name.to_string(),
            host: self.id.clone(),
            owner: tunnel.owner.to_string(),
        };
        tokio::spawn(async move {
            let key = leases::key(&prefix, &takeover.name);
            if let Err(e) = leases::announce(&link, &key, &record, lease).await {
                // The renewal rounds write it once Redis answers again.
                tracing::warn!(
                    "cluster: cannot record where {} is served: {e}",
                    takeover.name
                );
                return;
            }
            if let Err(e) = takeover::publish(&link, &prefix, &takeover).await {
                tracing::warn!("cluster: cannot announce {}: {e}", takeover.name);
            }
        });
    }

    fn closed(&self, name: &TunnelName, session: SessionId) {
        let record = {
            let mut held = self.held();
            match held.get(name) {
                Some(h) if h.session == session => held.remove(name).map(|h| h.record),
                _ => None,
            }
        };
        let Some(record) = record else { return };
        let (link, key) = (self.link.clone(), leases::key(&self.prefix, name.as_str()));
        tokio::spawn(async move {
            if let Err(e) = leases::withdraw(&link, &key, &record).await {
                tracing::debug!("cluster: cannot remove {key} (it expires with its lease): {e}");
            }
        });
    }

    async fn locate(&self, label: &str) -> Option<RemoteTunnel> {
        let key = leases::key(&self.prefix, label);
        match leases::locate(&self.link, &key).await {
            Ok(Some(location)) if location.host != self.id => Some(RemoteTunnel {
                name: label.to_string(),
                host_id: location.host,
                address: location.addr,
            }),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("cluster: cannot look up where {label} is served: {e}");
                None
            }
        }
    }
}
