//! Where jobs wait and live: in memory within one process, or in Redis shared by every host
//! ([`super::redis_queue`]). Both keep the same states and the same promise: a job taken by
//! a worker is leased, not removed; a lease not renewed within the visibility timeout is
//! handed to the next worker that asks, so a job whose worker died still completes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::job::{JobId, JobRecord};

/// Most job records kept in memory; the oldest finished ones go first.
pub const MEMORY_MAX_RECORDS: usize = 10_000;
/// Most job ids remembered per key (to count its active jobs) and overall (for the admin list).
pub const RECENT_PER_KEY: usize = 20;
pub const RECENT_OVERALL: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the scan queue is full ({0} jobs waiting or running); try again in a minute")]
    Full(usize),
    #[error("the scan queue is unavailable ({0}); try again shortly")]
    Unavailable(String),
}

/// A job handed to one worker until it completes it or stops renewing.
#[derive(Clone, Debug)]
pub struct Lease {
    pub job: JobId,
    /// The queue's own handle for the entry (a stream entry id in Redis).
    pub entry: String,
    /// Which priority band it came from.
    pub band: Band,
}

/// Two priority bands: a worker always takes from `High` first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Band {
    High,
    Low,
}

impl Band {
    /// Policy priorities 5-9 go first.
    pub fn of(priority: u8) -> Band {
        if priority >= 5 { Band::High } else { Band::Low }
    }
}

#[async_trait]
pub trait JobBackend: Send + Sync {
    /// Writes the record (with the record TTL).
    async fn save(&self, job: &JobRecord) -> Result<(), QueueError>;
    async fn load(&self, id: &JobId) -> Result<Option<JobRecord>, QueueError>;
    /// Saves the record and queues it, unless `max_waiting` jobs already wait or run.
    async fn enqueue(&self, job: &JobRecord, max_waiting: usize) -> Result<(), QueueError>;
    /// Remembers a job (queued or not) under its requester and in the overall list.
    async fn remember(&self, job: &JobRecord) -> Result<(), QueueError>;
    /// The next job for `worker`: a lease whose holder stopped renewing for `visibility`, or
    /// a waiting one. Never blocks for long.
    async fn take(&self, worker: &str, visibility: Duration) -> Result<Option<Lease>, QueueError>;
    /// Keeps a lease (the worker is alive and still working).
    async fn renew(&self, worker: &str, lease: &Lease) -> Result<(), QueueError>;
    /// Removes a finished job from the queue.
    async fn complete(&self, lease: &Lease) -> Result<(), QueueError>;
    /// The job holding the cached report of `target`, if its TTL has not run out.
    async fn cached(&self, target: &str) -> Result<Option<JobId>, QueueError>;
    async fn set_cached(&self, target: &str, id: &JobId, ttl: Duration) -> Result<(), QueueError>;
    /// Jobs of a requester, newest first.
    async fn jobs_of(&self, requester: &str) -> Result<Vec<JobId>, QueueError>;
    /// Recent jobs of everyone, newest first.
    async fn recent(&self) -> Result<Vec<JobId>, QueueError>;
    /// Asks the worker running `id` (on any host) to stop.
    async fn request_cancel(&self, id: &JobId, ttl: Duration) -> Result<(), QueueError>;
    async fn cancel_requested(&self, id: &JobId) -> Result<bool, QueueError>;
    /// `"memory"` or `"redis"`.
    fn kind(&self) -> &'static str;
}

/// The in-process queue.
pub struct MemoryJobs {
    record_ttl: Duration,
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    records: HashMap<JobId, (JobRecord, Instant)>,
    /// Waiting jobs: highest priority first, then oldest.
    waiting: BinaryHeap<(u8, Reverse<u64>, JobId)>,
    /// Taken jobs: who holds them and when they last renewed.
    leased: HashMap<JobId, (String, Instant, u8, u64)>,
    next_seq: u64,
    cache: HashMap<String, (JobId, Instant)>,
    by_key: HashMap<String, VecDeque<JobId>>,
    recent: VecDeque<JobId>,
    cancels: HashSet<JobId>,
}

impl MemoryJobs {
    pub fn new(record_ttl: Duration) -> MemoryJobs {
        MemoryJobs {
            record_ttl,
            state: Mutex::new(MemoryState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MemoryState {
    /// Drops expired records and, beyond the cap, the oldest finished ones.
    fn sweep(&mut self, now: Instant) {
        self.records.retain(|_, (_, expires)| *expires > now);
        self.cache.retain(|_, (_, expires)| *expires > now);
        // Keys whose jobs have all expired are forgotten, so the map does not grow with
        // every key that ever scanned.
        let records = &self.records;
        self.by_key.retain(|_, ids| {
            ids.retain(|id| records.contains_key(id));
            !ids.is_empty()
        });
        self.recent.retain(|id| records.contains_key(id));
        self.cancels.retain(|id| records.contains_key(id));
        if self.records.len() > MEMORY_MAX_RECORDS {
            let mut finished: Vec<(i64, JobId)> = self
                .records
                .values()
                .filter(|(r, _)| r.state.is_final())
                .map(|(r, _)| (r.created_at_ms, r.id.clone()))
                .collect();
            finished.sort();
            let excess = self.records.len() - MEMORY_MAX_RECORDS;
            for (_, id) in finished.into_iter().take(excess) {
                self.records.remove(&id);
            }
        }
    }
}

fn push_bounded(list: &mut VecDeque<JobId>, id: JobId, cap: usize) {
    list.push_front(id);
    list.truncate(cap);
}

#[async_trait]
impl JobBackend for MemoryJobs {
    async fn save(&self, job: &JobRecord) -> Result<(), QueueError> {
        let mut state = self.state();
        let now = Instant::now();
        state.sweep(now);
        state
            .records
            .insert(job.id.clone(), (job.clone(), now + self.record_ttl));
        Ok(())
    }

    async fn load(&self, id: &JobId) -> Result<Option<JobRecord>, QueueError> {
        let state = self.state();
        Ok(state
            .records
            .get(id)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(r, _)| r.clone()))
    }

    async fn enqueue(&self, job: &JobRecord, max_waiting: usize) -> Result<(), QueueError> {
        let mut state = self.state();
        let waiting = state.waiting.len() + state.leased.len();
        if waiting >= max_waiting {
            return Err(QueueError::Full(waiting));
        }
        let now = Instant::now();
        state.sweep(now);
        state
            .records
            .insert(job.id.clone(), (job.clone(), now + self.record_ttl));
        let seq = state.next_seq;
        state.next_seq += 1;
        state
            .waiting
            .push((job.priority, Reverse(seq), job.id.clone()));
        Ok(())
    }

    async fn remember(&self, job: &JobRecord) -> Result<(), QueueError> {
        let mut state = self.state();
        let list = state.by_key.entry(job.requester.clone()).or_default();
        push_bounded(list, job.id.clone(), RECENT_PER_KEY);
        push_bounded(&mut state.recent, job.id.clone(), RECENT_OVERALL);
        Ok(())
    }

    async fn take(&self, worker: &str, visibility: Duration) -> Result<Option<Lease>, QueueError> {
        let mut state = self.state();
        let now = Instant::now();
        // A lease nobody renewed goes back to the head of its priority.
        let expired: Vec<JobId> = state
            .leased
            .iter()
            .filter(|(_, (_, renewed, _, _))| now.duration_since(*renewed) >= visibility)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some((_, _, priority, seq)) = state.leased.remove(&id) {
                state.waiting.push((priority, Reverse(seq), id));
            }
        }
        let Some((priority, Reverse(seq), id)) = state.waiting.pop() else {
            return Ok(None);
        };
        state
            .leased
            .insert(id.clone(), (worker.to_string(), now, priority, seq));
        Ok(Some(Lease {
            job: id,
            entry: seq.to_string(),
            band: Band::of(priority),
        }))
    }

    async fn renew(&self, worker: &str, lease: &Lease) -> Result<(), QueueError> {
        let mut state = self.state();
        if let Some(entry) = state.leased.get_mut(&lease.job)
            && entry.0 == worker
        {
            entry.1 = Instant::now();
        }
        Ok(())
    }

    async fn complete(&self, lease: &Lease) -> Result<(), QueueError> {
        let mut state = self.state();
        state.leased.remove(&lease.job);
        state.cancels.remove(&lease.job);
        Ok(())
    }

    async fn cached(&self, target: &str) -> Result<Option<JobId>, QueueError> {
        let state = self.state();
        Ok(state
            .cache
            .get(target)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(id, _)| id.clone()))
    }

    async fn set_cached(&self, target: &str, id: &JobId, ttl: Duration) -> Result<(), QueueError> {
        let mut state = self.state();
        state
            .cache
            .insert(target.to_string(), (id.clone(), Instant::now() + ttl));
        Ok(())
    }

    async fn jobs_of(&self, requester: &str) -> Result<Vec<JobId>, QueueError> {
        let state = self.state();
        Ok(state
            .by_key
            .get(requester)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn recent(&self) -> Result<Vec<JobId>, QueueError> {
        Ok(self.state().recent.iter().cloned().collect())
    }

    async fn request_cancel(&self, id: &JobId, _ttl: Duration) -> Result<(), QueueError> {
        let mut state = self.state();
        // Bounded like the records: a cancel of a job that no longer exists is dropped.
        if state.records.contains_key(id) {
            state.cancels.insert(id.clone());
        }
        Ok(())
    }

    async fn cancel_requested(&self, id: &JobId) -> Result<bool, QueueError> {
        Ok(self.state().cancels.contains(id))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::checks::Check;
    use crate::scan::job::ScanTarget;

    fn job(priority: u8) -> JobRecord {
        let mut job = JobRecord::new(
            "k",
            ScanTarget::Tunnel { name: "n".into() },
            vec![Check::Headers],
            vec![],
        );
        job.priority = priority;
        job
    }

    #[tokio::test]
    async fn priority_first_then_oldest_and_a_lapsed_lease_is_handed_on() {
        let jobs = MemoryJobs::new(Duration::from_secs(60));
        let (low, high, high2) = (job(1), job(7), job(7));
        for j in [&low, &high, &high2] {
            jobs.enqueue(j, 10).await.unwrap();
        }
        assert!(matches!(
            jobs.enqueue(&job(1), 3).await,
            Err(QueueError::Full(3))
        ));
        let visibility = Duration::from_millis(50);
        let first = jobs.take("a", visibility).await.unwrap().unwrap();
        assert_eq!(first.job, high.id);
        let second = jobs.take("a", visibility).await.unwrap().unwrap();
        assert_eq!(second.job, high2.id);
        jobs.complete(&second).await.unwrap();
        // Worker "a" dies holding `first`: after the visibility timeout "b" gets it again.
        tokio::time::sleep(Duration::from_millis(80)).await;
        let again = jobs.take("b", visibility).await.unwrap().unwrap();
        assert_eq!(again.job, high.id);
        let last = jobs.take("b", visibility).await.unwrap().unwrap();
        assert_eq!(last.job, low.id);
        assert!(jobs.take("b", visibility).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn keys_whose_jobs_expired_are_forgotten() {
        let jobs = MemoryJobs::new(Duration::from_millis(30));
        let old = job(1);
        jobs.save(&old).await.unwrap();
        jobs.remember(&old).await.unwrap();
        assert_eq!(
            jobs.jobs_of("k").await.unwrap(),
            std::slice::from_ref(&old.id)
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut other = job(1);
        other.requester = "other".into();
        jobs.save(&other).await.unwrap();
        assert!(jobs.jobs_of("k").await.unwrap().is_empty());
        assert!(!jobs.state().by_key.contains_key("k"));
        assert!(jobs.recent().await.unwrap().is_empty());
    }
}
