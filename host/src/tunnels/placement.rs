//! Where tunnels live when several hosts share one Redis ([`crate::cluster`] implements it):
//! the tunnel service reports the tunnels it opens and closes, and asks where a name it does
//! not serve is served. Defined here so the tunnel service knows nothing of Redis.

use std::sync::Arc;

use async_trait::async_trait;

use super::{SessionId, Tunnel};
use crate::names::TunnelName;

/// A live tunnel of another host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteTunnel {
    pub name: String,
    /// The owning host's id.
    pub host_id: String,
    /// Its internal listener, `host:port`.
    pub address: String,
}

#[async_trait]
pub trait Placement: Send + Sync {
    /// `tunnel` is now served here (a takeover included).
    fn opened(&self, tunnel: &Arc<Tunnel>);
    /// `session` no longer serves `name` here.
    fn closed(&self, name: &TunnelName, session: SessionId);
    /// The host serving `label`, if another host does.
    async fn locate(&self, label: &str) -> Option<RemoteTunnel>;
}
