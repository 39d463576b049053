//! Tunnel location records: one Redis string per name, `{prefix}cluster:tunnel:{name}`,
//! holding the serving host's id and internal address, the session and the owner key,
//! written with a `PX` lease that the serving host renews at a third of it. Every operation
//! touches one key (a single-key script for compare-and-renew and compare-and-delete), so it
//! works on Redis Cluster unchanged.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::redis_link::{RedisLink, RedisOpError};

/// Most time a location lookup may take on the request path (a slow Redis means the
/// request is answered as if the name were not served elsewhere).
pub const LOCATE_TIMEOUT: Duration = Duration::from_millis(500);
/// Most time a write (announce, renew, withdraw) may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Renews the lease if the record is still ours; writes it again if it vanished (a Redis
/// restart or failover lost it); leaves another host's record alone.
/// Returns 1 renewed, 2 written again, 0 someone else's.
const RENEW: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
";

/// Deletes the record only if it is still ours.
const WITHDRAW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What a location record holds (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Location {
    pub host: String,
    /// The host's internal listener, `host:port`.
    pub addr: String,
    /// `<host id>/<session>`: tells two sessions of one key apart.
    pub session: String,
    /// The owner key's hash.
    pub owner: String,
}

/// What a renewal found.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    Rewritten,
    /// Another host holds the name now.
    Lost,
}

pub fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}cluster:tunnel:{name}")
}

fn script(body: &str, key: &str, args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(body).arg(1).arg(key);
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

/// Writes `record` for `key`, replacing whatever was there (a takeover replaces the old
/// host's record at once).
pub async fn announce(
    link: &Arc<RedisLink>,
    key: &str,
    record: &str,
    lease: Duration,
) -> Result<(), RedisOpError> {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(record)
        .arg("PX")
        .arg(lease.as_millis() as u64);
    link.query::<()>(&cmd, WRITE_TIMEOUT).await
}

pub async fn renew(
    link: &Arc<RedisLink>,
    key: &str,
    record: &str,
    lease: Duration,
) -> Result<Renewal, RedisOpError> {
    let ms = (lease.as_millis() as u64).to_string();
    let outcome: i64 = link
        .query(&script(RENEW, key, &[record, &ms]), WRITE_TIMEOUT)
        .await?;
    Ok(match outcome {
        1 => Renewal::Renewed,
        2 => Renewal::Rewritten,
        _ => Renewal::Lost,
    })
}

pub async fn withdraw(
    link: &Arc<RedisLink>,
    key: &str,
    record: &str,
) -> Result<bool, RedisOpError> {
    let deleted: i64 = link
        .query(&script(WITHDRAW, key, &[record]), WRITE_TIMEOUT)
        .await?;
    Ok(deleted == 1)
}

/// The record at `key`; `None` if there is none or it is not one of ours (logged).
pub async fn locate(link: &Arc<RedisLink>, key: &str) -> Result<Option<Location>, RedisOpError> {
    let value: Option<String> = link
        .query(redis::cmd("GET").arg(key), LOCATE_TIMEOUT)
        .await?;
    Ok(value.and_then(|v| match serde_json::from_str(&v) {
        Ok(location) => Some(location),
        Err(e) => {
            tracing::warn!("cluster: ignoring the unreadable location record {key}: {e}");
            None
        }
    }))
}
