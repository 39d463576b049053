//! The policy seam: what the host asks its policies, and what they may answer. The tunnel
//! service and the HTTP edge depend on these traits only; the plugin set
//! ([`crate::plugins::PolicyPlugins`]) implements them with WebAssembly components and their
//! fallbacks, and tests can implement them in a few lines.

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use crate::password::PasswordHash;

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
    /// Names the key owns already: main name first, then granted requested names.
    #[serde(default)]
    pub owned_names: Vec<String>,
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
    /// Serve it as the sub-name `label-<main name>`.
    Approved,
    /// Grant the label itself as a name the key owns (naming 0.2's `grant-requested`).
    GrantRequested,
    Refused(String),
}

/// What the request policies see of one HTTP request.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestFacts {
    pub client_ip: String,
    pub host: String,
    pub name: String,
    pub owner_key_hash: String,
    pub owner_tier: Option<String>,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The tunnel owner's accepted options (`auth` passwords already hashed).
    pub options: Vec<(String, String)>,
    /// `http` or `https`.
    pub scheme: String,
}

/// What the rate limiter decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum RateDecision {
    /// Admit; with a lease, the limiter also counted that many further requests from the
    /// same client IP to the same tunnel, which the host admits without asking it again.
    Allow {
        #[serde(skip_serializing_if = "Option::is_none")]
        lease: Option<RateLease>,
    },
    Deny {
        status: u16,
        retry_after_seconds: Option<u32>,
        message: String,
    },
}

/// Requests a rate limiter has counted in advance (see [`RateDecision::Allow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RateLease {
    pub requests: u32,
    pub millis: u32,
}

impl RateDecision {
    /// Admit, no lease.
    pub fn allow() -> RateDecision {
        RateDecision::Allow { lease: None }
    }
}

/// Sets (value `Some`) or removes (`None`) one header. Checked by the host: a valid name,
/// a value without control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEdit {
    pub name: HeaderName,
    pub value: Option<HeaderValue>,
}

/// Header edits for an admitted request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Applied to the request before it enters the tunnel (`host` rewrites Host).
    pub request: Vec<HeaderEdit>,
    /// Applied to the backend's response.
    pub response: Vec<HeaderEdit>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

/// HTTP basic auth the host checks before forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasicAuth {
    /// Printable ASCII without `"` or `\\` (checked).
    pub realm: String,
    pub users: Vec<(String, PasswordHash)>,
    /// Applied once the credentials are accepted.
    pub edits: HeaderEdits,
}

/// What the request policies decided for one request (validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    Admit(HeaderEdits),
    /// Answered by the host without forwarding.
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: String,
    },
    /// The rate limiter's refusal (today's page, with `Retry-After`).
    Limited {
        status: StatusCode,
        retry_after_seconds: Option<u32>,
        message: String,
    },
    Redirect {
        status: StatusCode,
        location: HeaderValue,
    },
    RequireAuth(BasicAuth),
}

impl RequestVerdict {
    /// Admit, unchanged.
    pub fn admit() -> RequestVerdict {
        RequestVerdict::Admit(HeaderEdits::default())
    }
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

/// Decides each HTTP request before a channel to its tunnel is opened: the rate limiter,
/// then the request policy.
#[async_trait]
pub trait RequestPolicy: Send + Sync {
    async fn check_request(&self, facts: RequestFacts) -> RequestVerdict;

    /// The verdict for a request from `client_ip` to the tunnel `name` when it is known
    /// without the request's facts (`owner_options`: the owner set options), else `None`,
    /// and the edge builds the facts and asks [`check_request`](Self::check_request). Most
    /// requests have one: the rate limiter's lease covers them, or no policy is loaded. The
    /// answer must be the one `check_request` would give; by default there is none.
    fn check_cached(
        &self,
        _client_ip: &str,
        _name: &str,
        _owner_options: bool,
    ) -> Option<RequestVerdict> {
        None
    }
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
    async fn check_request(&self, _facts: RequestFacts) -> RequestVerdict {
        RequestVerdict::admit()
    }

    fn check_cached(&self, _: &str, _: &str, _: bool) -> Option<RequestVerdict> {
        Some(RequestVerdict::admit())
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
