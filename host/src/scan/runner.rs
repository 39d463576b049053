//! The workers: each takes one job at a time, renews its claim while it runs, saves progress
//! after every check, and stops at the job's time or request budget or when cancelled.

use std::sync::Arc;
use std::time::Duration;

use super::ScanService;
use super::checks::{self, Check, CheckError, HttpProbe, RequestBudget, Severity};
use super::job::{JobRecord, JobState, ScanTarget, now_ms};
use super::queue::Lease;
use crate::shutdown::Stop;

/// How often an idle worker asks the queue for work (Redis: other hosts' jobs).
pub const IDLE_POLL: Duration = Duration::from_millis(500);
/// Pause after the queue failed, before asking again.
pub const ERROR_BACKOFF: Duration = Duration::from_secs(2);
/// Starts of one job after which it fails instead of being tried again (each start after
/// the first means a worker died holding it).
pub const MAX_ATTEMPTS: u32 = 3;
/// Time a TCP connect of the port check may take.
pub const PORT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a job stopped before its last check.
enum Halt {
    Cancelled,
    Failed(String),
}

impl ScanService {
    /// Starts this host's workers; they stop taking jobs once `stop` fires.
    pub fn spawn_workers(self: &Arc<Self>, stop: Stop) {
        tracing::info!(
            "scan workers: {} as {} on the {} queue",
            self.settings.workers,
            self.host_id,
            self.backend.kind()
        );
        for n in 0..self.settings.workers {
            let (service, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move { service.work(n, stop).await });
        }
    }

    async fn work(self: Arc<Self>, n: usize, mut stop: Stop) {
        let worker = format!("{}-{n}", self.host_id);
        // Logged once per outage, not on every retry.
        let mut failing = false;
        loop {
            let pause = match self
                .backend
                .take(&worker, self.settings.visibility_timeout)
                .await
            {
                Ok(Some(lease)) => {
                    failing = false;
                    tokio::select! {
                        _ = self.run_leased(&worker, lease) => continue,
                        // The lease lapses and another worker (or host) runs the job again.
                        _ = stop.stopped() => return,
                    }
                }
                Ok(None) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("scan worker {worker}: the queue answers again");
                    }
                    IDLE_POLL
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            "scan worker {worker}: {e}; retrying every {ERROR_BACKOFF:?}"
                        );
                    }
                    ERROR_BACKOFF
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.wake.notified() => {}
                _ = stop.stopped() => return,
            }
        }
    }

    async fn run_leased(&self, worker: &str, lease: Lease) {
        let mut job = match self.backend.load(&lease.job).await {
            Ok(Some(job)) => job,
            Ok(None) => {
                // The record expired or was never written: nothing to run.
                let _ = self.backend.complete(&lease).await;
                return;
            }
            Err(e) => {
                tracing::warn!("scan worker {worker}: {e}; the job stays queued");
                return;
            }
        };
        let cancelled = self
            .backend
            .cancel_requested(&job.id)
            .await
            .unwrap_or(false);
        if job.state.is_final() || cancelled {
            if !job.state.is_final() {
                job.finish(JobState::Cancelled, Some("cancelled".into()));
                self.save(&job).await;
            }
            let _ = self.backend.complete(&lease).await;
            return;
        }
        if job.attempts >= MAX_ATTEMPTS {
            job.finish(
                JobState::Failed,
                Some(format!(
                    "gave up after {MAX_ATTEMPTS} attempts: a worker stopped during each"
                )),
            );
            self.save(&job).await;
            let _ = self.backend.complete(&lease).await;
            return;
        }
        job.state = JobState::Running;
        crate::metrics::scan_job(JobState::Running.as_str());
        job.attempts += 1;
        job.started_at_ms = Some(now_ms());
        job.worker = Some(worker.to_string());
        job.progress.done = 0;
        job.progress.total = job.checks.len() as u32;
        job.progress.lines.clear();
        job.findings.clear();
        self.save(&job).await;
        tracing::info!(job = %job.id, target = job.target.label(), attempt = job.attempts, "scan started");

        let heartbeat = {
            let (backend, worker, lease) =
                (self.backend.clone(), worker.to_string(), lease.clone());
            let every = self.settings.visibility_timeout / 3;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = backend.renew(&worker, &lease).await {
                        tracing::debug!("renewing scan lease: {e}");
                    }
                }
            })
        };
        let budget = RequestBudget::new(job.max_requests);
        let limit = Duration::from_secs(u64::from(job.max_seconds.max(1)));
        let outcome = tokio::time::timeout(limit, self.execute(&mut job, &budget)).await;
        heartbeat.abort();
        match outcome {
            Ok(Ok(())) => {
                job.finish(JobState::Done, None);
                // `scan.cache_ttl_seconds` 0: reports are never reused (Redis has no
                // zero expiry, so nothing is written rather than a key for 1 s).
                if !self.settings.cache_ttl.is_zero()
                    && let Err(e) = self
                        .backend
                        .set_cached(job.target.label(), &job.id, self.settings.cache_ttl)
                        .await
                {
                    tracing::warn!("caching scan report {}: {e}", job.id);
                }
            }
            Ok(Err(Halt::Cancelled)) => job.finish(JobState::Cancelled, Some("cancelled".into())),
            Ok(Err(Halt::Failed(reason))) => job.finish(JobState::Failed, Some(reason)),
            Err(_) => job.finish(
                JobState::Failed,
                Some(format!("time budget of {} s used up", limit.as_secs())),
            ),
        }
        self.save(&job).await;
        tracing::info!(job = %job.id, state = job.state.as_str(), findings = job.findings.len(), "scan finished");
        if let Err(e) = self.backend.complete(&lease).await {
            tracing::warn!("scan worker {worker}: completing {}: {e}", job.id);
        }
    }

    /// Saves a record; a failure is logged (the next save or the final one catches up).
    async fn save(&self, job: &JobRecord) {
        if let Err(e) = self.backend.save(job).await {
            tracing::warn!("saving scan job {}: {e}", job.id);
        }
    }

    async fn execute(&self, job: &mut JobRecord, budget: &RequestBudget) -> Result<(), Halt> {
        match job.target.clone() {
            ScanTarget::Tunnel { name } => {
                let probe = HttpProbe {
                    edge: self.edge.addr,
                    host: format!("{name}.{}", self.edge.domain),
                    name: name.clone(),
                    request_timeout: self.settings.request_timeout,
                };
                let mut skip: Option<String> = None;
                for check in job.checks.clone() {
                    if self
                        .backend
                        .cancel_requested(&job.id)
                        .await
                        .unwrap_or(false)
                    {
                        return Err(Halt::Cancelled);
                    }
                    let line = match &skip {
                        Some(why) => format!("{} on {name}: skipped ({why})", check.describe()),
                        None => match checks::run_http_check(check, &probe, budget).await {
                            Ok(findings) => {
                                if check == Check::Reachability
                                    && findings.iter().any(|f| f.severity == Severity::High)
                                {
                                    skip = Some(format!("{name} does not answer"));
                                }
                                let line = summary(check, &name, findings.len());
                                job.add_findings(findings);
                                line
                            }
                            Err(CheckError::BudgetExhausted) => {
                                skip = Some("request budget used up".into());
                                format!(
                                    "{} on {name}: skipped (request budget used up)",
                                    check.describe()
                                )
                            }
                            // The edge itself did not answer: nothing else can work.
                            Err(e @ CheckError::Unreachable(..))
                                if check == Check::Reachability =>
                            {
                                return Err(Halt::Failed(e.to_string()));
                            }
                            // One slow or broken path spoils only its own check.
                            Err(e @ CheckError::Unreachable(..)) => {
                                format!("{} on {name}: incomplete ({e})", check.describe())
                            }
                        },
                    };
                    job.add_progress(line);
                    self.save(job).await;
                }
                Ok(())
            }
            ScanTarget::Address { target, ip } => {
                let ports = job.ports.clone();
                let findings =
                    checks::run_port_check(&target, ip, &ports, PORT_CONNECT_TIMEOUT, budget)
                        .await
                        .map_err(|e| Halt::Failed(e.to_string()))?;
                let line = summary(Check::Ports, &target, findings.len());
                job.add_findings(findings);
                job.add_progress(line);
                self.save(job).await;
                Ok(())
            }
        }
    }
}

fn summary(check: Check, target: &str, findings: usize) -> String {
    match findings {
        0 => format!("{} on {target}: ok", check.describe()),
        1 => format!("{} on {target}: 1 finding", check.describe()),
        n => format!("{} on {target}: {n} findings", check.describe()),
    }
}
