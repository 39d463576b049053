//! The tunnel service: the one place that owns the rules of names and tunnels.
//!
//! It assigns a key its main name (policy, then built-in namer, claimed in the store), builds
//! and approves sub-names, checks ownership, registers live tunnels (a reconnect of the same
//! key takes its names over at once; another key's live tunnel is never displaced), and
//! resolves a `Host` label to a live tunnel, an offline name or nobody. The SSH edge only
//! translates protocol events into calls here; the HTTP edge only asks it to resolve.

mod naming;
pub mod options;
mod output;
mod placement;
mod registry;

use std::sync::{Arc, OnceLock};

pub use naming::{MAX_NAME_ATTEMPTS, NamingError};
pub use options::SessionOptions;
pub use output::{SESSION_OUTPUT_LINE_MAX, SESSION_OUTPUT_QUEUE, SessionOutput, SessionOutputSink};
pub use placement::{Placement, RemoteTunnel};
pub use registry::{
    LinkError, Refused, Registry, SessionId, Tunnel, TunnelLink, TunnelStats, UpstreamIo,
};

use crate::names::{KeyHash, Label, TunnelName};
use crate::policy::{LabelApproval, NamingInput, NamingPolicy};
use crate::store::{DomainStore, Grant, StoreError};

/// Live tunnels one key may serve at once, over all its connections.
pub const MAX_TUNNELS_PER_KEY: usize = 32;

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
    #[error("{0} is reserved for another key")]
    ReservedForAnotherKey(TunnelName),
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("this key already serves {0} tunnels, the most one key may; close some first")]
    TooManyTunnels(usize),
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
    /// Served by another host of the cluster.
    Remote(RemoteTunnel),
}

pub struct TunnelService {
    store: Arc<dyn DomainStore>,
    naming: Arc<dyn NamingPolicy>,
    registry: Registry,
    max_tunnels_per_key: usize,
    /// Set once when clustering is on.
    placement: OnceLock<Arc<dyn Placement>>,
}

impl TunnelService {
    pub fn new(store: Arc<dyn DomainStore>, naming: Arc<dyn NamingPolicy>) -> TunnelService {
        TunnelService {
            store,
            naming,
            registry: Registry::default(),
            max_tunnels_per_key: MAX_TUNNELS_PER_KEY,
            placement: OnceLock::new(),
        }
    }

    /// The same service with another cap on live tunnels per key.
    pub fn with_max_tunnels_per_key(mut self, max: usize) -> TunnelService {
        self.max_tunnels_per_key = max;
        self
    }

    pub fn max_tunnels_per_key(&self) -> usize {
        self.max_tunnels_per_key
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

    /// The name a forward serves: `main`; for a requested label, `label-<main>` once the
    /// naming policy approves it, or `label` itself when the policy grants it as a name of
    /// the key's own (first come, first served). Never a name another key owns.
    pub async fn forward_name(
        &self,
        key: &KeyIdentity,
        main: &TunnelName,
        label: Option<&Label>,
    ) -> Result<TunnelName, TunnelError> {
        let Some(label) = label else {
            return Ok(main.clone());
        };
        let input = NamingInput {
            ssh_key_hash: key.hash.to_string(),
            fingerprint: key.fingerprint.clone(),
            requested_label: Some(label.to_string()),
            attempt: 0,
            owned_names: self.store.names_of(key.hash.as_str()).await?,
        };
        let name = match self.naming.approve_label(&input).await {
            LabelApproval::Refused(reason) => return Err(TunnelError::LabelRefused(reason)),
            LabelApproval::GrantRequested => {
                return self.grant_requested(key, label).await;
            }
            LabelApproval::Approved => main.subname(label).map_err(TunnelError::InvalidName)?,
        };
        // A sub-name must never shadow another key's main name, nor a name reserved for one.
        if naming::reserved_for_another(self.store.reservations(), name.as_str(), &key.fingerprint)
            .await?
        {
            return Err(TunnelError::ReservedForAnotherKey(name));
        }
        match self.store.owner_of(name.as_str()).await? {
            Some(owner) if owner != key.hash.as_str() => Err(TunnelError::NameOfAnotherKey(name)),
            _ => Ok(name),
        }
    }

    /// Gives the key the requested label as a name of its own, unless another key owns it,
    /// it is reserved for another key, or it lies in another key's sub-name space
    /// (`api-<their name>`, stored or reserved). A name reserved for this key is its own
    /// to ask for, wherever it lies (the operator decided).
    async fn grant_requested(
        &self,
        key: &KeyIdentity,
        label: &Label,
    ) -> Result<TunnelName, TunnelError> {
        let name = TunnelName::parse(label.as_str()).map_err(TunnelError::InvalidName)?;
        let reservations = self.store.reservations();
        let reserved_for_it = reservations
            .holder_of(name.as_str())
            .await
            .map_err(StoreError::from)?
            .is_some_and(|holder| holder.is(&key.fingerprint));
        if !reserved_for_it {
            if naming::in_foreign_reservation(reservations, &name, &key.fingerprint).await? {
                return Err(TunnelError::ReservedForAnotherKey(name));
            }
            if naming::in_foreign_subname_space(self.store.as_ref(), &name, &key.hash).await? {
                return Err(TunnelError::NameOfAnotherKey(name));
            }
        }
        match self
            .store
            .grant(key.hash.as_str(), name.as_str(), crate::unix_now())
            .await?
        {
            Grant::Granted => {
                tracing::info!(
                    "{name}: granted to key {} as a requested name",
                    key.fingerprint
                );
                Ok(name)
            }
            Grant::AlreadyOwned => Ok(name),
            Grant::Taken => Err(TunnelError::NameOfAnotherKey(name)),
        }
    }

    /// Serves `name` with a new tunnel of `session`. A live tunnel of the same key is taken
    /// over (and returned); another key's is never displaced. A key already serving
    /// [`TunnelService::max_tunnels_per_key`] names gets no new one (taking over one of its
    /// own names is not a new one).
    pub fn open(
        &self,
        key: &KeyIdentity,
        session: SessionId,
        name: TunnelName,
        link: Arc<dyn TunnelLink>,
        output: SessionOutput,
        options: Arc<SessionOptions>,
    ) -> Result<Opened, TunnelError> {
        let tunnel = Tunnel::new(name, session, key.hash.clone(), link, output, options)
            .with_fingerprint(&key.fingerprint);
        let tunnel = Arc::new(tunnel);
        match self
            .registry
            .register(tunnel.clone(), self.max_tunnels_per_key)
        {
            Ok(displaced) => Ok(Opened {
                tunnel: self.placed(tunnel),
                displaced: displaced.filter(|old| old.session != session),
            }),
            Err(Refused::Taken(current)) => {
                Err(TunnelError::ServedByAnotherKey(current.name.clone()))
            }
            Err(Refused::OwnerFull) => Err(TunnelError::TooManyTunnels(self.max_tunnels_per_key)),
        }
    }

    /// Stops serving `name` if `session` still serves it.
    pub fn close(&self, name: &TunnelName, session: SessionId) -> bool {
        let closed = self.registry.unregister(name, session);
        if closed && let Some(placement) = self.placement.get() {
            placement.closed(name, session);
        }
        closed
    }

    /// Reports this host's tunnels to `placement` from now on (clustering). Once only.
    pub fn set_placement(&self, placement: Arc<dyn Placement>) {
        let _ = self.placement.set(placement);
    }

    fn placed(&self, tunnel: Arc<Tunnel>) -> Arc<Tunnel> {
        if let Some(placement) = self.placement.get() {
            placement.opened(&tunnel);
        }
        tunnel
    }

    /// Stops serving `name` here because another host took it over for the same key
    /// (`owner`); returns the tunnel let go. Another key's tunnel is never let go.
    pub fn hand_over(&self, name: &str, owner: &KeyHash) -> Option<Arc<Tunnel>> {
        let tunnel = self.registry.get(name).filter(|t| t.owner == *owner)?;
        self.registry
            .unregister(&tunnel.name, tunnel.session)
            .then_some(tunnel)
    }

    /// Resolves a `Host` label (already lowercase, one DNS label): a live tunnel here, else
    /// (clustered) one on another host, else the store's word.
    pub async fn resolve(&self, label: &str) -> Resolution {
        if let Some(tunnel) = self.registry.get(label) {
            return Resolution::Live(tunnel);
        }
        if let Some(placement) = self.placement.get()
            && let Some(remote) = placement.locate(label).await
        {
            return Resolution::Remote(remote);
        }
        self.resolve_offline(label).await
    }

    /// Like [`resolve`](Self::resolve), never answering a tunnel of another host (requests
    /// forwarded by another host are served here or not at all).
    pub async fn resolve_here(&self, label: &str) -> Resolution {
        match self.registry.get(label) {
            Some(tunnel) => Resolution::Live(tunnel),
            None => self.resolve_offline(label).await,
        }
    }

    async fn resolve_offline(&self, label: &str) -> Resolution {
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
        // A reserved name whose key never connected is a name all the same (one lookup: a
        // key that connected has it in the store).
        match self.store.reservations().holder_of(label).await {
            Ok(Some(_)) => Resolution::Offline,
            _ => Resolution::Unknown,
        }
    }

    /// Every live tunnel.
    pub fn live_tunnels(&self) -> Vec<Arc<Tunnel>> {
        self.registry.all()
    }

    /// How many names the key serves right now.
    pub fn live_count_of(&self, key: &KeyHash) -> usize {
        self.registry.count_of(key)
    }

    /// Names the key serves right now.
    pub fn live_names_of(&self, key: &KeyHash) -> Vec<TunnelName> {
        self.registry
            .all()
            .into_iter()
            .filter(|t| t.owner == *key)
            .map(|t| t.name.clone())
            .collect()
    }

    /// The key a name (or sub-name) belongs to: its live tunnel's, else the stored owner of
    /// its main name. `None` when nobody owns it or the store cannot say.
    pub async fn owner(&self, label: &str) -> Option<KeyHash> {
        if let Some(tunnel) = self.registry.get(label) {
            return Some(tunnel.owner.clone());
        }
        let name = TunnelName::parse(label).ok()?;
        for candidate in name.owner_candidates() {
            match self.store.owner_of(candidate).await {
                Ok(Some(owner)) => return Some(KeyHash::from_stored(owner)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("domain store lookup for {label} failed: {e}");
                    return None;
                }
            }
        }
        None
    }
}

/// The service in-process: a real JSON store in a temp dir, policies written inline, and a
/// link that is never opened (routing and naming decisions only; the e2e suite drives the
/// edges with OpenSSH).
#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use async_trait::async_trait;

    use super::*;
    use crate::policy::{BuiltinPolicy, NameChoice};
    use crate::store::json::JsonStore;

    struct NoLink;

    #[async_trait]
    impl TunnelLink for NoLink {
        async fn open_stream(&self, _peer: SocketAddr) -> Result<Box<dyn UpstreamIo>, LinkError> {
            Err(LinkError("not in these tests".into()))
        }
    }

    /// Names every key `fixed`, and refuses the label `nope`.
    struct Fixed(&'static str);

    #[async_trait]
    impl NamingPolicy for Fixed {
        async fn choose_name(&self, _input: &NamingInput) -> NameChoice {
            NameChoice::Name(self.0.into())
        }
        async fn approve_label(&self, input: &NamingInput) -> LabelApproval {
            match input.requested_label.as_deref() {
                Some("nope") => LabelApproval::Refused("not this one".into()),
                _ => LabelApproval::Approved,
            }
        }
    }

    fn key(id: &str) -> KeyIdentity {
        KeyIdentity {
            hash: KeyHash::from_stored(format!("{id:0>64}")),
            fingerprint: format!("SHA256:{id}"),
        }
    }

    fn service(dir: &tempfile::TempDir, naming: Arc<dyn NamingPolicy>) -> TunnelService {
        TunnelService::new(JsonStore::open(dir.path()).unwrap(), naming)
    }

    fn open(
        service: &TunnelService,
        key: &KeyIdentity,
        session: SessionId,
        name: &TunnelName,
    ) -> Result<Opened, TunnelError> {
        let (output, _sink) = SessionOutput::new();
        let options = Arc::new(SessionOptions::default());
        service.open(
            key,
            session,
            name.clone(),
            Arc::new(NoLink),
            output,
            options,
        )
    }

    /// Names every key `.0`; grants every requested label as a name of the key's own.
    struct Granting(&'static str);

    #[async_trait]
    impl NamingPolicy for Granting {
        async fn choose_name(&self, _input: &NamingInput) -> NameChoice {
            NameChoice::Name(self.0.into())
        }
        async fn approve_label(&self, _input: &NamingInput) -> LabelApproval {
            LabelApproval::GrantRequested
        }
    }

    /// Writes `reservations.json` as P0rt does: (name, fingerprint) pairs.
    fn reserve(dir: &tempfile::TempDir, reservations: &[(&str, &KeyIdentity)]) {
        let records: Vec<serde_json::Value> = reservations
            .iter()
            .map(|(name, key)| {
                serde_json::json!({
                    "domain": name,
                    "fingerprint": key.fingerprint,
                    "created_at": "2025-01-15T10:30:00.123456789+01:00",
                    "updated_at": "2025-01-15T10:30:00.123456789+01:00",
                })
            })
            .collect();
        let path = dir
            .path()
            .join(crate::store::reservations::RESERVATIONS_FILE_NAME);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&records).unwrap()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    fn label(l: &str) -> Label {
        Label::from_bind_address(l).unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_reserved_name_goes_to_its_key_and_is_never_derived_for_another() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) = (key("a"), key("b"), key("c"));
        reserve(&dir, &[("wanted-name", &alice)]);
        // The policy would give everyone the reserved name, or a name in its sub-name space.
        let service = service(&dir, Arc::new(Fixed("wanted-name")));
        let bob_name = service.main_name(&bob, 1).await.unwrap();
        assert_eq!(bob_name, crate::names::builtin_name(&bob.hash, 0));
        let service = TunnelService::new(service.store.clone(), Arc::new(Fixed("x-wanted-name")));
        let carol_name = service.main_name(&carol, 1).await.unwrap();
        assert_eq!(carol_name, crate::names::builtin_name(&carol.hash, 0));
        // Alice gets it, and it is stored as hers.
        let alice_name = service.main_name(&alice, 2).await.unwrap();
        assert_eq!(alice_name.as_str(), "wanted-name");
        assert_eq!(
            service
                .store
                .owner_of("wanted-name")
                .await
                .unwrap()
                .as_deref(),
            Some(alice.hash.as_str())
        );
        assert_eq!(service.main_name(&alice, 3).await.unwrap(), alice_name);
    }

    #[tokio::test]
    async fn a_reservation_wins_over_the_stored_name_which_stays_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(&dir, Arc::new(BuiltinPolicy));
        let alice = key("a");
        let stored = service.main_name(&alice, 1).await.unwrap();
        reserve(&dir, &[("wanted-name", &alice)]);
        assert_eq!(
            service.main_name(&alice, 2).await.unwrap().as_str(),
            "wanted-name"
        );
        assert_eq!(
            service.store.names_of(alice.hash.as_str()).await.unwrap(),
            vec![stored.to_string(), "wanted-name".to_string()]
        );
        // Lifted: the stored name is the main name again; the reserved one stays hers.
        reserve(&dir, &[]);
        assert_eq!(service.main_name(&alice, 3).await.unwrap(), stored);
        assert_eq!(
            service
                .store
                .owner_of("wanted-name")
                .await
                .unwrap()
                .as_deref(),
            Some(alice.hash.as_str())
        );
    }

    #[tokio::test]
    async fn a_stored_name_reserved_for_another_key_is_refused_to_its_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(&dir, Arc::new(BuiltinPolicy));
        let (alice, bob) = (key("a"), key("b"));
        let bobs = service.main_name(&bob, 1).await.unwrap();
        reserve(&dir, &[(bobs.as_str(), &alice)]);
        assert!(matches!(
            service.main_name(&bob, 2).await,
            Err(NamingError::StoredNameReserved(n)) if n == bobs
        ));
        assert_eq!(service.main_name(&alice, 3).await.unwrap(), bobs);
    }

    #[tokio::test]
    async fn a_reserved_name_is_never_granted_or_a_subname_of_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) = (key("a"), key("b"), key("c"));
        reserve(&dir, &[("wanted-name", &alice), ("api-base", &carol)]);
        let service = service(&dir, Arc::new(Granting("base")));
        let bob_main = service.main_name(&bob, 1).await.unwrap();
        assert_eq!(bob_main.as_str(), "base");
        for requested in ["wanted-name", "shop-wanted-name"] {
            assert!(
                matches!(
                    service.forward_name(&bob, &bob_main, Some(&label(requested))).await,
                    Err(TunnelError::ReservedForAnotherKey(n)) if n.as_str() == requested
                ),
                "{requested}"
            );
        }
        assert_eq!(service.store.owner_of("wanted-name").await.unwrap(), None);
        // A sub-name that spells a name reserved for another key is refused too.
        let service = TunnelService::new(service.store.clone(), Arc::new(Fixed("base")));
        assert!(matches!(
            service.forward_name(&bob, &bob_main, Some(&label("api"))).await,
            Err(TunnelError::ReservedForAnotherKey(n)) if n.as_str() == "api-base"
        ));
        // Its holder may ask for it by name, though it lies in Bob's sub-name space.
        let service = TunnelService::new(service.store.clone(), Arc::new(Granting("base")));
        let carol_main = service.main_name(&carol, 2).await.unwrap();
        assert_eq!(carol_main.as_str(), "api-base");
        let api_base = service
            .forward_name(&carol, &carol_main, Some(&label("api-base")))
            .await
            .unwrap();
        assert_eq!(api_base.as_str(), "api-base");
        // Offline, a reserved name is a known name.
        assert!(matches!(
            service.resolve("wanted-name").await,
            Resolution::Offline
        ));
    }

    #[tokio::test]
    async fn names_are_stable_per_key_and_never_shared() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(&dir, Arc::new(BuiltinPolicy));
        let (alice, bob) = (key("a"), key("b"));
        let first = service.main_name(&alice, 1).await.unwrap();
        assert_eq!(service.main_name(&alice, 2).await.unwrap(), first);
        assert_ne!(service.main_name(&bob, 3).await.unwrap(), first);
    }

    #[tokio::test]
    async fn a_policy_name_taken_by_another_key_falls_to_the_builtin_namer() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(&dir, Arc::new(Fixed("same-for-all")));
        let alice = service.main_name(&key("a"), 1).await.unwrap();
        assert_eq!(alice.as_str(), "same-for-all");
        let bob = service.main_name(&key("b"), 1).await.unwrap();
        assert_eq!(bob, crate::names::builtin_name(&key("b").hash, 0));
    }

    #[tokio::test]
    async fn subnames_need_the_policy_and_never_shadow_another_keys_name() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(&dir, Arc::new(Fixed("base")));
        let (alice, bob) = (key("a"), key("b"));
        let base = service.main_name(&alice, 1).await.unwrap();
        let api = Label::from_bind_address("api").unwrap().unwrap();
        let sub = service
            .forward_name(&alice, &base, Some(&api))
            .await
            .unwrap();
        assert_eq!(sub.as_str(), "api-base");
        let nope = Label::from_bind_address("nope").unwrap().unwrap();
        assert!(matches!(
            service.forward_name(&alice, &base, Some(&nope)).await,
            Err(TunnelError::LabelRefused(_))
        ));
        // When Bob owns "api-base" as his main name, Alice's sub-name of that spelling is refused.
        let other_dir = tempfile::tempdir().unwrap();
        let store = JsonStore::open(other_dir.path()).unwrap();
        let service = TunnelService::new(store.clone(), Arc::new(Fixed("base")));
        let base = service.main_name(&alice, 1).await.unwrap();
        store.claim(bob.hash.as_str(), "api-base", 1).await.unwrap();
        assert!(matches!(
            service.forward_name(&alice, &base, Some(&api)).await,
            Err(TunnelError::NameOfAnotherKey(_))
        ));
    }

    #[tokio::test]
    async fn reconnect_takes_over_but_another_key_never_displaces() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(&dir, Arc::new(BuiltinPolicy));
        let (alice, bob) = (key("a"), key("b"));
        let name = service.main_name(&alice, 1).await.unwrap();
        let (old, new) = (SessionId::next(), SessionId::next());
        assert!(
            open(&service, &alice, old, &name)
                .unwrap()
                .displaced
                .is_none()
        );
        let opened = open(&service, &alice, new, &name).unwrap();
        assert_eq!(opened.displaced.map(|t| t.session), Some(old));
        assert!(matches!(
            open(&service, &bob, SessionId::next(), &name),
            Err(TunnelError::ServedByAnotherKey(_))
        ));
        // The old session's late cleanup leaves the new tunnel alone.
        assert!(!service.close(&name, old));
        assert!(
            matches!(service.resolve(name.as_str()).await, Resolution::Live(t) if t.session == new)
        );
        assert!(service.close(&name, new));
    }

    #[tokio::test]
    async fn a_key_serves_at_most_its_cap_of_tunnels_and_takeovers_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(&dir, Arc::new(Fixed("base"))).with_max_tunnels_per_key(3);
        let (alice, bob) = (key("a"), key("b"));
        let main = service.main_name(&alice, 1).await.unwrap();
        let names: Vec<TunnelName> = ["one", "two", "three", "four"]
            .iter()
            .map(|l| {
                main.subname(&Label::from_bind_address(l).unwrap().unwrap())
                    .unwrap()
            })
            .collect();
        let (first, second) = (SessionId::next(), SessionId::next());
        for name in &names[..3] {
            open(&service, &alice, first, name).unwrap();
        }
        assert_eq!(service.live_count_of(&alice.hash), 3);
        assert!(matches!(
            open(&service, &alice, second, &names[3]),
            Err(TunnelError::TooManyTunnels(3))
        ));
        // A reconnect taking over its own names stays within the cap.
        for name in &names[..3] {
            open(&service, &alice, second, name).unwrap();
        }
        assert_eq!(service.live_count_of(&alice.hash), 3);
        // Another key has its own count.
        let bob_name = service.main_name(&bob, 1).await.unwrap();
        open(&service, &bob, SessionId::next(), &bob_name).unwrap();
        assert_eq!(service.live_count_of(&bob.hash), 1);
        // Closing one frees a place; the stale session's close frees nothing.
        assert!(!service.close(&names[0], first));
        assert_eq!(service.live_count_of(&alice.hash), 3);
        assert!(service.close(&names[0], second));
        assert_eq!(service.live_count_of(&alice.hash), 2);
        open(&service, &alice, second, &names[3]).unwrap();
        for name in &names[1..] {
            assert!(service.close(name, second));
        }
        assert_eq!(service.live_count_of(&alice.hash), 0);
    }

    #[tokio::test]
    async fn resolve_tells_live_offline_and_unknown_apart() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(&dir, Arc::new(BuiltinPolicy));
        let alice = key("a");
        let name = service.main_name(&alice, 1).await.unwrap();
        assert!(matches!(
            service.resolve(name.as_str()).await,
            Resolution::Offline
        ));
        let sub = format!("shop-{name}");
        assert!(matches!(service.resolve(&sub).await, Resolution::Offline));
        assert!(matches!(
            service.resolve("nobody-here").await,
            Resolution::Unknown
        ));
        assert!(matches!(
            service.resolve("Not A Label").await,
            Resolution::Unknown
        ));
        open(&service, &alice, SessionId::next(), &name).unwrap();
        assert!(matches!(
            service.resolve(name.as_str()).await,
            Resolution::Live(_)
        ));
    }
}
