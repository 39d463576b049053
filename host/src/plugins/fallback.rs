//! What the host answers when a plugin cannot (the brief's contract), and the policy traits
//! the rest of the host sees:
//!
//! - naming → the host's built-in namer (still stable per key); a sub-name label the plugin
//!   could not judge is approved (the built-in rule: any valid label under the key's name);
//! - rate limiting → a built-in conservative limiter (fail open, never unlimited);
//! - scan admission → deny (fail closed).

use std::time::Duration;

use super::runtime::PluginInfo;
use super::{PluginError, PolicyPlugins, roles};
use crate::policy::{
    LabelApproval, NameChoice, NamingInput, NamingPolicy, RateDecision, RequestFacts,
    RequestPolicy, ScanDecision, ScanJob, ScanPolicy,
};

/// Requests per minute per client IP allowed by the built-in limiter that stands in for a
/// failed rate-limit plugin.
pub const FALLBACK_REQUESTS_PER_IP_PER_MINUTE: i64 = 600;

/// The naming answer when the plugin gave none.
pub fn name_fallback(plugin: &PluginInfo, error: &PluginError) -> NameChoice {
    NameChoice::Fallback(format!("plugin {}: {error}", plugin.id()))
}

/// The scan answer when the plugin gave none: deny.
pub fn scan_fallback(error: &PluginError) -> ScanDecision {
    ScanDecision::Reject {
        reason: format!("scan policy unavailable ({error}); job denied"),
    }
}

/// Logs that `what` falls back. Benching and host faults were reported when they began,
/// so they are not repeated per call.
fn note(what: &str, plugin: &PluginInfo, error: &PluginError) {
    match error {
        PluginError::Benched(_) | PluginError::HostFault(_) => {
            tracing::debug!("{what}: plugin {}: {error}", plugin.id())
        }
        _ => tracing::warn!("{what}: plugin {}: {error}", plugin.id()),
    }
}

impl PolicyPlugins {
    /// Conservative stand-in: a fixed per-IP budget per minute.
    fn fallback_rate(&self, client_ip: &str) -> RateDecision {
        let now = crate::unix_now();
        let window = now.div_euclid(60);
        let key = format!("ip:{client_ip}:{window}");
        match self
            .fallback_limiter
            .increment(&key, 1, Some(Duration::from_secs(61)))
        {
            Ok(n) if n <= FALLBACK_REQUESTS_PER_IP_PER_MINUTE => RateDecision::Allow,
            _ => RateDecision::Deny {
                status: 429,
                retry_after_seconds: Some(((window + 1) * 60 - now).max(1) as u32),
                message: "too many requests".into(),
            },
        }
    }
}

#[async_trait::async_trait]
impl NamingPolicy for PolicyPlugins {
    async fn choose_name(&self, input: &NamingInput) -> NameChoice {
        let Some(plugin) = self.active().naming else {
            return NameChoice::Fallback("plugins are disabled".into());
        };
        roles::choose_name(&plugin, input, false)
            .await
            .unwrap_or_else(|e| {
                note("naming falls back to the built-in namer", &plugin.info, &e);
                name_fallback(&plugin.info, &e)
            })
    }

    async fn approve_label(&self, input: &NamingInput) -> LabelApproval {
        let Some(plugin) = self.active().naming else {
            return LabelApproval::Approved;
        };
        roles::approve_label(&plugin, input, false)
            .await
            .unwrap_or_else(|e| {
                note(
                    "label approval falls back to the built-in rule",
                    &plugin.info,
                    &e,
                );
                LabelApproval::Approved
            })
    }
}

#[async_trait::async_trait]
impl RequestPolicy for PolicyPlugins {
    async fn check_request(&self, facts: RequestFacts) -> RateDecision {
        if !self.enabled() {
            return RateDecision::Allow;
        }
        // Kept for the fallback; the facts themselves move into the plugin call.
        let client_ip = facts.client_ip.clone();
        if let Some(plugin) = self.active().rate_limit {
            match roles::check_request(&plugin, facts, false).await {
                Ok(decision) => return decision,
                Err(e) => note(
                    "rate limiting falls back to the built-in limiter",
                    &plugin.info,
                    &e,
                ),
            }
        }
        self.fallback_rate(&client_ip)
    }
}

#[async_trait::async_trait]
impl ScanPolicy for PolicyPlugins {
    async fn admit_scan(&self, job: &ScanJob) -> ScanDecision {
        match self.active().scan_admission {
            Some(plugin) => roles::admit_scan(&plugin, job, false)
                .await
                .unwrap_or_else(|e| scan_fallback(&e)),
            None => ScanDecision::Reject {
                reason: "no scan admission policy is loaded; scans are denied".into(),
            },
        }
    }
}
