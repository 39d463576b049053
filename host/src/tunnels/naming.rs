//! Name assignment: a key's stored name, or the first candidate (from the naming policy,
//! then the built-in namer) that the store lets it claim.

use crate::names::{KeyHash, MAX_LABEL_LEN, TunnelName, builtin_name, is_reserved};
use crate::policy::{NameChoice, NamingInput, NamingPolicy};
use crate::store::{Claim, DomainStore, StoreError};

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

/// Claims `candidate` for the key unless it is reserved, taken, or in another key's
/// sub-name space.
async fn try_claim(
    store: &dyn DomainStore,
    key: &KeyHash,
    candidate: &TunnelName,
    now: i64,
) -> Result<Option<TunnelName>, NamingError> {
    if is_reserved(candidate.as_str()) || in_foreign_subname_space(store, candidate, key).await? {
        return Ok(None);
    }
    match store.claim(key.as_str(), candidate.as_str(), now).await? {
        Claim::Claimed(record) | Claim::AlreadyOwned(record) => {
            Ok(TunnelName::parse(&record.domain).ok())
        }
        Claim::Taken => Ok(None),
    }
}

/// The key's name: its stored record if it has one (noting the connection), otherwise the
/// first candidate the store lets it claim. Candidates come from the naming policy; if it
/// falls back, or all its candidates are taken, from the built-in namer.
pub async fn assign_name(
    store: &dyn DomainStore,
    policy: &dyn NamingPolicy,
    key: &KeyHash,
    fingerprint: &str,
    now: i64,
) -> Result<TunnelName, NamingError> {
    if let Some(record) = store.touch(key.as_str(), now).await? {
        return TunnelName::parse(&record.domain).map_err(|e| {
            NamingError::Store(StoreError::Unavailable(format!(
                "the stored name of this key is not a DNS label ({e}); the operator must repair the record"
            )))
        });
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
        if let Some(name) = try_claim(store, key, &candidate, now).await? {
            return Ok(name);
        }
    }
    for attempt in 0..MAX_NAME_ATTEMPTS {
        let candidate = builtin_name(key, attempt);
        if let Some(name) = try_claim(store, key, &candidate, now).await? {
            return Ok(name);
        }
    }
    Err(NamingError::Exhausted)
}
