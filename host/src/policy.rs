//! The policy seam: what the host asks its policies, and what they may answer. The tunnel
//! service and the HTTP edge depend on these traits only; the plugin set
//! ([`crate::plugins::PolicyPlugins`]) implements them with WebAssembly components and their
//! fallbacks, and tests can implement them in a few lines.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Input for a naming decision.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamingInput {
    pub ssh_key_hash: String,
    #[serde(default)]
    pub fingerprint: String,
    /// Set when the client asked for a sub-name with `-R label:80:…`: approve or refuse it.
    #[serde(default)]
    pub requested_label: Option<String>,
    #[serde(default)]
    pub attempt: u32,
}

/// What the naming policy decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "decision", content = "value")]
pub enum NameChoice {
    Name(String),
    Refused(String),
    /// No usable decision: use the built-in namer.
    Fallback(String),
}

/// What the naming policy says of a requested sub-name label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelApproval {
    Approved,
    Refused(String),
}

/// Input for a rate-limit decision.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestFacts {
    pub client_ip: String,
    pub host: String,
    pub name: String,
    pub owner_key_hash: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum RateDecision {
    Allow,
    Deny {
        status: u16,
        retry_after_seconds: Option<u32>,
        message: String,
    },
}

/// Input for a scan-admission decision.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanJob {
    pub requester_key_hash: String,
    pub target: String,
    pub ports: Vec<u16>,
    pub checks: Vec<String>,
    pub owned_names: Vec<String>,
    pub target_is_own_tunnel: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum ScanDecision {
    Accept {
        priority: u8,
        allowed_checks: Vec<String>,
    },
    Reject {
        reason: String,
    },
}

/// Chooses main names and approves sub-name labels.
#[async_trait]
pub trait NamingPolicy: Send + Sync {
    /// A candidate main name for `input.attempt`; [`NameChoice::Fallback`] hands naming to
    /// the built-in namer.
    async fn choose_name(&self, input: &NamingInput) -> NameChoice;
    /// Whether the key may serve the sub-name label in `input.requested_label` (already a
    /// valid, unreserved label).
    async fn approve_label(&self, input: &NamingInput) -> LabelApproval;
}

/// Admits or denies each HTTP request before it enters a tunnel.
#[async_trait]
pub trait RequestPolicy: Send + Sync {
    async fn check_request(&self, facts: RequestFacts) -> RateDecision;
}

/// Admits or rejects scan jobs. Fails closed.
#[async_trait]
pub trait ScanPolicy: Send + Sync {
    async fn admit_scan(&self, job: &ScanJob) -> ScanDecision;
}

/// The built-in policies: the built-in namer, every label approved, every request admitted,
/// scans rejected. What `--no-plugins` means, and a convenient policy for tests.
pub struct BuiltinPolicy;

#[async_trait]
impl NamingPolicy for BuiltinPolicy {
    async fn choose_name(&self, _input: &NamingInput) -> NameChoice {
        NameChoice::Fallback("plugins are disabled".into())
    }
    async fn approve_label(&self, _input: &NamingInput) -> LabelApproval {
        LabelApproval::Approved
    }
}

#[async_trait]
impl RequestPolicy for BuiltinPolicy {
    async fn check_request(&self, _facts: RequestFacts) -> RateDecision {
        RateDecision::Allow
    }
}

#[async_trait]
impl ScanPolicy for BuiltinPolicy {
    async fn admit_scan(&self, _job: &ScanJob) -> ScanDecision {
        ScanDecision::Reject {
            reason: "plugins are disabled; scans are denied".into(),
        }
    }
}
