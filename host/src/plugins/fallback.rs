//! What the host answers when a plugin cannot (the brief's contract), and the policy traits
//! the rest of the host sees:
//!
//! - naming → the host's built-in namer (still stable per key); a sub-name label the plugin
//!   could not judge is approved (the built-in rule: any valid label under the key's name);
//! - rate limiting → a built-in conservative limiter (fail open, never unlimited);
//! - request policy → for a tunnel whose owner set options (`allow=`, `auth=`…), deny with
//!   503: those options may be what keeps the tunnel private, so a request the policy could
//!   not judge never reaches it; for a tunnel without options, admit unchanged (as the rate
//!   limiter's fallback, the host keeps serving);
//! - scan admission → deny (fail closed).

use std::sync::Arc;
use std::time::Duration;

use super::roles::RoleBinding;
use super::roles::{RateLimit, RequestPolicy as RequestPolicyRole};
use super::runtime::{Plugin, PluginInfo};
use super::{PluginError, PolicyPlugins, Role, roles};
use crate::policy::{
    LabelApproval, NameChoice, NamingInput, NamingPolicy, RateDecision, RequestFacts,
    RequestPolicy, RequestVerdict, ScanDecision, ScanJob, ScanPolicy,
};

/// Requests per minute per client IP allowed by the built-in limiter that stands in for a
/// failed rate-limit plugin.
pub const FALLBACK_REQUESTS_PER_IP_PER_MINUTE: i64 = 600;

/// Counts one answer of `plugin` (see [`crate::metrics::DecisionCounters`]).
fn decided<B: RoleBinding>(plugin: &Plugin<B>, verdict: &'static str) {
    plugin
        .info
        .counts
        .decisions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    debug_assert_eq!(B::ROLE, plugin.info.role);
    plugin.info.decisions.inc(verdict);
}

fn rate_word(decision: &RateDecision) -> &'static str {
    match decision {
        RateDecision::Allow { .. } => "allow",
        RateDecision::Deny { .. } => "deny",
    }
}

fn verdict_word(verdict: &RequestVerdict) -> &'static str {
    match verdict {
        RequestVerdict::Admit(_) => "admit",
        RequestVerdict::Deny { .. } => "deny",
        RequestVerdict::Limited { .. } => "limit",
        RequestVerdict::Redirect { .. } => "redirect",
        RequestVerdict::RequireAuth(_) => "require_auth",
    }
}

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

/// Logs (and counts) that `what` falls back. Benching and host faults were reported when
/// they began, so they are not repeated per call.
fn note(what: &str, plugin: &PluginInfo, error: &PluginError) {
    crate::metrics::plugin_fallback(plugin.role.interface(), error.word());
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
            Ok(n) if n <= FALLBACK_REQUESTS_PER_IP_PER_MINUTE => RateDecision::allow(),
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
            .inspect(|choice| {
                let verdict = match choice {
                    NameChoice::Name(_) => "name",
                    NameChoice::Refused(_) => "refuse",
                    NameChoice::Fallback(_) => "fallback",
                };
                decided(&plugin, verdict);
            })
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
            .inspect(|approval| {
                let verdict = match approval {
                    LabelApproval::Approved => "approve",
                    LabelApproval::GrantRequested => "grant",
                    LabelApproval::Refused(_) => "refuse",
                };
                decided(&plugin, verdict);
            })
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

/// The request-policy answer when the plugin gave none for a tunnel with options: 503.
pub fn request_policy_fallback() -> RequestVerdict {
    RequestVerdict::Deny {
        status: http::StatusCode::SERVICE_UNAVAILABLE,
        headers: vec![(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("5"),
        )],
        body: "the tunnel's access policy is unavailable right now; try again shortly".into(),
    }
}

impl PolicyPlugins {
    /// The rate limiter's answer (its plugin, or the built-in limiter when it fails).
    async fn rate(
        &self,
        plugin: Option<&Arc<Plugin<RateLimit>>>,
        facts: RequestFacts,
    ) -> RateDecision {
        if let Some(plugin) = plugin
            && let Some(decision) = plugin.leases.take(&facts.client_ip, &facts.name)
        {
            decided(plugin, rate_word(&decision));
            return decision;
        }
        let (client_ip, name) = (facts.client_ip.clone(), facts.name.clone());
        if let Some(plugin) = plugin {
            match roles::check_request(plugin, facts, false).await {
                Ok(decision) => {
                    decided(plugin, rate_word(&decision));
                    plugin.leases.note(&client_ip, &name, &decision);
                    return decision;
                }
                Err(e) => note(
                    "rate limiting falls back to the built-in limiter",
                    &plugin.info,
                    &e,
                ),
            }
        }
        self.fallback_rate(&client_ip)
    }

    /// Whether the request policy must see this request: always for a tunnel with owner
    /// options; for one without, as the plugin answered `needs-check` once (true if it
    /// could not answer).
    async fn policy_applies(
        &self,
        plugin: &Plugin<RequestPolicyRole>,
        facts: &RequestFacts,
    ) -> bool {
        if !facts.options.is_empty() {
            return true;
        }
        if let Some(needs) = plugin.memo.get() {
            return *needs;
        }
        match roles::needs_check(plugin, Vec::new()).await {
            Ok(needs) => *plugin.memo.get_or_init(|| needs),
            Err(e) => {
                note(
                    "needs-check failed; checking every request",
                    &plugin.info,
                    &e,
                );
                true
            }
        }
    }
}

/// The verdict for a refusal of the rate limiter; `None` for an admission.
fn limited(rate: RateDecision) -> Option<RequestVerdict> {
    match rate {
        RateDecision::Deny {
            status,
            retry_after_seconds,
            message,
        } => Some(RequestVerdict::Limited {
            status: http::StatusCode::from_u16(status)
                .unwrap_or(http::StatusCode::TOO_MANY_REQUESTS),
            retry_after_seconds,
            message,
        }),
        RateDecision::Allow { .. } => None,
    }
}

#[async_trait::async_trait]
impl RequestPolicy for PolicyPlugins {
    /// Known without the facts: with plugins disabled, admit; when the request policy does
    /// not apply (none loaded, or it answered `needs-check` false and the owner set no
    /// options), the rate limiter's held answer (a lease, or a recent denial), exactly as
    /// [`check_request`](RequestPolicy::check_request) would use it.
    fn check_cached(
        &self,
        client_ip: &str,
        name: &str,
        owner_options: bool,
    ) -> Option<RequestVerdict> {
        if !self.enabled() {
            return Some(RequestVerdict::admit());
        }
        let active = self.active();
        if let Some(policy) = &active.request_policy
            && (owner_options || policy.memo.get() != Some(&false))
        {
            return None;
        }
        let plugin = active.rate_limit.as_ref()?;
        let decision = plugin.leases.take(client_ip, name)?;
        decided(plugin, rate_word(&decision));
        Some(limited(decision).unwrap_or_else(RequestVerdict::admit))
    }

    async fn check_request(&self, facts: RequestFacts) -> RequestVerdict {
        if !self.enabled() {
            return RequestVerdict::admit();
        }
        let active = self.active();
        let policy = match active.request_policy {
            Some(plugin) if self.policy_applies(&plugin, &facts).await => Some(plugin),
            _ => None,
        };
        // The facts are copied for the rate limiter only when the request policy needs them too.
        let (rate, facts) = match policy {
            Some(_) => (
                self.rate(active.rate_limit.as_ref(), facts.clone()).await,
                Some(facts),
            ),
            None => (self.rate(active.rate_limit.as_ref(), facts).await, None),
        };
        if let Some(limited) = limited(rate) {
            return limited;
        }
        let (Some(plugin), Some(facts)) = (policy, facts) else {
            return RequestVerdict::admit();
        };
        let owner_restricted = !facts.options.is_empty();
        roles::decide_request(&plugin, facts, false)
            .await
            .inspect(|verdict| decided(&plugin, verdict_word(verdict)))
            .unwrap_or_else(|e| {
                if owner_restricted {
                    note(
                        "request policy fails closed (503, the owner set options)",
                        &plugin.info,
                        &e,
                    );
                    request_policy_fallback()
                } else {
                    note("request policy falls back to admitting", &plugin.info, &e);
                    RequestVerdict::admit()
                }
            })
    }
}

#[async_trait::async_trait]
impl ScanPolicy for PolicyPlugins {
    async fn admit_scan(&self, job: &ScanJob) -> ScanDecision {
        match self.active().scan_admission {
            Some(plugin) => roles::admit_scan(&plugin, job, false)
                .await
                .inspect(|decision| {
                    let verdict = match decision {
                        ScanDecision::Accept { .. } => "accept",
                        ScanDecision::Reject { .. } => "reject",
                    };
                    decided(&plugin, verdict);
                })
                .unwrap_or_else(|e| {
                    crate::metrics::plugin_fallback(Role::ScanAdmission.interface(), e.word());
                    scan_fallback(&e)
                }),
            None => {
                crate::metrics::plugin_fallback(Role::ScanAdmission.interface(), "no_plugin");
                ScanDecision::Reject {
                    reason: "no scan admission policy is loaded; scans are denied".into(),
                }
            }
        }
    }
}
