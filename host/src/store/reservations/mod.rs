//! Name reservations, as P0rt keeps them: a name held for the SSH key with a given
//! fingerprint (`SHA256:…`, as `ssh-keygen -l` prints it).
//!
//! - A reserved name goes to its key, as that key's main name, whenever it connects, when
//!   `domain.reservations_enabled` (`DOMAIN_RESERVATIONS_ENABLED`) is on, as it is by default;
//!   P0rt never hands it over at all (its SSH path passes no fingerprint). A
//!   reservation wins over the key's stored name, as P0rt's generator intends; the stored
//!   name stays the key's.
//! - Whatever that switch says, it is never given to another key: not derived, not granted as a requested name, not as
//!   the base of another key's name (`x-<reserved>`), and a key whose stored name is reserved
//!   for another key is refused (with a message) until the operator sorts it out.
//! - One key holds at most one reservation, and a name is reserved for one key (P0rt's rules).
//!
//! Two backends, beside the domain store they belong to: [`json::JsonReservations`]
//! (`reservations.json` in the data directory, P0rt's array of `{domain, fingerprint,
//! created_at, updated_at, comment}`, re-read when it changes) and [`redis::RedisReservations`]
//! (P0rt's keys `reservation:domain:<d>`, `reservation:fingerprint:<fp>`,
//! `reservation:details:<d>`, `reservations:list`). `p0rt reservation list|add|remove`
//! works on either through [`Admin`].

pub mod json;
pub mod redis;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{Config, StorageKind};
use crate::names::{TunnelName, check_dns_label, is_reserved};
use crate::store::Import;

pub use json::{JsonReservations, RESERVATIONS_FILE_NAME};
pub use redis::RedisReservations;

/// One reservation, with P0rt's field names. Times are kept as the RFC 3339 text they were
/// read as; fields p0rt does not know are kept too, so a record is written back as it was.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub domain: String,
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// P0rt writes it only when it is not empty (`omitempty`).
    #[serde(default, skip_serializing_if = "is_blank")]
    pub comment: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fn is_blank(comment: &Option<String>) -> bool {
    comment.as_deref().is_none_or(str::is_empty)
}

impl Reservation {
    /// A new reservation made now.
    pub fn new(name: &TunnelName, fingerprint: &str, comment: Option<&str>) -> Reservation {
        let now = now_text();
        Reservation {
            domain: name.to_string(),
            fingerprint: fingerprint.to_string(),
            created_at: Some(now.clone()),
            updated_at: Some(now),
            comment: comment.map(str::to_string),
            other: serde_json::Map::new(),
        }
    }

    /// The same reservation renewed now (P0rt's add of an existing reservation), keeping its
    /// creation time, its other fields and, unless a new one is given, its comment.
    pub fn renewed(&self, comment: Option<&str>) -> Reservation {
        Reservation {
            updated_at: Some(now_text()),
            comment: comment.map(str::to_string).or_else(|| self.comment.clone()),
            ..self.clone()
        }
    }

    /// The name it reserves, lowercased (host names ignore case; P0rt allowed capitals), or
    /// what is wrong with the record.
    pub fn name(&self) -> Result<TunnelName, String> {
        let name = self.domain.to_ascii_lowercase();
        check_dns_label(&name)
            .map_err(|e| format!("domain {:?} is not a DNS label ({e})", self.domain))?;
        if is_reserved(&name) {
            return Err(format!(
                "domain {:?} is a word the host keeps for itself",
                self.domain
            ));
        }
        if self.fingerprint.trim().is_empty() {
            return Err(format!("domain {:?} has no fingerprint", self.domain));
        }
        for (what, time) in [
            ("created_at", &self.created_at),
            ("updated_at", &self.updated_at),
        ] {
            if let Some(text) = time
                && OffsetDateTime::parse(text, &Rfc3339).is_err()
            {
                return Err(format!(
                    "domain {:?}: {what} {text:?} is not an RFC 3339 time",
                    self.domain
                ));
            }
        }
        TunnelName::parse(&name)
    }
}

/// The record `import` writes: `record` with its name lowercased, as `add` writes names, or
/// why it cannot be imported.
fn importable(record: &Reservation) -> Result<(TunnelName, Reservation), Import> {
    let name = record
        .name()
        .map_err(|why| Import::Conflict(format!("reservation not imported: {why}")))?;
    let copy = Reservation {
        domain: name.to_string(),
        ..record.clone()
    };
    Ok((name, copy))
}

/// Now, as RFC 3339 text (UTC), the way P0rt's times read.
fn now_text() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Who holds a reservation of a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The key with this fingerprint.
    Fingerprint(String),
    /// Something p0rt cannot read (named here): the name goes to no key at all.
    Unreadable(String),
}

impl Holder {
    /// True if the key with `fingerprint` holds it.
    pub fn is(&self, fingerprint: &str) -> bool {
        matches!(self, Holder::Fingerprint(f) if f == fingerprint)
    }
}

/// Outcome of [`Reservations::add`].
#[derive(Clone, Debug, PartialEq)]
pub enum Added {
    Created(Reservation),
    /// The key already held the name: its times (and comment, if given) were renewed.
    Renewed(Reservation),
}

#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    #[error(
        "reservations file {path} is unreadable: {detail}. p0rt never rewrites a file it \
         cannot read, so it was left untouched; repair it (P0rt's shape: a JSON array of \
         {{domain, fingerprint, created_at, updated_at, comment}}) or restore a backup"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("reservations file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "redis key {key} {problem}; p0rt never overwrites or deletes data it cannot read: \
         repair or delete that key by hand"
    )]
    BadKey { key: String, problem: String },
    #[error("reservations unavailable: {0}; try again shortly")]
    Unavailable(String),
    /// A name or fingerprint given by the operator that cannot be reserved.
    #[error("{0}")]
    Invalid(String),
    /// The name is reserved for another key, or the key holds another name.
    #[error("{0}")]
    Conflict(String),
}

/// A backend for reservations. Lookups are what naming asks on every connection; the
/// changes are `p0rt reservation add|remove`.
#[async_trait]
pub trait Reservations: Send + Sync {
    /// The name to hand to the key with this fingerprint: its reserved name, unless handing
    /// over is off ([`set_handover`](Reservations::set_handover)).
    async fn name_for(&self, fingerprint: &str) -> Result<Option<TunnelName>, ReservationError>;
    /// Who holds a reservation of `name` (lowercase), if anyone.
    async fn holder_of(&self, name: &str) -> Result<Option<Holder>, ReservationError>;
    /// Every reservation.
    async fn list(&self) -> Result<Vec<Reservation>, ReservationError>;
    /// Reserves `name` for the key with `fingerprint` (checked by the caller), as P0rt does:
    /// refused if it is reserved for another key or the key holds another name.
    async fn add(
        &self,
        name: &TunnelName,
        fingerprint: &str,
        comment: Option<&str>,
    ) -> Result<Added, ReservationError>;
    /// Copies `record` in as it is (times, comment, unknown fields), for `p0rt migrate`:
    /// `AlreadyPresent` when this key already holds that name here; a conflict (nothing
    /// written) when the name is reserved for another key or the key holds another name.
    async fn import(&self, record: &Reservation) -> Result<Import, ReservationError>;
    /// Lifts the reservation of `name`; `None` if it was not reserved.
    async fn remove(&self, name: &TunnelName) -> Result<Option<Reservation>, ReservationError>;
    /// Where they are kept, for messages.
    fn location(&self) -> String;
    /// Whether a reserved name is handed to its key (`domain.reservations_enabled`; on
    /// unless set off). Off, a reserved name is still kept from every other key.
    fn set_handover(&self, on: bool);
}

/// Checks a name the operator wants to reserve (case ignored): a DNS label, not a word the
/// host keeps for itself.
pub fn check_name(name: &str) -> Result<TunnelName, ReservationError> {
    let lower = name.to_ascii_lowercase();
    if is_reserved(&lower) {
        return Err(ReservationError::Invalid(format!(
            "{name:?} cannot be reserved: the host keeps that word for itself"
        )));
    }
    TunnelName::parse(&lower)
        .map_err(|e| ReservationError::Invalid(format!("{name:?} cannot be reserved: {e}")))
}

/// Checks a fingerprint as `ssh-keygen -l` prints it: `SHA256:` and the unpadded base64 of
/// 32 bytes.
pub fn check_fingerprint(fingerprint: &str) -> Result<(), ReservationError> {
    use base64::Engine;
    let ok = fingerprint.strip_prefix("SHA256:").is_some_and(|b64| {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64)
            .is_ok_and(|bytes| bytes.len() == 32)
    });
    if ok {
        Ok(())
    } else {
        Err(ReservationError::Invalid(format!(
            "{fingerprint:?} is not a key fingerprint as `ssh-keygen -lf KEY.pub` prints it \
             (SHA256: followed by 43 base64 characters)"
        )))
    }
}

/// `p0rt reservation …`: the configured store's reservations (the data directory's file, or
/// Redis when the domain store is Redis), opened beside a running host.
pub struct Admin {
    backend: AdminBackend,
    /// `domain.reservations_enabled` as the configuration says.
    handover: bool,
}

enum AdminBackend {
    File {
        reservations: Box<JsonReservations>,
        domains: PathBuf,
    },
    Redis(Arc<super::redis::RedisStore>),
}

impl Admin {
    /// Opens what `config` points at. A file that cannot be read is an error naming it.
    pub async fn open(config: &Config) -> anyhow::Result<Admin> {
        let backend = match config.storage {
            StorageKind::Json => AdminBackend::File {
                reservations: Box::new(JsonReservations::open(&config.data_dir)?),
                domains: config.data_dir.join(super::json::DOMAINS_FILE_NAME),
            },
            StorageKind::Redis => {
                let url = config.redis_url_in_use().unwrap_or_default();
                let link = super::open::connect_redis(config, &url).await?;
                AdminBackend::Redis(super::redis::RedisStore::new(
                    link,
                    &config.redis_prefix,
                    config.redis_ttl_days,
                ))
            }
        };
        Ok(Admin {
            backend,
            handover: config.reservations_enabled,
        })
    }

    pub fn reservations(&self) -> &dyn Reservations {
        match &self.backend {
            AdminBackend::File { reservations, .. } => reservations.as_ref(),
            AdminBackend::Redis(store) => super::DomainStore::reservations(store.as_ref()),
        }
    }

    /// The key hash whose stored name (or granted name) `name` is, if the store says so.
    async fn stored_owner(&self, name: &str) -> Option<String> {
        match &self.backend {
            AdminBackend::File { domains, .. } => stored_owner_in(domains, name),
            AdminBackend::Redis(store) => super::DomainStore::owner_of(store.as_ref(), name)
                .await
                .ok()
                .flatten(),
        }
    }

    /// `p0rt reservation list`: a table, or P0rt's `--json` answer
    /// (`{"success": true, "message": …, "data": [reservations]}`).
    pub async fn list_text(&self, json: bool) -> anyhow::Result<String> {
        let list = self.reservations().list().await?;
        if json {
            let message = if list.is_empty() {
                "No reservations found".to_string()
            } else {
                format!("Found {} reservation(s)", list.len())
            };
            let answer = serde_json::json!({ "success": true, "message": message, "data": list });
            return Ok(serde_json::to_string_pretty(&answer)? + "\n");
        }
        if list.is_empty() {
            return Ok(format!(
                "no reservations ({})\n",
                self.reservations().location()
            ));
        }
        let width = list
            .iter()
            .map(|r| r.domain.len())
            .max()
            .unwrap_or(0)
            .max(4);
        let mut out = format!(
            "{:<width$}  {:<50}  {:<25}  comment\n",
            "name", "fingerprint", "created"
        );
        for r in &list {
            out.push_str(&format!(
                "{:<width$}  {:<50}  {:<25}  {}\n",
                r.domain,
                r.fingerprint,
                r.created_at.as_deref().unwrap_or("-"),
                r.comment.as_deref().unwrap_or("")
            ));
        }
        Ok(out)
    }

    /// `p0rt reservation add NAME FINGERPRINT [COMMENT]`.
    pub async fn add_text(
        &self,
        name: &str,
        fingerprint: &str,
        comment: Option<&str>,
    ) -> anyhow::Result<String> {
        let name = check_name(name)?;
        check_fingerprint(fingerprint)?;
        let comment = comment.filter(|c| !c.is_empty());
        let added = self.reservations().add(&name, fingerprint, comment).await?;
        let mut out = match added {
            Added::Created(_) => format!("reserved {name} for key {fingerprint}\n"),
            Added::Renewed(_) => {
                format!("{name} was already reserved for key {fingerprint}; renewed\n")
            }
        };
        if !self.handover {
            out.push_str(&format!(
                "note: reservations are not handed over (domain.reservations_enabled / \
                 DOMAIN_RESERVATIONS_ENABLED is off): {name} is kept from every key, its own \
                 included, until the host runs with it on\n"
            ));
        }
        if let Some(owner) = self.stored_owner(name.as_str()).await {
            out.push_str(&format!(
                "note: {name} is a stored name of the key with hash {owner}; if that is not the \
                 key of {fingerprint}, that key is refused {name} from its next connection\n"
            ));
        }
        Ok(out)
    }

    /// `p0rt reservation remove NAME`: the message, and whether it was reserved.
    pub async fn remove_text(&self, name: &str) -> anyhow::Result<(String, bool)> {
        let name = check_name(name)?;
        Ok(match self.reservations().remove(&name).await? {
            Some(r) => (
                format!(
                    "removed the reservation of {name} (key {}); the name stays with any key \
                     that already has it as a stored name\n",
                    r.fingerprint
                ),
                true,
            ),
            None => (format!("{name} is not reserved\n"), false),
        })
    }
}

/// The owner of `name` in a `domains.json`, read without locking it (a host may hold it).
fn stored_owner_in(domains: &Path, name: &str) -> Option<String> {
    if !domains.exists() {
        return None;
    }
    super::json::read_records(domains)
        .ok()?
        .into_iter()
        .find(|r| r.domain == name)
        .map(|r| r.ssh_key_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_fingerprints_are_checked() {
        assert_eq!(
            check_name("Eager-Pixel-Ant").unwrap().as_str(),
            "eager-pixel-ant"
        );
        for bad in ["admin", "a.b", "-x", "", "ünï"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_fingerprint("SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s").unwrap();
        for bad in [
            "SHA256:abc123...",
            "uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
            "MD5:16:27:ac:a5:76:28:2d:36:63:1b:56:4d:eb:df:a6:48",
            "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s=",
        ] {
            let e = check_fingerprint(bad).unwrap_err().to_string();
            assert!(e.contains("ssh-keygen -lf"), "{bad}: {e}");
        }
    }

    #[test]
    fn records_say_what_is_wrong() {
        let good: Reservation = serde_json::from_str(
            r#"{"domain":"Happy-Cat-Jump","fingerprint":"SHA256:x","created_at":"2024-03-01T10:00:00.123456789+01:00","updated_at":"0001-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(good.name().unwrap().as_str(), "happy-cat-jump");
        for (field, value, needle) in [
            ("domain", "a.b", "not a DNS label"),
            ("domain", "www", "keeps for itself"),
            ("fingerprint", "", "no fingerprint"),
            ("created_at", "yesterday", "not an RFC 3339 time"),
        ] {
            let mut bad = serde_json::to_value(&good).unwrap();
            bad[field] = value.into();
            let bad: Reservation = serde_json::from_value(bad).unwrap();
            let problem = bad.name().unwrap_err();
            assert!(problem.contains(needle), "{field}={value}: {problem}");
        }
    }

    #[test]
    fn a_renewal_keeps_the_creation_time_and_unknown_fields() {
        let old: Reservation = serde_json::from_str(
            r#"{"domain":"a-b-c","fingerprint":"SHA256:x","created_at":"2024-01-01T00:00:00Z","updated_at":"2024-01-01T00:00:00Z","comment":"mine","tier":"gold"}"#,
        )
        .unwrap();
        let renewed = old.renewed(None);
        assert_eq!(renewed.created_at, old.created_at);
        assert_ne!(renewed.updated_at, old.updated_at);
        assert_eq!(renewed.comment.as_deref(), Some("mine"));
        assert_eq!(renewed.other["tier"], "gold");
        assert_eq!(old.renewed(Some("new")).comment.as_deref(), Some("new"));
    }
}
