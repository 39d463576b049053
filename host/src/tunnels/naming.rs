//! Name assignment: the name reserved for the key if there is one, else its stored name, or
//! the first candidate (from the naming policy, then the built-in namer) that the store lets
//! it claim. A name reserved for another key, or in its sub-name space, is never one of them.

use crate::names::{KeyHash, MAX_LABEL_LEN, TunnelName, builtin_name, is_reserved};
use crate::policy::{NameChoice, NamingInput, NamingPolicy};
use crate::store::reservations::Reservations;
use crate::store::{Claim, DomainStore, Grant, StoreError};

/// How many salted attempts each namer makes before giving up on a key.
pub const MAX_NAME_ATTEMPTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum NamingError {
    #[error("no free name found for this key after {MAX_NAME_ATTEMPTS} attempts; ask the operator")]
    Exhausted,
    #[error("the naming policy refused this key: {0}")]
    Refused(String),
    #[error("no name can be given right now: {0}")]
    Store(#[from] StoreError),
    #[error(
        "this key's name {0} is reserved for another key, so it is not served; ask the \
         operator (`p0rt reservation list`)"
    )]
    StoredNameReserved(TunnelName),
}

/// True if `name` is reserved for a key other than the one with `fingerprint`.
pub(super) async fn reserved_for_another(
    reservations: &dyn Reservations,
    name: &str,
    fingerprint: &str,
) -> Result<bool, StoreError> {
    Ok(reservations
        .holder_of(name)
        .await?
        .is_some_and(|holder| !holder.is(fingerprint)))
}

/// True if `candidate`, or a main name whose sub-name space it lies in (`label-<name>`), is
/// reserved for a key other than the one with `fingerprint`.
pub(super) async fn in_foreign_reservation(
    reservations: &dyn Reservations,
    candidate: &TunnelName,
    fingerprint: &str,
) -> Result<bool, StoreError> {
    for base in candidate.owner_candidates() {
        if reserved_for_another(reservations, base, fingerprint).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// True if `candidate` lies in another key's sub-name space: `label-<their name>` for some
/// stored name of a different key. Such a name would shadow that key's sub-names.
pub(super) async fn in_foreign_subname_space(
    store: &dyn DomainStore,
    candidate: &TunnelName,
    key: &KeyHash,
) -> Result<bool, StoreError> {
    for base in candidate.owner_candidates().skip(1) {
        if let Some(owner) = store.owner_of(base).await?
            && owner != key.as_str()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Claims `candidate` for the key unless it is a reserved word, reserved for another key,
/// taken, or in another key's sub-name space.
async fn try_claim(
    store: &dyn DomainStore,
    key: &KeyHash,
    fingerprint: &str,
    candidate: &TunnelName,
    now: i64,
) -> Result<Option<TunnelName>, NamingError> {
    if is_reserved(candidate.as_str())
        || in_foreign_reservation(store.reservations(), candidate, fingerprint).await?
        || in_foreign_subname_space(store, candidate, key).await?
    {
        return Ok(None);
    }
    match store.claim(key.as_str(), candidate.as_str(), now).await? {
        Claim::Claimed(record) | Claim::AlreadyOwned(record) => {
            Ok(TunnelName::parse(&record.domain).ok())
        }
        Claim::Taken => Ok(None),
    }
}

/// The name reserved for the key, which wins over its stored name (as in P0rt). It is put
/// in the store as the key's own: its main name if it has none yet, else a granted name,
/// so it keeps resolving and stays the key's if the reservation is lifted later. If the
/// store binds it to another key (bound before the reservation was made), the reservation
/// still decides: that key is refused it from then on.
async fn take_reserved(
    store: &dyn DomainStore,
    key: &KeyHash,
    fingerprint: &str,
    reserved: TunnelName,
    now: i64,
) -> Result<TunnelName, NamingError> {
    let held = match store.touch(key.as_str(), now).await? {
        Some(record) if record.domain == reserved.as_str() => true,
        Some(_) => store.grant(key.as_str(), reserved.as_str(), now).await? != Grant::Taken,
        None => match store.claim(key.as_str(), reserved.as_str(), now).await? {
            Claim::Claimed(_) => true,
            Claim::AlreadyOwned(record) if record.domain == reserved.as_str() => true,
            Claim::AlreadyOwned(_) => {
                store.grant(key.as_str(), reserved.as_str(), now).await? != Grant::Taken
            }
            Claim::Taken => false,
        },
    };
    if !held {
        tracing::warn!(
            "{reserved} is reserved for key {fingerprint} but the domain store binds it to \
             another key; serving it to the reservation's key, and refusing it to the other"
        );
    }
    Ok(reserved)
}

/// The key's name: the name reserved for it if there is one; else its stored record if it
/// has one (noting the connection), unless that name is reserved for another key; otherwise
/// the first candidate the store lets it claim. Candidates come from the naming policy; if
/// it falls back, or all its candidates are taken, from the built-in namer.
pub async fn assign_name(
    store: &dyn DomainStore,
    policy: &dyn NamingPolicy,
    key: &KeyHash,
    fingerprint: &str,
    now: i64,
) -> Result<TunnelName, NamingError> {
    let reservations = store.reservations();
    if let Some(reserved) = reservations
        .name_for(fingerprint)
        .await
        .map_err(StoreError::from)?
    {
        return take_reserved(store, key, fingerprint, reserved, now).await;
    }
    if let Some(record) = store.touch(key.as_str(), now).await? {
        let name = TunnelName::parse(&record.domain).map_err(|e| {
            NamingError::Store(StoreError::Unavailable(format!(
                "the stored name of this key is not a DNS label ({e}); the operator must repair the record"
            )))
        })?;
        if reserved_for_another(reservations, name.as_str(), fingerprint).await? {
            return Err(NamingError::StoredNameReserved(name));
        }
        return Ok(name);
    }
    // A key without a main name may still own granted requested names.
    let owned = store.names_of(key.as_str()).await?;
    for attempt in 0..MAX_NAME_ATTEMPTS {
        let input = NamingInput {
            ssh_key_hash: key.to_string(),
            fingerprint: fingerprint.to_string(),
            requested_label: None,
            attempt,
            owned_names: owned.clone(),
        };
        let candidate = match policy.choose_name(&input).await {
            NameChoice::Name(name) => name,
            NameChoice::Refused(reason) => return Err(NamingError::Refused(reason)),
            NameChoice::Fallback(_) => break,
        };
        // The policy layer validates its plugin's output; this guards the store regardless.
        let Ok(candidate) = TunnelName::parse(&candidate) else {
            break;
        };
        debug_assert!(candidate.as_str().len() <= MAX_LABEL_LEN);
        if let Some(name) = try_claim(store, key, fingerprint, &candidate, now).await? {
            return Ok(name);
        }
    }
    for attempt in 0..MAX_NAME_ATTEMPTS {
        let candidate = builtin_name(key, attempt);
        if let Some(name) = try_claim(store, key, fingerprint, &candidate, now).await? {
            return Ok(name);
        }
    }
    Err(NamingError::Exhausted)
}
