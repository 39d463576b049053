//! `scan-guard`: admission rules for scan jobs.
//!
//! By default a key may scan only its own tunnels, at most 10 jobs an hour, at most 32 ports a
//! job, with every check the host offers. (Raw addresses are never the caller's own tunnel,
//! so with the default `own_tunnels_only` port checks are refused even when the operator
//! allowlists targets in the host: set it to `false` to allow them.) Configuration (sidecar
//! `scan-guard.json`):
//!
//! ```json
//! { "own_tunnels_only": true, "jobs_per_hour": 10, "max_ports": 32,
//!   "allowed_checks": ["reachability", "headers", "paths", "cors", "cookies", "errors", "ports"] }
//! ```

use std::cell::RefCell;

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit/v0.2", world: "scan-admission-plugin" });

use exports::p0rt::policy::scan_admission::{Admission, Decision, Guest as ScanAdmission, ScanJob};
use p0rt::policy::{cache, clock};

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    own_tunnels_only: bool,
    jobs_per_hour: u32,
    max_ports: usize,
    allowed_checks: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            own_tunnels_only: true,
            jobs_per_hour: 10,
            max_ports: 32,
            allowed_checks: [
                "reachability",
                "headers",
                "paths",
                "cors",
                "cookies",
                "errors",
                "ports",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
}

struct ScanGuard;

impl ScanAdmission for ScanGuard {
    fn admit(job: ScanJob) -> Decision {
        let config = CONFIG.with(|c| c.borrow().clone());
        if config.own_tunnels_only && !job.target_is_own_tunnel {
            return Decision::Reject(format!(
                "{} is not one of your tunnels; you may only scan your own",
                job.target
            ));
        }
        if job.ports.len() > config.max_ports {
            return Decision::Reject(format!(
                "{} ports asked for; at most {} per job",
                job.ports.len(),
                config.max_ports
            ));
        }
        let allowed: Vec<String> = job
            .checks
            .iter()
            .filter(|c| config.allowed_checks.contains(c))
            .cloned()
            .collect();
        if allowed.is_empty() {
            return Decision::Reject(format!(
                "none of the requested checks is allowed (allowed: {})",
                config.allowed_checks.join(", ")
            ));
        }
        let hour = clock::now_unix_seconds().div_euclid(3600);
        let key = format!("jobs:{}:{hour}", job.requester_key_hash);
        let count = cache::increment(&key, 1, Some(3600));
        if count > i64::from(config.jobs_per_hour) {
            return Decision::Reject(format!(
                "quota of {} scan jobs per hour used up",
                config.jobs_per_hour
            ));
        }
        // Small jobs first: fewer ports, higher priority.
        let priority = if job.ports.len() <= 4 { 7 } else { 3 };
        Decision::Accept(Admission {
            priority,
            allowed_checks: allowed,
        })
    }
}

impl exports::p0rt::policy::init::Guest for ScanGuard {
    fn init(config: String) -> Result<(), String> {
        let parsed: Config =
            serde_json::from_str(&config).map_err(|e| format!("scan-guard config: {e}"))?;
        CONFIG.with(|c| *c.borrow_mut() = parsed);
        Ok(())
    }
}

export!(ScanGuard);
