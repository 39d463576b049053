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
use super::bindings::{
    naming as wit_naming, naming_v2 as wit_naming_v2, rate_limit as wit_rate,
    rate_limit_v2 as wit_rate_v2, request_policy_v2 as wit_policy, scan_admission as wit_scan,
    scan_admission_v2 as wit_scan_v2,
};
use super::host_api::PluginState;
use super::runtime::{CallFuture, Plugin};
use http::{HeaderName, HeaderValue, StatusCode};

use crate::password::PasswordHash;
use crate::policy::{
    BasicAuth, HeaderEdit, HeaderEdits, LabelApproval, NameChoice, NamingInput, RateDecision,
    RateLease, RequestFacts, RequestVerdict, ScanDecision, ScanJob,
};

/// Most requests a rate limiter may lease in one answer.
pub const MAX_LEASE_REQUESTS: u32 = 64;
/// Longest a lease may hold.
pub const MAX_LEASE_MILLIS: u32 = 60_000;
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
/// Admits or denies HTTP requests by counting.
pub enum RateLimit {}
/// Decides what happens to HTTP requests (0.2 only).
pub enum RequestPolicy {}
/// Admits or rejects scan jobs.
pub enum ScanAdmission {}

/// A role's export indices or exports, for a plugin built against 0.1.x or 0.2.
#[derive(Clone)]
pub enum Versioned<V1, V2> {
    V1(V1),
    V2(V2),
}

/// Binds the marker type `$role` to its 0.1 world (module `$v1`) and 0.2 world (`$v2`).
/// Requests and answers are 0.2's types; a 0.1 plugin's are converted with `$to_v1` and
/// `$from_v1`. The 0.2 export is looked for first.
macro_rules! versioned_binding {
    ($role:ident, $v1:ident, $v2:ident, $indices:ident, $request:ty, $answer:ty,
     $iface:ident . $call:ident, $to_v1:path, $from_v1:path) => {
        impl RoleBinding for $role {
            const ROLE: Role = Role::$role;
            type Indices = Versioned<$v1::$indices, $v2::$indices>;
            type Exports = Versioned<$v1::$role, $v2::$role>;
            type Request = $request;
            type Answer = $answer;

            fn indices(pre: &InstancePre<PluginState>) -> wasmtime::Result<Self::Indices> {
                match $v2::$indices::new(pre) {
                    Ok(indices) => Ok(Versioned::V2(indices)),
                    Err(_) => $v1::$indices::new(pre).map(Versioned::V1),
                }
            }
            fn load(
                indices: &Self::Indices,
                store: &mut Store<PluginState>,
                instance: &Instance,
            ) -> wasmtime::Result<Self::Exports> {
                Ok(match indices {
                    Versioned::V1(i) => Versioned::V1(i.load(store, instance)?),
                    Versioned::V2(i) => Versioned::V2(i.load(store, instance)?),
                })
            }
            fn call<'a>(
                exports: &'a Self::Exports,
                store: &'a mut Store<PluginState>,
                request: &'a Self::Request,
            ) -> CallFuture<'a, Self::Answer> {
                match exports {
                    Versioned::V1(e) => Box::pin(async move {
                        let request = $to_v1(request);
                        e.$iface().$call(store, &request).await.map($from_v1)
                    }),
                    Versioned::V2(e) => Box::pin(e.$iface().$call(store, request)),
                }
            }
        }
    };
}

use wit_naming::exports::p0rt::policy::naming as naming_v1;
use wit_naming_v2::exports::p0rt::policy::naming::{NamingDecision, NamingRequest};
use wit_policy::exports::p0rt::policy::request_policy as policy_v2;
use wit_rate::exports::p0rt::policy::rate_limit as rate_v1;
use wit_rate_v2::exports::p0rt::policy::rate_limit::{
    Decision as RateAnswer, RequestFacts as RateFacts,
};
use wit_scan::exports::p0rt::policy::scan_admission as scan_v1;
use wit_scan_v2::exports::p0rt::policy::scan_admission::{
    Decision as ScanAnswer, ScanJob as WitJob,
};

fn naming_to_v1(r: &NamingRequest) -> naming_v1::NamingRequest {
    naming_v1::NamingRequest {
        ssh_key_hash: r.ssh_key_hash.clone(),
        fingerprint: r.fingerprint.clone(),
        requested_label: r.requested_label.clone(),
        attempt: r.attempt,
    }
}

fn naming_from_v1(d: naming_v1::NamingDecision) -> NamingDecision {
    match d {
        naming_v1::NamingDecision::Name(name) => NamingDecision::Name(name),
        naming_v1::NamingDecision::Refuse(reason) => NamingDecision::Refuse(reason),
    }
}

fn rate_to_v1(f: &RateFacts) -> rate_v1::RequestInfo {
    rate_v1::RequestInfo {
        client_ip: f.client_ip.clone(),
        host: f.host.clone(),
        name: f.name.clone(),
        owner_key_hash: f.owner_key_hash.clone(),
        method: f.method.clone(),
        path: f.path.clone(),
        headers: f.headers.clone(),
    }
}

fn rate_from_v1(d: rate_v1::Decision) -> RateAnswer {
    use wit_rate_v2::exports::p0rt::policy::rate_limit::Denial;
    match d {
        rate_v1::Decision::Allow => RateAnswer::Allow(None),
        rate_v1::Decision::Deny(denial) => RateAnswer::Deny(Denial {
            status: denial.status,
            retry_after_seconds: denial.retry_after_seconds,
            message: denial.message,
        }),
    }
}

fn scan_to_v1(j: &WitJob) -> scan_v1::ScanJob {
    scan_v1::ScanJob {
        requester_key_hash: j.requester_key_hash.clone(),
        target: j.target.clone(),
        ports: j.ports.clone(),
        checks: j.checks.clone(),
        owned_names: j.owned_names.clone(),
        target_is_own_tunnel: j.target_is_own_tunnel,
    }
}

fn scan_from_v1(d: scan_v1::Decision) -> ScanAnswer {
    use wit_scan_v2::exports::p0rt::policy::scan_admission::Admission;
    match d {
        scan_v1::Decision::Accept(a) => ScanAnswer::Accept(Admission {
            priority: a.priority,
            allowed_checks: a.allowed_checks,
        }),
        scan_v1::Decision::Reject(reason) => ScanAnswer::Reject(reason),
    }
}

versioned_binding!(
    Naming,
    wit_naming,
    wit_naming_v2,
    NamingIndices,
    NamingRequest,
    NamingDecision,
    p0rt_policy_naming.call_choose_name,
    naming_to_v1,
    naming_from_v1
);
versioned_binding!(
    RateLimit,
    wit_rate,
    wit_rate_v2,
    RateLimitIndices,
    RateFacts,
    RateAnswer,
    p0rt_policy_rate_limit.call_check,
    rate_to_v1,
    rate_from_v1
);
versioned_binding!(
    ScanAdmission,
    wit_scan,
    wit_scan_v2,
    ScanAdmissionIndices,
    WitJob,
    ScanAnswer,
    p0rt_policy_scan_admission.call_admit,
    scan_to_v1,
    scan_from_v1
);

/// The two questions of the request-policy role.
// Built once per call and passed by reference, never stored: boxing would only add an
// allocation to every request.
#[allow(clippy::large_enum_variant)]
pub enum PolicyCall {
    Check(policy_v2::RequestFacts),
    /// Whether tunnels with these options need `check` at all.
    NeedsCheck(Vec<(String, String)>),
}

pub enum PolicyReply {
    Verdict(policy_v2::Verdict),
    NeedsCheck(bool),
}

impl RoleBinding for RequestPolicy {
    const ROLE: Role = Role::RequestPolicy;
    type Indices = wit_policy::RequestPolicyIndices;
    type Exports = wit_policy::RequestPolicy;
    type Request = PolicyCall;
    type Answer = PolicyReply;

    fn indices(pre: &InstancePre<PluginState>) -> wasmtime::Result<Self::Indices> {
        wit_policy::RequestPolicyIndices::new(pre)
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
        let policy = exports.p0rt_policy_request_policy();
        match request {
            PolicyCall::Check(facts) => Box::pin(async move {
                policy
                    .call_check(store, facts)
                    .await
                    .map(PolicyReply::Verdict)
            }),
            PolicyCall::NeedsCheck(options) => Box::pin(async move {
                let needs = policy.call_needs_check(store, options).await;
                needs.map(PolicyReply::NeedsCheck)
            }),
        }
    }
}

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
        owned_names: input.owned_names.clone(),
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
            NamingDecision::GrantRequested => {
                Err("grant-requested answers a requested label, not a main-name request".into())
            }
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
                NamingDecision::GrantRequested => LabelApproval::GrantRequested,
                NamingDecision::Refuse(reason) => LabelApproval::Refused(clean_message(&reason)),
            })
        })
        .await
}

/// The host's [`RequestFacts`] as one of the two WIT records with the same fields
/// (`rate-limit` and `request-policy` each declare their own).
macro_rules! wit_facts {
    ($($record:ident)::+, $facts:expr) => {{
        let facts: RequestFacts = $facts;
        $($record)::+ {
            client_ip: facts.client_ip,
            host: facts.host,
            name: facts.name,
            owner_key_hash: facts.owner_key_hash,
            owner_tier: facts.owner_tier,
            method: facts.method,
            path: facts.path,
            headers: facts.headers,
            options: facts.options,
            scheme: facts.scheme,
        }
    }};
}

/// Whether one HTTP request may enter its tunnel.
pub async fn check_request(
    plugin: &Plugin<RateLimit>,
    facts: RequestFacts,
    fresh: bool,
) -> Result<RateDecision, super::PluginError> {
    let request = wit_facts!(RateFacts, facts);
    plugin
        .decide(request, fresh, |answer| match answer {
            RateAnswer::Allow(None) => Ok(RateDecision::allow()),
            RateAnswer::Allow(Some(lease)) => {
                if lease.requests > MAX_LEASE_REQUESTS || lease.millis > MAX_LEASE_MILLIS {
                    return Err(format!(
                        "lease of {} requests for {} ms is over {MAX_LEASE_REQUESTS} requests or {MAX_LEASE_MILLIS} ms",
                        lease.requests, lease.millis
                    ));
                }
                Ok(RateDecision::Allow {
                    lease: Some(RateLease {
                        requests: lease.requests,
                        millis: lease.millis,
                    }),
                })
            }
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

/// Most headers a request policy may put on an answer, or edit per direction.
pub const MAX_POLICY_HEADERS: usize = 16;
/// Largest answer body a request policy may give.
pub const MAX_POLICY_BODY_BYTES: usize = 4096;
/// Most basic-auth users in one verdict.
pub const MAX_AUTH_USERS: usize = 64;
/// Longest basic-auth realm or user name.
pub const MAX_AUTH_NAME_LEN: usize = 64;
/// Longest redirect location.
pub const MAX_LOCATION_LEN: usize = 2048;

/// Headers a policy may neither edit nor set on an answer: message framing and hop-by-hop
/// headers (the host owns them), and the edge's own error marker.
const PROTECTED_HEADERS: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    crate::scan::checks::EDGE_ERROR_HEADER,
];

fn header_pair(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{:?} is not a header name", clean_message(name)))?;
    if PROTECTED_HEADERS.contains(&name.as_str()) {
        return Err(format!("header {name} is the host's to set"));
    }
    let value = HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header {name} has control characters"))?;
    Ok((name, value))
}

fn header_edits(edits: Vec<policy_v2::HeaderEdit>) -> Result<Vec<HeaderEdit>, String> {
    if edits.len() > MAX_POLICY_HEADERS {
        return Err(format!(
            "{} header edits; at most {MAX_POLICY_HEADERS}",
            edits.len()
        ));
    }
    edits
        .into_iter()
        .map(|edit| match edit.value {
            Some(value) => header_pair(&edit.name, &value).map(|(name, value)| HeaderEdit {
                name,
                value: Some(value),
            }),
            None => header_pair(&edit.name, "").map(|(name, _)| HeaderEdit { name, value: None }),
        })
        .collect()
}

fn both_edits(edits: policy_v2::Edits) -> Result<HeaderEdits, String> {
    Ok(HeaderEdits {
        request: header_edits(edits.request)?,
        response: header_edits(edits.response)?,
    })
}

fn valid_location(location: &str) -> bool {
    let absolute = location.split_once("://").is_some_and(|(scheme, rest)| {
        (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
            && !rest.is_empty()
    });
    let path = location.starts_with('/') && !location.starts_with("//");
    location.len() <= MAX_LOCATION_LEN && (absolute || path)
}

fn basic_auth(auth: policy_v2::BasicAuth) -> Result<BasicAuth, String> {
    let realm_ok = auth.realm.len() <= MAX_AUTH_NAME_LEN
        && auth
            .realm
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
    if !realm_ok {
        return Err(format!(
            "realm must be at most {MAX_AUTH_NAME_LEN} printable characters without quotes"
        ));
    }
    if auth.users.len() > MAX_AUTH_USERS {
        return Err(format!(
            "{} users; at most {MAX_AUTH_USERS}",
            auth.users.len()
        ));
    }
    let users = auth
        .users
        .into_iter()
        .map(|(user, hash)| {
            let user_ok = !user.is_empty()
                && user.len() <= MAX_AUTH_NAME_LEN
                && user.bytes().all(|b| b.is_ascii_graphic() && b != b':');
            if !user_ok {
                return Err(format!(
                    "user {:?} is not a valid user name",
                    clean_message(&user)
                ));
            }
            let hash = PasswordHash::parse(&hash).map_err(|e| format!("user {user}: {e}"))?;
            Ok((user, hash))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(BasicAuth {
        realm: auth.realm,
        users,
        edits: both_edits(auth.edits)?,
    })
}

/// Checks a request policy's verdict; anything out of bounds is the plugin's bad output.
fn request_verdict(verdict: policy_v2::Verdict) -> Result<RequestVerdict, String> {
    use policy_v2::Verdict;
    Ok(match verdict {
        Verdict::Admit(edits) => RequestVerdict::Admit(both_edits(edits)?),
        Verdict::Deny(answer) => {
            if !(400..=599).contains(&answer.status) {
                return Err(format!(
                    "deny status {} is not a 4xx or 5xx code",
                    answer.status
                ));
            }
            if answer.body.len() > MAX_POLICY_BODY_BYTES {
                return Err(format!(
                    "answer body of {} bytes is over {MAX_POLICY_BODY_BYTES}",
                    answer.body.len()
                ));
            }
            if answer.headers.len() > MAX_POLICY_HEADERS {
                return Err(format!(
                    "{} answer headers; at most {MAX_POLICY_HEADERS}",
                    answer.headers.len()
                ));
            }
            let headers = answer
                .headers
                .iter()
                .map(|(name, value)| header_pair(name, value))
                .collect::<Result<Vec<_>, String>>()?;
            RequestVerdict::Deny {
                status: StatusCode::from_u16(answer.status).map_err(|e| e.to_string())?,
                headers,
                body: answer.body,
            }
        }
        Verdict::Redirect(redirect) => {
            if ![301, 302, 303, 307, 308].contains(&redirect.status) {
                return Err(format!(
                    "redirect status {} is not 301-303, 307 or 308",
                    redirect.status
                ));
            }
            if !valid_location(&redirect.location) {
                return Err(
                    "redirect location must be an http(s) URL or a path starting with /".into(),
                );
            }
            let location = HeaderValue::from_str(&redirect.location)
                .map_err(|_| "redirect location has control characters".to_string())?;
            RequestVerdict::Redirect {
                status: StatusCode::from_u16(redirect.status).map_err(|e| e.to_string())?,
                location,
            }
        }
        Verdict::RequireAuth(auth) => RequestVerdict::RequireAuth(basic_auth(auth)?),
    })
}

/// What the request policy decides for one request.
pub async fn decide_request(
    plugin: &Plugin<RequestPolicy>,
    facts: RequestFacts,
    fresh: bool,
) -> Result<RequestVerdict, super::PluginError> {
    let request = wit_facts!(policy_v2::RequestFacts, facts);
    plugin
        .decide(PolicyCall::Check(request), fresh, |reply| match reply {
            PolicyReply::Verdict(verdict) => request_verdict(verdict),
            PolicyReply::NeedsCheck(_) => Err("answered another question".into()),
        })
        .await
}

/// Whether the request policy needs to see requests to tunnels with `options`.
pub async fn needs_check(
    plugin: &Plugin<RequestPolicy>,
    options: Vec<(String, String)>,
) -> Result<bool, super::PluginError> {
    plugin
        .decide(
            PolicyCall::NeedsCheck(options),
            false,
            |reply| match reply {
                PolicyReply::NeedsCheck(needs) => Ok(needs),
                PolicyReply::Verdict(_) => Err("answered another question".into()),
            },
        )
        .await
}
