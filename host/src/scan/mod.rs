//! Scan jobs: a tunnel owner's check of what their tunnel exposes before they share its URL.
//!
//! A request names a target (by default every live tunnel of the requester's key). For each
//! target the [scan policy](crate::policy::ScanPolicy) decides first: accept (priority,
//! allowed checks) or reject. Nothing is queued, resolved or contacted before that, and a
//! raw address (operator-allowlisted TCP port checks only) is resolved once, checked against
//! special ranges and pinned ([`target`]). An accepted job is answered from the cache when
//! the same target was scanned within the cache TTL; otherwise it is queued ([`queue`]: in
//! memory, or Redis Streams shared by every host), and a bounded pool of workers per host
//! runs it ([`runner`]) through this host's HTTP edge, like any visitor, within its time and
//! request budgets.
//!
//! Job states: queued → running → done | failed | rejected | cancelled.

pub mod checks;
pub mod job;
pub mod queue;
pub mod redis_queue;
mod runner;
pub mod target;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use checks::Check;
pub use job::{JobId, JobRecord, JobState, JobView, ScanTarget};
use queue::{JobBackend, QueueError};
use target::{TargetAllowlist, TargetError};
use tokio::sync::Notify;

use crate::names::{KeyHash, TunnelName};
use crate::policy::{ScanDecision, ScanJob, ScanPolicy};
use crate::tunnels::TunnelService;

/// Workers per host.
pub const DEFAULT_WORKERS: usize = 2;
/// Jobs waiting or running across the queue beyond which new ones are rejected.
pub const DEFAULT_MAX_WAITING: usize = 100;
/// Jobs one key may have waiting or running at once.
pub const DEFAULT_MAX_ACTIVE_PER_KEY: usize = 3;
/// How long a finished report answers a repeat scan of the same target.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(600);
/// How long job records are kept.
pub const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Time budget of one job.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// Request budget of one job (HTTP requests and TCP connects).
pub const DEFAULT_MAX_REQUESTS: u32 = 100;
/// Time one probe request may take.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A job whose worker has not renewed its claim for this long goes to another worker.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most TCP ports one job may name (the policy usually allows far fewer).
pub const MAX_PORTS_PER_JOB: usize = 1024;
/// Most targets one request expands to (a key's live tunnels).
pub const MAX_TARGETS_PER_REQUEST: usize = 16;

/// Operator settings (the `scan.*` configuration).
#[derive(Clone, Debug)]
pub struct ScanSettings {
    pub workers: usize,
    pub max_waiting: usize,
    pub max_active_per_key: usize,
    pub cache_ttl: Duration,
    pub record_ttl: Duration,
    pub job_timeout: Duration,
    pub max_requests: u32,
    pub request_timeout: Duration,
    pub visibility_timeout: Duration,
    /// Raw targets TCP port checks may contact; empty: none.
    pub allowed_targets: TargetAllowlist,
}

impl Default for ScanSettings {
    fn default() -> Self {
        ScanSettings {
            workers: DEFAULT_WORKERS,
            max_waiting: DEFAULT_MAX_WAITING,
            max_active_per_key: DEFAULT_MAX_ACTIVE_PER_KEY,
            cache_ttl: DEFAULT_CACHE_TTL,
            record_ttl: DEFAULT_RECORD_TTL,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            max_requests: DEFAULT_MAX_REQUESTS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            allowed_targets: TargetAllowlist::default(),
        }
    }
}

/// What someone asks to scan.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanRequest {
    /// A tunnel name (`eager-pixel-ant` or `eager-pixel-ant.<domain>`), or with `ports` an
    /// allowlisted host or address; `None`: every live tunnel of the requester.
    pub target: Option<String>,
    /// Checks to run; `None`: all HTTP checks (or `ports` for an address).
    pub checks: Option<Vec<String>>,
    pub ports: Vec<u16>,
}

/// Why a whole request was refused (a single target's refusal is a rejected job instead).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(
        "this key has no live tunnel to scan; start one with `ssh -R 80:localhost:<port> …` \
         and scan from another terminal, or name one: scan <name>"
    )]
    NoTunnels,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Queue(#[from] QueueError),
}

/// Where the scanner sends its requests: this host's own HTTP edge.
#[derive(Clone, Debug)]
pub struct EdgeAddress {
    pub addr: SocketAddr,
    /// The base domain, for `Host: <name>.<domain>`.
    pub domain: String,
}

pub struct ScanService {
    backend: Arc<dyn JobBackend>,
    policy: Arc<dyn ScanPolicy>,
    tunnels: Arc<TunnelService>,
    settings: ScanSettings,
    edge: EdgeAddress,
    /// Wakes this host's idle workers when it queues a job.
    wake: Notify,
    /// Names this process's workers in the queue.
    host_id: String,
}

impl ScanService {
    pub fn new(
        backend: Arc<dyn JobBackend>,
        policy: Arc<dyn ScanPolicy>,
        tunnels: Arc<TunnelService>,
        settings: ScanSettings,
        edge: EdgeAddress,
    ) -> Arc<ScanService> {
        let id: [u8; 4] = rand::random();
        Arc::new(ScanService {
            backend,
            policy,
            tunnels,
            settings,
            edge,
            wake: Notify::new(),
            host_id: format!("host-{}", hex::encode(id)),
        })
    }

    /// `"memory"` or `"redis"`.
    pub fn queue_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Admits, answers from the cache, or queues one job per target. A target the policy
    /// (or a cap) refuses comes back as a rejected job with the reason.
    pub async fn submit(
        &self,
        requester: &KeyHash,
        request: &ScanRequest,
    ) -> Result<Vec<JobView>, ScanError> {
        let targets = self.targets(requester, request).await?;
        let mut jobs = Vec::with_capacity(targets.len());
        for target in targets {
            jobs.push(self.submit_one(requester, request, target).await?);
        }
        Ok(jobs)
    }

    /// The request's targets; an address target is resolved, checked and pinned here.
    async fn targets(
        &self,
        requester: &KeyHash,
        request: &ScanRequest,
    ) -> Result<Vec<Result<ScanTarget, String>>, ScanError> {
        if request.ports.len() > MAX_PORTS_PER_JOB || request.ports.contains(&0) {
            return Err(ScanError::BadRequest(format!(
                "ports must be 1-65535, at most {MAX_PORTS_PER_JOB} of them"
            )));
        }
        let Some(target) = request.target.as_deref() else {
            if !request.ports.is_empty() {
                return Err(ScanError::BadRequest(
                    "ports need a target: scan --ports 22,80 <allowlisted host>".into(),
                ));
            }
            let mut names = self.tunnels.live_names_of(requester);
            if names.is_empty() {
                return Err(ScanError::NoTunnels);
            }
            names.sort();
            names.truncate(MAX_TARGETS_PER_REQUEST);
            return Ok(names
                .into_iter()
                .map(|name| {
                    Ok(ScanTarget::Tunnel {
                        name: name.to_string(),
                    })
                })
                .collect());
        };
        let target = target.trim().trim_end_matches('.').to_ascii_lowercase();
        if request.ports.is_empty() {
            let label = target
                .strip_suffix(&format!(".{}", self.edge.domain))
                .unwrap_or(&target);
            if let Ok(name) = TunnelName::parse(label) {
                return Ok(vec![Ok(ScanTarget::Tunnel {
                    name: name.to_string(),
                })]);
            }
        }
        // Not a tunnel name: only operator-allowlisted addresses, TCP ports only, and never
        // contacted (not even resolved) unless the allowlist names them.
        let ip = match target::resolve_pinned(&target, &self.settings.allowed_targets).await {
            Ok(ip) => ip,
            Err(e @ TargetError::Malformed(_)) => return Err(ScanError::BadRequest(e.to_string())),
            Err(e) => return Ok(vec![Err(format!("{target}: {e}"))]),
        };
        if request.ports.is_empty() {
            return Err(ScanError::BadRequest(format!(
                "{target} is not a tunnel name; an allowlisted address is scanned for TCP ports \
                 only: scan --ports 22,80 {target}"
            )));
        }
        Ok(vec![Ok(ScanTarget::Address { target, ip })])
    }

    /// The checks asked for, for this kind of target.
    fn requested_checks(request: &ScanRequest, target: &ScanTarget) -> Result<Vec<Check>, String> {
        let is_address = matches!(target, ScanTarget::Address { .. });
        let Some(names) = &request.checks else {
            return Ok(if is_address {
                vec![Check::Ports]
            } else {
                Check::HTTP.to_vec()
            });
        };
        let mut checks = Vec::new();
        for name in names {
            let check = Check::parse(name.trim()).ok_or_else(|| {
                format!(
                    "unknown check {name:?}; checks: {}, ports",
                    Check::HTTP.map(Check::as_str).join(", ")
                )
            })?;
            if (check == Check::Ports) != is_address {
                return Err(if is_address {
                    "an address is scanned for ports only".into()
                } else {
                    "the ports check is for allowlisted addresses, not tunnels".into()
                });
            }
            if !checks.contains(&check) {
                checks.push(check);
            }
        }
        if checks.is_empty() {
            return Err("no checks asked for".into());
        }
        Ok(checks)
    }

    async fn submit_one(
        &self,
        requester: &KeyHash,
        request: &ScanRequest,
        target: Result<ScanTarget, String>,
    ) -> Result<JobView, ScanError> {
        let target = match target {
            Ok(target) => target,
            Err(reason) => {
                let label = request.target.clone().unwrap_or_default();
                let placeholder = ScanTarget::Tunnel { name: label };
                return self
                    .reject(requester, placeholder, vec![], request, reason)
                    .await;
            }
        };
        let checks = Self::requested_checks(request, &target).map_err(ScanError::BadRequest)?;
        let mut ports = request.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        let owned = self.tunnels.live_names_of(requester);
        let own_tunnel = match &target {
            ScanTarget::Tunnel { name } => {
                self.tunnels.owner(name).await.as_ref() == Some(requester)
            }
            ScanTarget::Address { .. } => false,
        };
        let decision = self
            .policy
            .admit_scan(&ScanJob {
                requester_key_hash: requester.to_string(),
                target: target.label().to_string(),
                ports: ports.clone(),
                checks: checks.iter().map(|c| c.as_str().to_string()).collect(),
                owned_names: owned.iter().map(|n| n.to_string()).collect(),
                target_is_own_tunnel: own_tunnel,
            })
            .await;
        let (priority, allowed) = match decision {
            ScanDecision::Reject { reason } => {
                return self
                    .reject(requester, target, checks, request, reason)
                    .await;
            }
            ScanDecision::Accept {
                priority,
                allowed_checks,
            } => (
                priority,
                checks
                    .iter()
                    .copied()
                    .filter(|c| allowed_checks.iter().any(|a| a == c.as_str()))
                    .collect::<Vec<_>>(),
            ),
        };
        if let Some(view) = self.cached(&target, &allowed, &ports).await {
            return Ok(view);
        }
        let active = self.active_jobs_of(requester).await?;
        if active >= self.settings.max_active_per_key {
            let reason = format!(
                "you already have {active} scans queued or running; wait for them to finish"
            );
            return self
                .reject(requester, target, allowed, request, reason)
                .await;
        }
        let mut job = JobRecord::new(requester.as_str(), target, allowed, ports);
        job.priority = priority;
        job.max_requests = self.settings.max_requests;
        job.max_seconds = self.settings.job_timeout.as_secs() as u32;
        job.progress.total = job.checks.len() as u32;
        match self.backend.enqueue(&job, self.settings.max_waiting).await {
            Ok(()) => {}
            Err(QueueError::Full(n)) => {
                let reason = QueueError::Full(n).to_string();
                let (target, checks) = (job.target.clone(), job.checks.clone());
                return self
                    .reject(requester, target, checks, request, reason)
                    .await;
            }
            Err(e) => return Err(e.into()),
        }
        self.backend.remember(&job).await?;
        crate::metrics::scan_job(JobState::Queued.as_str());
        self.wake.notify_waiters();
        tracing::info!(job = %job.id, target = job.target.label(), "scan queued");
        Ok(JobView {
            record: job,
            from_cache: false,
        })
    }

    /// A report of the target still in the cache that covers these checks and ports.
    async fn cached(
        &self,
        target: &ScanTarget,
        checks: &[Check],
        ports: &[u16],
    ) -> Option<JobView> {
        let id = self.backend.cached(target.label()).await.ok()??;
        let record = self.backend.load(&id).await.ok()??;
        let covers = record.state == JobState::Done
            && record.target == *target
            && checks.iter().all(|c| record.checks.contains(c))
            && ports.iter().all(|p| record.ports.contains(p));
        covers.then_some(JobView {
            record,
            from_cache: true,
        })
    }

    async fn active_jobs_of(&self, requester: &KeyHash) -> Result<usize, QueueError> {
        let mut active = 0;
        for id in self.backend.jobs_of(requester.as_str()).await? {
            if let Some(job) = self.backend.load(&id).await?
                && !job.state.is_final()
            {
                active += 1;
            }
        }
        Ok(active)
    }

    async fn reject(
        &self,
        requester: &KeyHash,
        target: ScanTarget,
        checks: Vec<Check>,
        request: &ScanRequest,
        reason: String,
    ) -> Result<JobView, ScanError> {
        let mut job = JobRecord::new(requester.as_str(), target, checks, request.ports.clone());
        job.finish(JobState::Rejected, Some(reason));
        tracing::info!(job = %job.id, target = job.target.label(), reason = job.error.as_deref().unwrap_or(""), "scan rejected");
        self.backend.save(&job).await?;
        self.backend.remember(&job).await?;
        Ok(JobView {
            record: job,
            from_cache: false,
        })
    }

    /// A job, if it exists and `viewer` may see it (`None`: the operator sees every job).
    pub async fn get(
        &self,
        id: &JobId,
        viewer: Option<&KeyHash>,
    ) -> Result<Option<JobRecord>, ScanError> {
        let job = self.backend.load(id).await?;
        Ok(job.filter(|j| viewer.is_none_or(|k| k.as_str() == j.requester)))
    }

    /// Recent jobs of `viewer` (`None`: of everyone), newest first.
    pub async fn list(&self, viewer: Option<&KeyHash>) -> Result<Vec<JobRecord>, ScanError> {
        let ids = match viewer {
            Some(key) => self.backend.jobs_of(key.as_str()).await?,
            None => self.backend.recent().await?,
        };
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(job) = self.backend.load(&id).await? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// Cancels a job `viewer` may see: a waiting one at once, a running one at its next check.
    /// `None` if there is no such job.
    pub async fn cancel(
        &self,
        id: &JobId,
        viewer: Option<&KeyHash>,
    ) -> Result<Option<JobRecord>, ScanError> {
        let Some(mut job) = self.get(id, viewer).await? else {
            return Ok(None);
        };
        if job.state.is_final() {
            return Ok(Some(job));
        }
        self.backend
            .request_cancel(id, self.settings.record_ttl)
            .await?;
        if job.state == JobState::Queued {
            job.finish(JobState::Cancelled, Some("cancelled before it ran".into()));
            self.backend.save(&job).await?;
        }
        tracing::info!(job = %job.id, "scan cancel requested");
        Ok(Some(job))
    }
}

#[cfg(test)]
mod tests;
