//! Opening the configured store: the Redis link (checked once), the domain store, and the
//! one-time import of `domains.json` into an empty Redis.

use std::sync::Arc;

use super::json::{DOMAINS_FILE_NAME, JsonStore, lock_data_dir};
use super::redis::RedisStore;
use super::reservations::Reservations;
use super::{DomainStore, migrate};
use crate::config::{Config, SettingsError, StorageKind};
use crate::redis_link::{RedisLink, RedisOpError, parse_target};

/// Connects to the configured Redis and checks it answers. A refused password or an unknown
/// master is a settings error; an unreachable server is only a warning (it may come back).
pub async fn connect_redis(config: &Config, url: &str) -> anyhow::Result<Arc<RedisLink>> {
    let target = parse_target(
        url,
        config.redis_password.as_ref().map(|s| s.expose()),
        config.redis_db,
    )
    .map_err(|e| SettingsError(e.to_string()))?;
    let ca_cert = match &config.redis_ca_cert {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            SettingsError(format!("cannot read REDIS_CA_CERT {}: {e}", path.display()))
        })?),
        None => None,
    };
    let link = RedisLink::new(target, url, ca_cert);
    match link.check().await {
        Ok(latency) => tracing::info!(
            "redis at {} answers ({} µs)",
            link.display,
            latency.as_micros()
        ),
        Err(e @ (RedisOpError::Auth(_) | RedisOpError::Config(_))) => {
            return Err(SettingsError(format!("redis at {}: {e}", link.display)).into());
        }
        Err(e) => tracing::warn!(
            "redis at {} is unreachable ({e}); starting anyway: live tunnels keep routing, keys seen \
             before keep their names, new keys are refused until it returns",
            link.display
        ),
    }
    Ok(link)
}

/// Applies `domain.reservations_enabled` to the store's reservations, and says what it means.
fn log_reservations(config: &Config, reservations: &dyn Reservations) {
    reservations.set_handover(config.reservations_enabled);
    if config.reservations_enabled {
        tracing::info!(
            "reservations: {}; a reserved name goes to its key, and to no other",
            reservations.location()
        );
    } else {
        tracing::info!(
            "reservations: {}; reserved names are kept from every key, not handed to their own \
             (domain.reservations_enabled / DOMAIN_RESERVATIONS_ENABLED is false, as P0rt \
             behaves; remove it or set it true to hand them over)",
            reservations.location()
        );
    }
}

/// The data-directory lock held while the store is open (JSON keeps its own).
pub enum DirLock {
    InStore,
    Held(std::fs::File),
}

/// Opens the configured domain store.
pub async fn open_store(
    config: &Config,
    link: Option<&Arc<RedisLink>>,
) -> anyhow::Result<(Arc<dyn DomainStore>, DirLock)> {
    match (config.storage, link) {
        (StorageKind::Json, _) => {
            let store = JsonStore::open(&config.data_dir)?;
            tracing::info!(
                "domain store: {} ({} records)",
                config.data_dir.join(DOMAINS_FILE_NAME).display(),
                store.len()
            );
            log_reservations(config, super::DomainStore::reservations(store.as_ref()));
            store.spawn_flusher();
            Ok((store, DirLock::InStore))
        }
        (StorageKind::Redis, Some(link)) => {
            let lock = lock_data_dir(&config.data_dir)?;
            let store = RedisStore::new(link.clone(), &config.redis_prefix, config.redis_ttl_days);
            tracing::info!(
                "domain store: redis at {} (keys {}domain:*)",
                link.display,
                config.redis_prefix
            );
            log_reservations(config, super::DomainStore::reservations(store.as_ref()));
            // The seed promises domain data is preserved when switching from JSON to Redis.
            let file = config.data_dir.join(DOMAINS_FILE_NAME);
            let empty = file.exists()
                && store.is_empty().await.unwrap_or_else(|e| {
                    tracing::warn!("not importing {}: {e}", file.display());
                    false
                });
            if empty {
                match migrate::json_file_into(&config.data_dir, store.as_ref()).await {
                    Ok(report) => tracing::info!(
                        "redis had no domains; imported {}: {report}",
                        file.display()
                    ),
                    Err(e) => {
                        tracing::error!("could not import {} into redis: {e}", file.display())
                    }
                }
            }
            Ok((store, DirLock::Held(lock)))
        }
        (StorageKind::Redis, None) => {
            Err(SettingsError("STORAGE_TYPE=redis needs a Redis URL".into()).into())
        }
    }
}
