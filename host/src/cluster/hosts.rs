//! The host list: one Redis string per host, `{prefix}cluster:host:{id}`, with the same
//! lease as the location records, so `/status/cluster` shows the hosts alive now.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::redis_link::{RedisLink, RedisOpError};

/// Most hosts listed by `/status/cluster`.
pub const MAX_LISTED_HOSTS: usize = 1000;
/// Most time one step of listing the hosts may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// What a host record holds (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    pub id: String,
    /// Its internal listener, `host:port`.
    pub advertise: String,
    /// Live tunnels it serves.
    pub tunnels: usize,
    /// When it started, Unix seconds.
    pub since: i64,
}

pub fn key(prefix: &str, id: &str) -> String {
    format!("{prefix}cluster:host:{id}")
}

pub async fn heartbeat(
    link: &Arc<RedisLink>,
    prefix: &str,
    record: &HostRecord,
    lease: Duration,
) -> Result<(), RedisOpError> {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key(prefix, &record.id))
        .arg(serde_json::to_string(record).unwrap_or_default())
        .arg("PX")
        .arg(lease.as_millis() as u64);
    link.query::<()>(&cmd, super::leases::WRITE_TIMEOUT).await
}

pub async fn remove(link: &Arc<RedisLink>, prefix: &str, id: &str) -> Result<(), RedisOpError> {
    link.query::<()>(
        redis::cmd("DEL").arg(key(prefix, id)),
        super::leases::WRITE_TIMEOUT,
    )
    .await
}

/// Every host whose record is alive, sorted by id (one `SCAN`, then one `GET` per host, so
/// no multi-key command crosses slots on Cluster).
pub async fn list(link: &Arc<RedisLink>, prefix: &str) -> Result<Vec<HostRecord>, RedisOpError> {
    let keys = link
        .scan(
            &format!("{prefix}cluster:host:*"),
            MAX_LISTED_HOSTS,
            LIST_TIMEOUT,
        )
        .await?;
    let mut hosts = Vec::with_capacity(keys.len());
    for key in keys {
        let value: Option<String> = link
            .query(redis::cmd("GET").arg(&key), LIST_TIMEOUT)
            .await?;
        if let Some(record) = value.and_then(|v| serde_json::from_str(&v).ok()) {
            hosts.push(record);
        }
    }
    hosts.sort_by(|a: &HostRecord, b| a.id.cmp(&b.id));
    Ok(hosts)
}
