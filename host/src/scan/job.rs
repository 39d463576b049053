//! A scan job's record: what was asked, what the policy allowed, where it is, what it found.
//! The same JSON in memory and in Redis (`{prefix}job:scans:id:{id}`), so any host can show
//! any job.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::checks::{Check, Finding, Severity};

/// Most progress lines a record keeps (a job has a handful of checks per target).
pub const MAX_PROGRESS_LINES: usize = 64;
/// Most findings a record keeps; a job that finds more says so in its last progress line.
pub const MAX_FINDINGS: usize = 100;

/// A scan job's id: `s` and 20 random hex digits. Parsed strictly, since it comes from URLs
/// and becomes part of a Redis key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    pub fn random() -> JobId {
        let bytes: [u8; 10] = rand::random();
        JobId(format!("s{}", hex::encode(bytes)))
    }

    pub fn parse(text: &str) -> Option<JobId> {
        let digits = text.strip_prefix('s')?;
        (digits.len() == 20
            && digits
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| JobId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Rejected,
    Cancelled,
}

impl JobState {
    /// Done, failed, rejected or cancelled: nothing will change it again.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Rejected => "rejected",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What a job scans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ScanTarget {
    /// A tunnel name, probed through this host's HTTP edge like any visitor.
    Tunnel { name: String },
    /// An operator-allowlisted address, TCP ports only; `ip` was resolved and checked once
    /// at admission and is the only address the job ever contacts.
    Address { target: String, ip: IpAddr },
}

impl ScanTarget {
    /// The target as the user named it (and the key of its cached report).
    pub fn label(&self) -> &str {
        match self {
            ScanTarget::Tunnel { name } => name,
            ScanTarget::Address { target, .. } => target,
        }
    }
}

/// How far a job has got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u32,
    pub total: u32,
    /// One line per check finished, in order.
    pub lines: Vec<String>,
}

/// Unix time in milliseconds, for job timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One scan job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub state: JobState,
    /// Key hash of whoever asked for it.
    pub requester: String,
    pub target: ScanTarget,
    /// The checks the policy allowed (for rejected jobs: those asked for).
    pub checks: Vec<Check>,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// 0 (lowest) to 9, from the policy.
    pub priority: u8,
    /// Request budget of the job.
    pub max_requests: u32,
    /// Time budget of the job, in seconds.
    pub max_seconds: u32,
    pub created_at_ms: i64,
    #[serde(default)]
    pub started_at_ms: Option<i64>,
    #[serde(default)]
    pub finished_at_ms: Option<i64>,
    /// Times a worker started it (more than one after a worker died mid-job).
    #[serde(default)]
    pub attempts: u32,
    /// Host id of the worker running or last running it.
    #[serde(default)]
    pub worker: Option<String>,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub findings: Vec<Finding>,
    /// Why it was rejected or failed.
    #[serde(default)]
    pub error: Option<String>,
}

impl JobRecord {
    pub fn new(requester: &str, target: ScanTarget, checks: Vec<Check>, ports: Vec<u16>) -> Self {
        JobRecord {
            id: JobId::random(),
            state: JobState::Queued,
            requester: requester.to_string(),
            target,
            checks,
            ports,
            priority: 0,
            max_requests: 0,
            max_seconds: 0,
            created_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            attempts: 0,
            worker: None,
            progress: Progress::default(),
            findings: Vec::new(),
            error: None,
        }
    }

    /// Moves to a final state now.
    pub fn finish(&mut self, state: JobState, error: Option<String>) {
        crate::metrics::scan_job(state.as_str());
        self.state = state;
        self.error = error;
        self.finished_at_ms = Some(now_ms());
    }

    pub fn add_progress(&mut self, line: String) {
        self.progress.done = (self.progress.done + 1).min(self.progress.total.max(1));
        if self.progress.lines.len() < MAX_PROGRESS_LINES {
            self.progress.lines.push(line);
        }
    }

    pub fn add_findings(&mut self, findings: Vec<Finding>) {
        let room = MAX_FINDINGS.saturating_sub(self.findings.len());
        self.findings.extend(findings.into_iter().take(room));
        // Most severe first, stable within a severity (check order).
        self.findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    }

    /// Findings per severity, most severe first: `[(High, 1), (Low, 3)]`.
    pub fn severity_counts(&self) -> Vec<(Severity, usize)> {
        let mut counts = Vec::new();
        for severity in [
            Severity::High,
            Severity::Medium,
            Severity::Low,
            Severity::Info,
        ] {
            let n = self
                .findings
                .iter()
                .filter(|f| f.severity == severity)
                .count();
            if n > 0 {
                counts.push((severity, n));
            }
        }
        counts
    }
}

/// A job as answered to a user: the record, and whether it is a report from the cache.
#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub record: JobRecord,
    pub from_cache: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_strict() {
        let id = JobId::random();
        assert_eq!(JobId::parse(id.as_str()), Some(id.clone()));
        for bad in [
            "",
            "s",
            "x0123456789abcdef0123",
            "s0123456789ABCDEF0123",
            "s0123:*",
            "s0123456789abcdef01234",
        ] {
            assert_eq!(JobId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn records_round_trip_as_json() {
        let mut job = JobRecord::new(
            "ab",
            ScanTarget::Tunnel {
                name: "eager-pixel-ant".into(),
            },
            Check::HTTP.to_vec(),
            vec![],
        );
        job.add_progress("headers: 2 findings".into());
        let text = serde_json::to_string(&job).unwrap();
        assert_eq!(serde_json::from_str::<JobRecord>(&text).unwrap(), job);
    }
}
