//! `p0rt migrate`: copies domain records and name reservations between the JSON files and
//! Redis, both ways, idempotently. P0rt's own `domains.json`, `reservations.json` and Redis
//! data import unchanged.

use std::path::Path;
use std::sync::Arc;

use super::json::{DOMAINS_FILE_NAME, JsonStore, read_records};
use super::reservations::{JsonReservations, ReservationError, Reservations};
use super::{DomainRecord, DomainStore, Import, StoreError};

/// Counts of one migration run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub read: usize,
    pub imported: usize,
    pub already_present: usize,
    pub conflicts: Vec<String>,
}

impl MigrationReport {
    /// `noun` is what was copied ("records", "reservations").
    fn describe(&self, noun: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {noun} read: {} imported, {} already present, {} conflicts",
            self.read,
            self.imported,
            self.already_present,
            self.conflicts.len()
        )?;
        for conflict in &self.conflicts {
            write!(f, "\n  conflict: {conflict}")?;
        }
        Ok(())
    }

    fn tally(&mut self, outcome: Import) {
        match outcome {
            Import::Imported => self.imported += 1,
            Import::AlreadyPresent => self.already_present += 1,
            Import::Conflict(why) => self.conflicts.push(why),
        }
    }
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.describe("records", f)
    }
}

/// What one `p0rt migrate` did: the domain records, then the reservations.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migration {
    pub domains: MigrationReport,
    pub reservations: MigrationReport,
}

impl Migration {
    /// True when nothing conflicted (the exit status is 0).
    pub fn is_clean(&self) -> bool {
        self.domains.conflicts.is_empty() && self.reservations.conflicts.is_empty()
    }
}

impl std::fmt::Display for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.domains.describe("records", f)?;
        f.write_str("\n")?;
        self.reservations.describe("reservations", f)
    }
}

/// Copies every reservation of `source` into `dest` as it is (times, comment, other fields).
/// A name or key bound differently in `dest` is a conflict, reported and left alone.
pub async fn copy_reservations(
    source: &dyn Reservations,
    dest: &dyn Reservations,
) -> Result<MigrationReport, ReservationError> {
    let records = source.list().await?;
    let mut report = MigrationReport {
        read: records.len(),
        ..Default::default()
    };
    for record in &records {
        report.tally(dest.import(record).await?);
    }
    Ok(report)
}

/// Imports `records` into `dest`, tallying what happened.
pub async fn copy_records(
    records: &[DomainRecord],
    dest: &dyn DomainStore,
) -> Result<MigrationReport, StoreError> {
    let mut report = MigrationReport {
        read: records.len(),
        ..Default::default()
    };
    for record in records {
        report.tally(dest.import(record).await?);
    }
    dest.flush().await?;
    Ok(report)
}

/// JSON (`<data_dir>/domains.json`) → `dest`. Reads the file without locking it, so this
/// also serves the automatic import at startup.
pub async fn json_file_into(
    data_dir: &Path,
    dest: &dyn DomainStore,
) -> Result<MigrationReport, StoreError> {
    let records = read_records(&data_dir.join(DOMAINS_FILE_NAME))?;
    copy_records(&records, dest).await
}

/// `source` → the JSON store in `data_dir` (taking its lock, so no host may be running on it).
pub async fn into_json_dir(
    source: &dyn DomainStore,
    data_dir: &Path,
) -> Result<MigrationReport, StoreError> {
    let records = source.all_records().await?;
    let dest: Arc<JsonStore> = JsonStore::open(data_dir)?;
    copy_records(&records, dest.as_ref()).await
}

/// `p0rt migrate --to redis|json` with the host's settings (data directory, Redis URL, …):
/// the domain records, then the reservations (`reservations.json` ↔ P0rt's Redis keys).
pub async fn run(
    config: &crate::config::Config,
    to: crate::config::StorageKind,
) -> anyhow::Result<Migration> {
    use crate::config::StorageKind;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = config
        .redis_url
        .clone()
        .unwrap_or_else(|| crate::config::DEFAULT_REDIS_URL.to_string());
    let link = super::open::connect_redis(config, &url).await?;
    link.check()
        .await
        .map_err(|e| anyhow::anyhow!("redis at {} is needed for a migration: {e}", link.display))?;
    let redis =
        super::redis::RedisStore::new(link.clone(), &config.redis_prefix, config.redis_ttl_days);
    let in_redis = DomainStore::reservations(redis.as_ref());
    let report = match to {
        StorageKind::Redis => {
            // Lock the directory so no host writes domains.json while it is copied.
            let _lock = super::json::lock_data_dir(&config.data_dir)?;
            let domains = json_file_into(&config.data_dir, redis.as_ref()).await?;
            let in_file = JsonReservations::open(&config.data_dir)?;
            let reservations = copy_reservations(&in_file, in_redis).await?;
            Migration {
                domains,
                reservations,
            }
        }
        StorageKind::Json => {
            let domains = into_json_dir(redis.as_ref(), &config.data_dir).await?;
            let in_file = JsonReservations::open(&config.data_dir)?;
            let reservations = copy_reservations(in_redis, &in_file).await?;
            Migration {
                domains,
                reservations,
            }
        }
    };
    Ok(report)
}
