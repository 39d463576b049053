//! The three roles as types: each binds a bindgen world (its export indices, instance and
//! call) and says what a valid answer is. A plugin of one role can only be asked that role's
//! question, so there is no "does not implement" at call time.
//!
//! Validation turns a plugin's answer into the host's decision; a rejected answer is the
//! plugin's bad output and counts toward benching. What happens on failure is the plugin
//! set's business (fallbacks), not this module's.

use wasmtime::Store;
use wasmtime::component::{Instance, InstancePre};

use super::Role;
use super::bindings::{naming as wit_naming, rate_limit as wit_rate, scan_admission as wit_scan};
use super::host_api::PluginState;
use super::runtime::{CallFuture, Plugin};
use crate::policy::{
    LabelApproval, NameChoice, NamingInput, RateDecision, RequestFacts, ScanDecision, ScanJob,
};

/// Longest message from a plugin shown to a user.
pub const MAX_PLUGIN_MESSAGE_CHARS: usize = 200;
/// Longest name a naming plugin may return (one DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// A role's world: how to find its exports and make its one call.
pub trait RoleBinding: Send + Sync + 'static {
    const ROLE: Role;
    /// Export indices resolved once per component (bindgen's `*Indices`).
    type Indices: Clone + Send + Sync + 'static;
    /// The role's exports in one instance (bindgen's world struct).
    type Exports: Send + 'static;
    type Request: Send + Sync + 'static;
    type Answer: Send + 'static;

    fn indices(pre: &InstancePre<PluginState>) -> wasmtime::Result<Self::Indices>;
    fn load(
        indices: &Self::Indices,
        store: &mut Store<PluginState>,
        instance: &Instance,
    ) -> wasmtime::Result<Self::Exports>;
    fn call<'a>(
        exports: &'a Self::Exports,
        store: &'a mut Store<PluginState>,
        request: &'a Self::Request,
    ) -> CallFuture<'a, Self::Answer>;
}

/// Names keys and approves sub-name labels.
pub enum Naming {}
/// Admits or denies HTTP requests.
pub enum RateLimit {}
/// Admits or rejects scan jobs.
pub enum ScanAdmission {}

/// Binds the marker type `$role` (named like its `Role` variant and its bindgen world
/// struct) to the world in module `$world`.
macro_rules! binding {
    ($role:ident, $world:ident, $indices:ident, $request:ty, $answer:ty, $iface:ident . $call:ident) => {
        impl RoleBinding for $role {
            const ROLE: Role = Role::$role;
            type Indices = $world::$indices;
            type Exports = $world::$role;
            type Request = $request;
            type Answer = $answer;

            fn indices(pre: &InstancePre<PluginState>) -> wasmtime::Result<Self::Indices> {
                $world::$indices::new(pre)
            }
            fn load(
                indices: &Self::Indices,
                store: &mut Store<PluginState>,
                instance: &Instance,
            ) -> wasmtime::Result<Self::Exports> {
                indices.load(store, instance)
            }
            fn call<'a>(
                exports: &'a Self::Exports,
                store: &'a mut Store<PluginState>,
                request: &'a Self::Request,
            ) -> CallFuture<'a, Self::Answer> {
                Box::pin(exports.$iface().$call(store, request))
            }
        }
    };
}

use wit_naming::exports::p0rt::policy::naming::{NamingDecision, NamingRequest};
use wit_rate::exports::p0rt::policy::rate_limit::{Decision as RateAnswer, RequestInfo};
use wit_scan::exports::p0rt::policy::scan_admission::{Decision as ScanAnswer, ScanJob as WitJob};

binding!(
    Naming,
    wit_naming,
    NamingIndices,
    NamingRequest,
    NamingDecision,
    p0rt_policy_naming.call_choose_name
);
binding!(
    RateLimit,
    wit_rate,
    RateLimitIndices,
    RequestInfo,
    RateAnswer,
    p0rt_policy_rate_limit.call_check
);
binding!(
    ScanAdmission,
    wit_scan,
    ScanAdmissionIndices,
    WitJob,
    ScanAnswer,
    p0rt_policy_scan_admission.call_admit
);

/// Makes a plugin-supplied message safe to show: printable, bounded.
fn clean_message(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_PLUGIN_MESSAGE_CHARS)
        .collect()
}

/// Checks a main name returned by a naming plugin: one DNS label, not reserved.
pub fn validate_plugin_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name of {} bytes is longer than {MAX_NAME_LEN}",
            name.len()
        ));
    }
    crate::names::check_dns_label(name)?;
    if crate::names::is_reserved(name) {
        return Err(format!("{name:?} is reserved"));
    }
    Ok(())
}

fn naming_request(input: &NamingInput) -> NamingRequest {
    NamingRequest {
        ssh_key_hash: input.ssh_key_hash.clone(),
        fingerprint: input.fingerprint.clone(),
        requested_label: input.requested_label.clone(),
        attempt: input.attempt,
    }
}

/// A main name for a key (`input.requested_label` is `None`): `Name` or `Refused`.
pub async fn choose_name(
    plugin: &Plugin<Naming>,
    input: &NamingInput,
    fresh: bool,
) -> Result<NameChoice, super::PluginError> {
    let request = naming_request(input);
    plugin
        .decide(request, fresh, |answer| match answer {
            NamingDecision::Name(name) => {
                validate_plugin_name(&name).map(|()| NameChoice::Name(name))
            }
            NamingDecision::Refuse(reason) => Ok(NameChoice::Refused(clean_message(&reason))),
        })
        .await
}

/// Approval of the sub-name label a client asked for. The host has already checked the
/// label, so any `name` answer approves it: it is never validated as a main name (a client
/// asking for `api` must not make the plugin look broken).
pub async fn approve_label(
    plugin: &Plugin<Naming>,
    input: &NamingInput,
    fresh: bool,
) -> Result<LabelApproval, super::PluginError> {
    let request = naming_request(input);
    plugin
        .decide(request, fresh, |answer| {
            Ok(match answer {
                NamingDecision::Name(_) => LabelApproval::Approved,
                NamingDecision::Refuse(reason) => LabelApproval::Refused(clean_message(&reason)),
            })
        })
        .await
}

/// Whether one HTTP request may enter its tunnel.
pub async fn check_request(
    plugin: &Plugin<RateLimit>,
    facts: RequestFacts,
    fresh: bool,
) -> Result<RateDecision, super::PluginError> {
    let request = RequestInfo {
        client_ip: facts.client_ip,
        host: facts.host,
        name: facts.name,
        owner_key_hash: facts.owner_key_hash,
        method: facts.method,
        path: facts.path,
        headers: facts.headers,
    };
    plugin
        .decide(request, fresh, |answer| match answer {
            RateAnswer::Allow => Ok(RateDecision::Allow),
            RateAnswer::Deny(denial) if !(400..=599).contains(&denial.status) => Err(format!(
                "deny status {} is not a 4xx or 5xx code",
                denial.status
            )),
            RateAnswer::Deny(denial) => Ok(RateDecision::Deny {
                status: denial.status,
                retry_after_seconds: denial.retry_after_seconds,
                message: clean_message(&denial.message),
            }),
        })
        .await
}

/// Whether a scan job may run, and with which of the requested checks.
pub async fn admit_scan(
    plugin: &Plugin<ScanAdmission>,
    job: &ScanJob,
    fresh: bool,
) -> Result<ScanDecision, super::PluginError> {
    let request = WitJob {
        requester_key_hash: job.requester_key_hash.clone(),
        target: job.target.clone(),
        ports: job.ports.clone(),
        checks: job.checks.clone(),
        owned_names: job.owned_names.clone(),
        target_is_own_tunnel: job.target_is_own_tunnel,
    };
    plugin
        .decide(request, fresh, |answer| match answer {
            ScanAnswer::Accept(admission) => {
                if admission.priority > 9 {
                    return Err(format!("priority {} is outside 0-9", admission.priority));
                }
                if let Some(extra) = admission
                    .allowed_checks
                    .iter()
                    .find(|c| !job.checks.contains(c))
                {
                    return Err(format!("allowed check {extra:?} was never requested"));
                }
                Ok(ScanDecision::Accept {
                    priority: admission.priority,
                    allowed_checks: admission.allowed_checks,
                })
            }
            ScanAnswer::Reject(reason) => Ok(ScanDecision::Reject {
                reason: clean_message(&reason),
            }),
        })
        .await
}
