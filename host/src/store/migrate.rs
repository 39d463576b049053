//! `p0rt migrate`: copies domain records between the JSON file and Redis, both ways,
//! idempotently. P0rt's own `domains.json` and Redis data import unchanged.

use std::path::Path;
use std::sync::Arc;

use super::json::{DOMAINS_FILE_NAME, JsonStore, read_records};
use super::{DomainRecord, DomainStore, Import, StoreError};

/// Counts of one migration run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub read: usize,
    pub imported: usize,
    pub already_present: usize,
    pub conflicts: Vec<String>,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records read: {} imported, {} already present, {} conflicts",
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
        match dest.import(record).await? {
            Import::Imported => report.imported += 1,
            Import::AlreadyPresent => report.already_present += 1,
            Import::Conflict(why) => report.conflicts.push(why),
        }
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

/// `p0rt migrate --to redis|json` with the host's settings (data directory, Redis URL, …).
pub async fn run(
    config: &crate::config::Config,
    to: crate::config::StorageKind,
) -> anyhow::Result<MigrationReport> {
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
    let report = match to {
        StorageKind::Redis => {
            // Lock the directory so no host writes domains.json while it is copied.
            let _lock = super::json::lock_data_dir(&config.data_dir)?;
            json_file_into(&config.data_dir, redis.as_ref()).await?
        }
        StorageKind::Json => into_json_dir(redis.as_ref(), &config.data_dir).await?,
    };
    Ok(report)
}
