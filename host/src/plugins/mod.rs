//! Policy plugins: WebAssembly components that decide names, rate limits, what happens to
//! each request, and scan admission.
//!
//! By job:
//! - [`roles`]: the three roles as types (bindgen worlds) and what a valid answer is;
//! - [`runtime`]: the engine, loading, per-call limits and the one invoke-and-validate path,
//!   which tells the plugin's own failures (benching) from host faults (never blamed);
//! - [`set`]: the plugin set ([`PolicyPlugins`]): one plugin per role, the bundled one or a
//!   file from the plugins directory, reloaded atomically when the directory changes;
//! - [`fallback`]: what the host answers when a plugin cannot, and the policy traits;
//! - [`leases`]: rate-limit answers reused without a call (leases, recent denials);
//! - [`files`]: reading plugin files and sidecars (blocking; run off the async runtime);
//! - [`host_api`]: what a plugin can reach; [`tools`]: `p0rt plugin …`;
//!   [`scaffold`]: `p0rt plugin new`.

pub mod bindings;
pub mod fallback;
pub mod files;
pub mod host_api;
pub mod leases;
pub mod roles;
pub mod runtime;
pub mod scaffold;
pub mod set;
pub mod tools;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use self::fallback::FALLBACK_REQUESTS_PER_IP_PER_MINUTE;
pub use self::files::{Sidecar, bundled, plugin_files, read_plugin_file};
pub use self::runtime::{AnyPlugin, Origin, Plugin, PluginInfo, PluginSpec, Runtime};
pub use self::set::{PluginOptions, PluginStatus, PolicyPlugins, RELOAD_DEBOUNCE};
pub use crate::policy::{
    LabelApproval, NameChoice, NamingInput, RateDecision, RequestFacts, RequestVerdict,
    ScanDecision, ScanJob,
};

/// The kinds of policy. Each request meets the rate limiter first, then the request policy.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Naming,
    RateLimit,
    RequestPolicy,
    ScanAdmission,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Naming,
        Role::RateLimit,
        Role::RequestPolicy,
        Role::ScanAdmission,
    ];

    /// The WIT interface the role's world exports.
    pub fn interface(self) -> &'static str {
        match self {
            Role::Naming => "naming",
            Role::RateLimit => "rate-limit",
            Role::RequestPolicy => "request-policy",
            Role::ScanAdmission => "scan-admission",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.interface())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    #[error(
        "file is {size} bytes, over the {} byte limit for plugins",
        runtime::MAX_PLUGIN_BYTES
    )]
    TooLarge { size: usize },
    #[error("cannot be compiled (not a valid component, or over the host's limits): {0}")]
    Compile(String),
    #[error(
        "needs imports the host does not provide (plugins get only p0rt:policy and an empty WASI): {0}"
    )]
    Link(String),
    #[error(
        "implements no p0rt:policy world{} (its exports: {})",
        expected.map(|r| format!(" for role {r}")).unwrap_or_default(),
        if exports.is_empty() { "none".to_string() } else { exports.join(", ") }
    )]
    WrongWorld {
        expected: Option<Role>,
        exports: Vec<String>,
    },
    #[error("implements several roles ({roles:?}); set \"role\" in its sidecar .json file")]
    Ambiguous { roles: Vec<Role> },
    #[error("failed to instantiate: {0}")]
    Instantiate(String),
    #[error("init refused its configuration: {0}")]
    InitRefused(String),
    #[error("{0}")]
    Trap(String),
    #[error("did not finish within {} ms", .0.as_millis())]
    Timeout(std::time::Duration),
    /// The host failed the call (a store or Redis error in a host import, host waits that
    /// used up the call's time); never counted against the plugin.
    #[error("host fault, not counted against the plugin ({0})")]
    HostFault(String),
    #[error("returned an invalid decision: {0}")]
    BadOutput(String),
    #[error("{0}")]
    Benched(String),
    #[error("cannot read {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("sidecar {path}: {detail}")]
    Sidecar { path: PathBuf, detail: String },
}

impl PluginError {
    /// One fixed word for the kind of failure (a metrics label).
    pub fn word(&self) -> &'static str {
        match self {
            PluginError::Trap(_) => "trap",
            PluginError::Timeout(_) => "timeout",
            PluginError::HostFault(_) => "host_fault",
            PluginError::BadOutput(_) => "bad_output",
            PluginError::Benched(_) => "benched",
            PluginError::Instantiate(_) => "instantiate",
            PluginError::InitRefused(_) => "init_refused",
            PluginError::Engine(_)
            | PluginError::TooLarge { .. }
            | PluginError::Compile(_)
            | PluginError::Link(_)
            | PluginError::WrongWorld { .. }
            | PluginError::Ambiguous { .. }
            | PluginError::Read { .. }
            | PluginError::Sidecar { .. } => "load",
        }
    }
}
