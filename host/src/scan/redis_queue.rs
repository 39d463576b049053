//! The scan queue in Redis, shared by every host on it: two streams (high and low priority)
//! read through one consumer group, so each job goes to one worker; a worker renews its
//! claim while it runs (`XCLAIM … JUSTID`), and `XAUTOCLAIM` hands an entry whose worker
//! stopped renewing to the next one. Every command names one key, so it works on Cluster.
//!
//! Keys, under the configured prefix:
//! - `job:scan:{target}`: id of the job holding the target's cached report (the seed's key), TTL
//! - `job:scans:id:{id}`: the job record (JSON), TTL
//! - `job:scans:queue:high`, `job:scans:queue:low`: the streams (entry field `job`)
//! - `job:scans:key:{key hash}`: the requester's recent job ids (list), TTL
//! - `job:scans:recent`: everyone's recent job ids (list, capped)
//! - `job:scans:cancel:{id}`: set when someone cancels a running job, for the record TTL
//!   (a worker checks it while the job runs; after that it is never read)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::job::{JobId, JobRecord};
use super::queue::{Band, JobBackend, Lease, QueueError, RECENT_OVERALL, RECENT_PER_KEY};
use crate::redis_link::{RedisLink, RedisOpError};

/// Time budget of each queue command.
pub const QUEUE_OP_TIMEOUT: Duration = Duration::from_millis(1000);
/// The consumer group every host's workers read through.
pub const CONSUMER_GROUP: &str = "workers";

pub struct RedisJobs {
    link: Arc<RedisLink>,
    prefix: String,
    record_ttl: Duration,
    groups_ready: AtomicBool,
}

fn unavailable(e: RedisOpError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

fn ttl_secs(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}

impl RedisJobs {
    pub fn new(link: Arc<RedisLink>, prefix: &str, record_ttl: Duration) -> RedisJobs {
        RedisJobs {
            link,
            prefix: prefix.to_string(),
            record_ttl,
            groups_ready: AtomicBool::new(false),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn stream(&self, band: Band) -> String {
        match band {
            Band::High => self.key("job:scans:queue:high"),
            Band::Low => self.key("job:scans:queue:low"),
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, QueueError> {
        self.link
            .query(cmd, QUEUE_OP_TIMEOUT)
            .await
            .map_err(unavailable)
    }

    /// Creates the consumer group on both streams once (and again if a stream vanished).
    async fn ensure_groups(&self) -> Result<(), QueueError> {
        if self.groups_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        for band in [Band::High, Band::Low] {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(self.stream(band))
                .arg(CONSUMER_GROUP)
                .arg("0")
                .arg("MKSTREAM");
            match self.link.query::<Value>(&cmd, QUEUE_OP_TIMEOUT).await {
                Ok(_) => {}
                Err(RedisOpError::Other(text)) if text.contains("BUSYGROUP") => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        self.groups_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// One entry of `band` for `worker`: a lapsed claim first, then a new entry.
    async fn take_from(
        &self,
        band: Band,
        worker: &str,
        visibility: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        let stream = self.stream(band);
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim
            .arg(&stream)
            .arg(CONSUMER_GROUP)
            .arg(worker)
            .arg(visibility.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(1);
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(CONSUMER_GROUP)
            .arg(worker)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">");
        for cmd in [claim, read] {
            let reply: Value = match self.link.query(&cmd, QUEUE_OP_TIMEOUT).await {
                Ok(reply) => reply,
                Err(RedisOpError::Other(text)) if text.contains("NOGROUP") => {
                    self.groups_ready.store(false, Ordering::Release);
                    return Ok(None);
                }
                Err(e) => return Err(unavailable(e)),
            };
            let mut entries = Vec::new();
            stream_entries(&reply, &mut entries);
            for (entry, job) in entries {
                let lease = Lease {
                    job: JobId::random(),
                    entry,
                    band,
                };
                match job.as_deref().and_then(JobId::parse) {
                    Some(job) => return Ok(Some(Lease { job, ..lease })),
                    // Deleted or foreign entry: acknowledge it so it is not handed out again.
                    None => self.complete(&lease).await?,
                }
            }
        }
        Ok(None)
    }
}

/// Collects `(entry id, value of field "job")` from an `XAUTOCLAIM` or `XREADGROUP` reply,
/// in RESP2 or RESP3 shape: an entry is a pair of a stream id and a field list (nil when
/// the entry was deleted).
fn stream_entries(value: &Value, out: &mut Vec<(String, Option<String>)>) {
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    }
    fn is_stream_id(s: &str) -> bool {
        s.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
        })
    }
    match value {
        Value::Array(items) | Value::Set(items) => {
            if let [id, fields] = items.as_slice()
                && let Some(id) = text(id).filter(|s| is_stream_id(s))
            {
                match fields {
                    Value::Array(fields) if fields.iter().all(|f| text(f).is_some()) => {
                        let job = fields
                            .chunks(2)
                            .find(|pair| pair.first().and_then(text).as_deref() == Some("job"))
                            .and_then(|pair| pair.get(1).and_then(text));
                        out.push((id, job));
                        return;
                    }
                    Value::Nil => {
                        out.push((id, None));
                        return;
                    }
                    _ => {}
                }
            }
            for item in items {
                stream_entries(item, out);
            }
        }
        Value::Map(pairs) => {
            for (_, v) in pairs {
                stream_entries(v, out);
            }
        }
        _ => {}
    }
}

#[async_trait]
impl JobBackend for RedisJobs {
    async fn save(&self, job: &JobRecord) -> Result<(), QueueError> {
        let text = serde_json::to_string(job).unwrap_or_default();
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(&format!("job:scans:id:{}", job.id)))
            .arg(text)
            .arg("EX")
            .arg(ttl_secs(self.record_ttl));
        self.run::<()>(&cmd).await
    }

    async fn load(&self, id: &JobId) -> Result<Option<JobRecord>, QueueError> {
        let key = self.key(&format!("job:scans:id:{id}"));
        let text: Option<String> = match self
            .link
            .query(redis::cmd("GET").arg(&key), QUEUE_OP_TIMEOUT)
            .await
        {
            Ok(text) => text,
            // Another type at our key: treat as missing, never overwrite blindly here.
            Err(RedisOpError::WrongType { .. }) => None,
            Err(e) => return Err(unavailable(e)),
        };
        Ok(
            text.and_then(|t| match serde_json::from_str::<JobRecord>(&t) {
                Ok(record) if record.id == *id => Some(record),
                _ => {
                    tracing::warn!("redis key {key} does not hold a scan job record; ignored");
                    None
                }
            }),
        )
    }

    async fn enqueue(&self, job: &JobRecord, max_waiting: usize) -> Result<(), QueueError> {
        self.ensure_groups().await?;
        let mut waiting = 0usize;
        for band in [Band::High, Band::Low] {
            let len: usize = self.run(redis::cmd("XLEN").arg(self.stream(band))).await?;
            waiting += len;
        }
        if waiting >= max_waiting {
            return Err(QueueError::Full(waiting));
        }
        self.save(job).await?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.stream(Band::of(job.priority)))
            .arg("*")
            .arg("job")
            .arg(job.id.as_str());
        self.run::<String>(&cmd).await.map(drop)
    }

    async fn remember(&self, job: &JobRecord) -> Result<(), QueueError> {
        let mine = self.key(&format!("job:scans:key:{}", job.requester));
        let recent = self.key("job:scans:recent");
        self.run::<()>(redis::cmd("LPUSH").arg(&mine).arg(job.id.as_str()))
            .await?;
        self.run::<()>(
            redis::cmd("LTRIM")
                .arg(&mine)
                .arg(0)
                .arg(RECENT_PER_KEY - 1),
        )
        .await?;
        self.run::<()>(
            redis::cmd("EXPIRE")
                .arg(&mine)
                .arg(ttl_secs(self.record_ttl)),
        )
        .await?;
        self.run::<()>(redis::cmd("LPUSH").arg(&recent).arg(job.id.as_str()))
            .await?;
        self.run::<()>(
            redis::cmd("LTRIM")
                .arg(&recent)
                .arg(0)
                .arg(RECENT_OVERALL - 1),
        )
        .await
    }

    async fn take(&self, worker: &str, visibility: Duration) -> Result<Option<Lease>, QueueError> {
        self.ensure_groups().await?;
        for band in [Band::High, Band::Low] {
            if let Some(lease) = self.take_from(band, worker, visibility).await? {
                return Ok(Some(lease));
            }
        }
        Ok(None)
    }

    async fn renew(&self, worker: &str, lease: &Lease) -> Result<(), QueueError> {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(self.stream(lease.band))
            .arg(CONSUMER_GROUP)
            .arg(worker)
            .arg(0)
            .arg(&lease.entry)
            .arg("JUSTID");
        self.run::<Value>(&cmd).await.map(drop)
    }

    async fn complete(&self, lease: &Lease) -> Result<(), QueueError> {
        let stream = self.stream(lease.band);
        self.run::<i64>(
            redis::cmd("XACK")
                .arg(&stream)
                .arg(CONSUMER_GROUP)
                .arg(&lease.entry),
        )
        .await?;
        self.run::<i64>(redis::cmd("XDEL").arg(&stream).arg(&lease.entry))
            .await
            .map(drop)
    }

    async fn cached(&self, target: &str) -> Result<Option<JobId>, QueueError> {
        let key = self.key(&format!("job:scan:{target}"));
        match self
            .link
            .query::<Option<String>>(redis::cmd("GET").arg(&key), QUEUE_OP_TIMEOUT)
            .await
        {
            Ok(id) => Ok(id.as_deref().and_then(JobId::parse)),
            Err(RedisOpError::WrongType { .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn set_cached(&self, target: &str, id: &JobId, ttl: Duration) -> Result<(), QueueError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(&format!("job:scan:{target}")))
            .arg(id.as_str())
            .arg("EX")
            .arg(ttl_secs(ttl));
        self.run::<()>(&cmd).await
    }

    async fn jobs_of(&self, requester: &str) -> Result<Vec<JobId>, QueueError> {
        let key = self.key(&format!("job:scans:key:{requester}"));
        let ids: Vec<String> = self
            .run(redis::cmd("LRANGE").arg(key).arg(0).arg(RECENT_PER_KEY - 1))
            .await?;
        Ok(ids.iter().filter_map(|id| JobId::parse(id)).collect())
    }

    async fn recent(&self) -> Result<Vec<JobId>, QueueError> {
        let ids: Vec<String> = self
            .run(
                redis::cmd("LRANGE")
                    .arg(self.key("job:scans:recent"))
                    .arg(0)
                    .arg(RECENT_OVERALL - 1),
            )
            .await?;
        Ok(ids.iter().filter_map(|id| JobId::parse(id)).collect())
    }

    async fn request_cancel(&self, id: &JobId, ttl: Duration) -> Result<(), QueueError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(&format!("job:scans:cancel:{id}")))
            .arg(1)
            .arg("EX")
            .arg(ttl_secs(ttl));
        self.run::<()>(&cmd).await
    }

    async fn cancel_requested(&self, id: &JobId) -> Result<bool, QueueError> {
        self.run(redis::cmd("EXISTS").arg(self.key(&format!("job:scans:cancel:{id}"))))
            .await
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entries_are_found_in_both_reply_shapes() {
        let entry = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("job"), bulk("sabc")]),
        ]);
        // XAUTOCLAIM: [cursor, [entries], [deleted]]
        let claim = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![
                entry.clone(),
                Value::Array(vec![bulk("2-5"), Value::Nil]),
            ]),
            Value::Array(vec![]),
        ]);
        let mut out = Vec::new();
        stream_entries(&claim, &mut out);
        assert_eq!(
            out,
            [("1-0".into(), Some("sabc".into())), ("2-5".into(), None)]
        );
        // XREADGROUP in RESP3: {stream: [entries]}
        let read = Value::Map(vec![(bulk("p0rt:q"), Value::Array(vec![entry]))]);
        let mut out = Vec::new();
        stream_entries(&read, &mut out);
        assert_eq!(out, [("1-0".into(), Some("sabc".into()))]);
        let mut out = Vec::new();
        stream_entries(&Value::Nil, &mut out);
        assert!(out.is_empty());
    }
}
