//! The tunnel service: the one place that owns the rules of names and tunnels.
//!
//! It assigns a key its main name (policy, then built-in namer, claimed in the store), builds
//! and approves sub-names, checks ownership, registers live tunnels (a reconnect of the same
//! key takes its names over at once; another key's live tunnel is never displaced), and
//! resolves a `Host` label to a live tunnel, an offline name or nobody. The SSH edge only
//! translates protocol events into calls here; the HTTP edge only asks it to resolve.

mod naming;
mod output;
mod registry;

use std::sync::Arc;

pub use naming::{MAX_NAME_ATTEMPTS, NamingError};
pub use output::{SESSION_OUTPUT_QUEUE, SessionOutput, SessionOutputSink};
pub use registry::{
    LinkError, MAX_IDLE_UPSTREAMS_PER_TUNNEL, Registry, SessionId, Tunnel, TunnelLink, UpstreamIo,
};

use crate::names::{KeyHash, Label, TunnelName};
use crate::policy::{LabelApproval, NamingInput, NamingPolicy};
use crate::store::{DomainStore, StoreError};

/// An authenticated SSH key.
#[derive(Clone, Debug)]
pub struct KeyIdentity {
    pub hash: KeyHash,
    /// `SHA256:…`, for messages and plugins.
    pub fingerprint: String,
}

/// Why a tunnel could not be opened. Every variant is a sentence for the client's terminal.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Naming(#[from] NamingError),
    #[error("the naming policy refused it: {0}")]
    LabelRefused(String),
    #[error("{0} belongs to another key")]
    NameOfAnotherKey(TunnelName),
    #[error("{0} is served by another key")]
    ServedByAnotherKey(TunnelName),
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// A tunnel just registered.
pub struct Opened {
    pub tunnel: Arc<Tunnel>,
    /// The same key's tunnel it took the name from (a reconnect), told to go.
    pub displaced: Option<Arc<Tunnel>>,
}

/// What a `Host` label points at.
pub enum Resolution {
    Live(Arc<Tunnel>),
    /// A stored name (or a sub-name of one) whose owner is not connected.
    Offline,
    /// No such name.
    Unknown,
}

pub struct TunnelService {
    store: Arc<dyn DomainStore>,
    naming: Arc<dyn NamingPolicy>,
    registry: Registry,
}

impl TunnelService {
    pub fn new(store: Arc<dyn DomainStore>, naming: Arc<dyn NamingPolicy>) -> TunnelService {
        TunnelService {
            store,
            naming,
            registry: Registry::default(),
        }
    }

    /// The key's main name, assigned (and its connection noted in the store) now.
    pub async fn main_name(&self, key: &KeyIdentity, now: i64) -> Result<TunnelName, NamingError> {
        naming::assign_name(
            self.store.as_ref(),
            self.naming.as_ref(),
            &key.hash,
            &key.fingerprint,
            now,
        )
        .await
    }

    /// The name a forward serves: `main`, or `label-<main>` once the naming policy approves
    /// the label and no other key owns that name.
    pub async fn forward_name(
        &self,
        key: &KeyIdentity,
        main: &TunnelName,
        label: Option<&Label>,
    ) -> Result<TunnelName, TunnelError> {
        let Some(label) = label else {
            return Ok(main.clone());
        };
        let name = main.subname(label).map_err(TunnelError::InvalidName)?;
        let input = NamingInput {
            ssh_key_hash: key.hash.to_string(),
            fingerprint: key.fingerprint.clone(),
            requested_label: Some(label.to_string()),
            attempt: 0,
        };
        if let LabelApproval::Refused(reason) = self.naming.approve_label(&input).await {
            return Err(TunnelError::LabelRefused(reason));
        }
        // A sub-name must never shadow another key's main name.
        match self.store.owner_of(name.as_str()).await? {
            Some(owner) if owner != key.hash.as_str() => Err(TunnelError::NameOfAnotherKey(name)),
            _ => Ok(name),
        }
    }

    /// Serves `name` with a new tunnel of `session`. A live tunnel of the same key is taken
    /// over (and returned); another key's is never displaced.
    pub fn open(
        &self,
        key: &KeyIdentity,
        session: SessionId,
        name: TunnelName,
        link: Arc<dyn TunnelLink>,
        output: SessionOutput,
    ) -> Result<Opened, TunnelError> {
        let tunnel = Arc::new(Tunnel::new(name, session, key.hash.clone(), link, output));
        match self.registry.register(tunnel.clone()) {
            Ok(displaced) => Ok(Opened {
                tunnel,
                displaced: displaced.filter(|old| old.session != session),
            }),
            Err(current) => Err(TunnelError::ServedByAnotherKey(current.name.clone())),
        }
    }

    /// Stops serving `name` if `session` still serves it.
    pub fn close(&self, name: &TunnelName, session: SessionId) -> bool {
        self.registry.unregister(name, session)
    }

    /// Resolves a `Host` label (already lowercase, one DNS label).
    pub async fn resolve(&self, label: &str) -> Resolution {
        if let Some(tunnel) = self.registry.get(label) {
            return Resolution::Live(tunnel);
        }
        let Ok(name) = TunnelName::parse(label) else {
            return Resolution::Unknown;
        };
        for candidate in name.owner_candidates() {
            match self.store.owner_of(candidate).await {
                Ok(Some(_)) => return Resolution::Offline,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("domain store lookup for {label} failed: {e}");
                    return Resolution::Unknown;
                }
            }
        }
        Resolution::Unknown
    }

    /// Every live tunnel.
    pub fn live_tunnels(&self) -> Vec<Arc<Tunnel>> {
        self.registry.all()
    }
}
