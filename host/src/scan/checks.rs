//! What a scan looks at on one tunnel name, through p0rt's own HTTP edge (so it sees what
//! the public sees), and the TCP port check for operator-allowlisted targets.
//!
//! Every HTTP check sends a few plain HTTP/1.1 requests (one TCP connection each, bounded by
//! a timeout, bodies read up to [`MAX_PROBE_BODY_BYTES`]) and reports a [`Finding`] only on
//! positive evidence: a wrong finding costs the tunnel owner time and trust, so every check
//! prefers to stay silent when a response is ambiguous. Responses carrying
//! [`EDGE_ERROR_HEADER`] come from p0rt's edge, not from the tunnel's backend, and are never
//! judged as the backend's behaviour.
//!
//! Findings never quote secrets: cookie values and `.env` values are left out of `seen`, and
//! every `seen` is bounded to [`MAX_SEEN_CHARS`] with control characters stripped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONNECTION, CONTENT_TYPE, HOST, ORIGIN, SET_COOKIE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Most body bytes read from one probe response; the rest is never read.
pub const MAX_PROBE_BODY_BYTES: usize = 64 * 1024;

/// Longest `seen` of a finding, in characters.
pub const MAX_SEEN_CHARS: usize = 200;

/// Longest `title` of a finding, in characters (titles may carry a cookie name).
const MAX_TITLE_CHARS: usize = 200;

/// Ports one port check connects to at the same time.
pub const PORT_SCAN_CONCURRENCY: usize = 16;

/// Body length difference (bytes) under which a response with the soft-404 baseline's status
/// counts as the same page: soft-404 pages often echo the requested path, so lengths differ a little.
const SOFT_404_LENGTH_SLACK: usize = 32;

/// Longest body excerpt quoted in a `seen`, in characters.
const EXCERPT_CHARS: usize = 40;

/// Most variable names of an exposed `.env` listed in a `seen`.
const MAX_ENV_NAMES_SHOWN: usize = 5;

/// The user agent of every scan request, so operators and owners can recognise scans in logs.
const SCAN_USER_AGENT: &str = concat!("p0rt-scan/", env!("CARGO_PKG_VERSION"));

/// Header set by p0rt's edge on responses it produced itself (`client`, `tunnel`, `offline`, `host`).
pub const EDGE_ERROR_HEADER: &str = "x-p0rt-error";

/// The origin sent by the CORS check; `.invalid` can never be a real site.
const SCAN_ORIGIN: &str = "https://p0rt-scan.invalid";

/// Random bytes (hex-encoded) in the paths that must not exist on the backend.
const RANDOM_PATH_BYTES: usize = 8;

/// One kind of check a scan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    Reachability,
    Headers,
    Paths,
    Cors,
    Cookies,
    Errors,
    Ports,
}

impl Check {
    /// The HTTP checks, in the order they run (Reachability first).
    pub const HTTP: [Check; 6] = [
        Check::Reachability,
        Check::Headers,
        Check::Paths,
        Check::Cors,
        Check::Cookies,
        Check::Errors,
    ];

    /// Every check, for parsing.
    const ALL: [Check; 7] = [
        Check::Reachability,
        Check::Headers,
        Check::Paths,
        Check::Cors,
        Check::Cookies,
        Check::Errors,
        Check::Ports,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::Reachability => "reachability",
            Check::Headers => "headers",
            Check::Paths => "paths",
            Check::Cors => "cors",
            Check::Cookies => "cookies",
            Check::Errors => "errors",
            Check::Ports => "ports",
        }
    }

    /// The check named `s` (as [`Check::as_str`] spells it, ASCII case-insensitive).
    pub fn parse(s: &str) -> Option<Check> {
        Check::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// One short phrase for progress lines.
    pub fn describe(self) -> &'static str {
        match self {
            Check::Reachability => "reachability",
            Check::Headers => "security headers",
            Check::Paths => "exposed files and paths",
            Check::Cors => "CORS policy",
            Check::Cookies => "cookie flags",
            Check::Errors => "error pages",
            Check::Ports => "open TCP ports",
        }
    }
}

/// How much a finding matters.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

/// One problem a check saw.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    pub check: Check,
    pub severity: Severity,
    /// The tunnel name (or target address) it was seen on.
    pub target: String,
    /// One line: what is wrong, e.g. "/.env is publicly readable".
    pub title: String,
    /// What was seen, e.g. "GET /.env -> 200, 58 bytes, defines DB_PASSWORD (values hidden)"
    /// (at most MAX_SEEN_CHARS, control characters stripped).
    pub seen: String,
    /// Why it matters.
    pub why: String,
    /// How to fix it.
    pub fix: String,
}

/// Builds a finding, bounding and cleaning the text that may carry data from the network.
fn finding(
    check: Check,
    severity: Severity,
    target: &str,
    title: &str,
    seen: &str,
    why: &str,
    fix: &str,
) -> Finding {
    Finding {
        check,
        severity,
        target: target.to_string(),
        title: bounded(title, MAX_TITLE_CHARS),
        seen: bounded(seen, MAX_SEEN_CHARS),
        why: why.to_string(),
        fix: fix.to_string(),
    }
}

/// `s` without control characters, cut to `max` characters (the last one then being `…`).
fn bounded(s: &str, max: usize) -> String {
    let clean: Vec<char> = s.chars().filter(|c| !c.is_control()).collect();
    if clean.len() <= max {
        return clean.into_iter().collect();
    }
    let mut out: String = clean[..max.saturating_sub(1)].iter().collect();
    out.push('…');
    out
}

/// The start of a body as text, for quoting in `seen`.
fn excerpt(body: &[u8]) -> String {
    // Only a little is ever shown, so only a little is decoded.
    let head = &body[..body.len().min(EXCERPT_CHARS * 4)];
    bounded(String::from_utf8_lossy(head).trim(), EXCERPT_CHARS)
}

/// Requests one job may still send; shared by all checks of the job (a job's request budget).
#[derive(Debug)]
pub struct RequestBudget {
    remaining: AtomicU32,
}

impl RequestBudget {
    pub fn new(requests: u32) -> Self {
        RequestBudget {
            remaining: AtomicU32::new(requests),
        }
    }

    pub fn remaining(&self) -> u32 {
        self.remaining.load(Ordering::Relaxed)
    }

    /// Takes one request; false when none is left.
    pub fn try_take(&self) -> bool {
        self.try_take_n(1)
    }

    /// Takes `n` requests at once, or none of them when fewer are left.
    pub fn try_take_n(&self, n: u32) -> bool {
        self.remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(n))
            .is_ok()
    }
}

/// Where and how to send a check's requests.
#[derive(Clone, Debug)]
pub struct HttpProbe {
    pub edge: SocketAddr,
    /// `Host` header value, e.g. `eager-pixel-ant.localhost` (may carry `:port`).
    pub host: String,
    /// The tunnel name, for findings' `target`.
    pub name: String,
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the job's request budget is used up")]
    BudgetExhausted,
    #[error("{0} did not answer: {1}")]
    Unreachable(String, String),
}

/// One response, with at most MAX_PROBE_BODY_BYTES of its body.
struct ProbeResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl ProbeResponse {
    /// The first value of header `name` as text (lossy), if present.
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// The edge's error kind when p0rt's edge produced this response itself.
    fn edge_error(&self) -> Option<String> {
        self.header(EDGE_ERROR_HEADER)
            .map(|v| v.trim().to_ascii_lowercase())
    }

    fn content_type(&self) -> String {
        self.header(CONTENT_TYPE.as_str())
            .unwrap_or_default()
            .to_ascii_lowercase()
    }

    /// Whether the declared content type is HTML.
    fn declared_html(&self) -> bool {
        let ct = self.content_type();
        ct.contains("text/html") || ct.contains("application/xhtml")
    }

    /// Whether the response is an HTML page: declared so, or undeclared and starting with `<`.
    fn is_html(&self) -> bool {
        if self.declared_html() {
            return true;
        }
        self.header(CONTENT_TYPE.as_str()).is_none()
            && self.body.trim_ascii_start().starts_with(b"<")
    }

    /// Whether it is the same page as the soft-404 `baseline` (a backend that answers every
    /// path with one page is not exposing the path).
    fn looks_like(&self, baseline: &ProbeResponse) -> bool {
        self.status == baseline.status
            && (self.body == baseline.body
                || self.body.len().abs_diff(baseline.body.len()) <= SOFT_404_LENGTH_SLACK)
    }

    fn body_contains(&self, needle: &[u8]) -> bool {
        contains(&self.body, needle)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// A path that must not exist on the backend: `/p0rt-scan-<random hex>`.
fn random_path() -> String {
    let bytes: [u8; RANDOM_PATH_BYTES] = rand::random();
    format!("/p0rt-scan-{}", hex::encode(bytes))
}

/// Aborts the spawned connection task when the request is done or abandoned (timeout), so
/// an endless or stalled response never keeps a task alive.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends one request to the edge (taking one unit of the budget first) and reads the response.
/// Any failure to get a response — refused connection, timeout, broken HTTP — is Unreachable.
async fn send(
    probe: &HttpProbe,
    budget: &RequestBudget,
    method: Method,
    path: &str,
    extra_headers: &[(http::HeaderName, &str)],
    body: Bytes,
) -> Result<ProbeResponse, CheckError> {
    if !budget.try_take() {
        return Err(CheckError::BudgetExhausted);
    }
    let unreachable = |detail: String| CheckError::Unreachable(probe.name.clone(), detail);
    let host = HeaderValue::from_str(&probe.host)
        .map_err(|_| unreachable(format!("{:?} is not a valid Host header", probe.host)))?;
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host)
        .header(USER_AGENT, SCAN_USER_AGENT)
        .header(ACCEPT, "*/*")
        .header(CONNECTION, "close");
    for (name, value) in extra_headers {
        builder = builder.header(name, *value);
    }
    let request = builder
        .body(Full::new(body))
        .map_err(|e| unreachable(format!("could not build the request: {e}")))?;
    match tokio::time::timeout(probe.request_timeout, exchange(probe.edge, request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(detail)) => Err(unreachable(detail)),
        Err(_) => Err(unreachable(format!(
            "no response within {} ms",
            probe.request_timeout.as_millis()
        ))),
    }
}

/// One request on its own TCP connection; the caller bounds the time.
async fn exchange(
    edge: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<ProbeResponse, String> {
    let stream = TcpStream::connect(edge)
        .await
        .map_err(|e| format!("connect to {edge}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {edge}: {e}"))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        // Errors surface through send_request or the body; nothing to add here.
        let _ = conn.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request to {edge}: {e}"))?;
    let (parts, mut incoming) = response.into_parts();
    let mut body = Vec::new();
    while body.len() < MAX_PROBE_BODY_BYTES {
        match incoming.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = MAX_PROBE_BODY_BYTES - body.len();
                    body.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            // A body cut short still shows what it showed; judge what arrived.
            Some(Err(_)) | None => break,
        }
    }
    Ok(ProbeResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

async fn get(
    probe: &HttpProbe,
    budget: &RequestBudget,
    path: &str,
) -> Result<ProbeResponse, CheckError> {
    send(probe, budget, Method::GET, path, &[], Bytes::new()).await
}

/// Runs one HTTP check (not Ports: that returns no findings here) against the probe.
/// Reachability returns a High finding when the name does not answer — the caller then skips
/// the other checks of that name. A request that gets no response (refused, timed out) ends
/// the check with Unreachable; a used-up budget ends it with BudgetExhausted.
pub async fn run_http_check(
    check: Check,
    probe: &HttpProbe,
    budget: &RequestBudget,
) -> Result<Vec<Finding>, CheckError> {
    match check {
        Check::Reachability => check_reachability(probe, budget).await,
        Check::Headers => check_headers(probe, budget).await,
        Check::Paths => check_paths(probe, budget).await,
        Check::Cors => check_cors(probe, budget).await,
        Check::Cookies => check_cookies(probe, budget).await,
        Check::Errors => check_errors(probe, budget).await,
        Check::Ports => {
            tracing::warn!("run_http_check called with the ports check; use run_port_check");
            Ok(Vec::new())
        }
    }
}

async fn check_reachability(
    probe: &HttpProbe,
    budget: &RequestBudget,
) -> Result<Vec<Finding>, CheckError> {
    let response = get(probe, budget, "/").await?;
    let Some(kind) = response.edge_error() else {
        return Ok(Vec::new());
    };
    let message = String::from_utf8_lossy(&response.body);
    let first_line = message.lines().next().unwrap_or("").trim();
    let seen = format!(
        "GET / -> {} from p0rt's edge ({EDGE_ERROR_HEADER}: {kind}): {first_line}",
        response.status.as_u16()
    );
    if kind == "client" {
        // The edge refused the scan's own request: a fault of the scan, not of the tunnel.
        return Err(CheckError::Unreachable(probe.name.clone(), seen));
    }
    let fix = if kind == "host" {
        "check the name: no tunnel serves it; connect with `ssh -R` to get it served"
    } else {
        "keep `ssh -R` connected and your local service running"
    };
    Ok(vec![finding(
        Check::Reachability,
        Severity::High,
        &probe.name,
        &format!("{} does not answer", probe.name),
        &seen,
        "visitors get p0rt's error page instead of your site, and no other check can run",
        fix,
    )])
}

/// Security headers of `/`. Which headers are judged depends on the response, to avoid
/// findings that do not apply:
/// - version banners (`Server` with a digit, any `X-Powered-By`): on any backend response;
/// - `X-Content-Type-Options` and HSTS: on a 2xx/3xx answer (what visitors land on);
/// - CSP, `X-Frame-Options`, `Referrer-Policy`: only on a 2xx HTML page, since they protect
///   documents (an API or a redirect at `/` has no page to frame or script).
async fn check_headers(
    probe: &HttpProbe,
    budget: &RequestBudget,
) -> Result<Vec<Finding>, CheckError> {
    let response = get(probe, budget, "/").await?;
    if response.edge_error().is_some() {
        return Ok(Vec::new());
    }
    let status = response.status.as_u16();
    let seen_missing = |header: &str| format!("GET / -> {status}, no {header} header");
    let mut out = Vec::new();
    let mut add = |severity, title: &str, seen: String, why: &str, fix: &str| {
        out.push(finding(
            Check::Headers,
            severity,
            &probe.name,
            title,
            &seen,
            why,
            fix,
        ));
    };

    if response.status.is_success() && response.is_html() {
        let csp = response.header("content-security-policy");
        if csp.is_none() {
            add(
                Severity::Medium,
                "no Content-Security-Policy",
                seen_missing("Content-Security-Policy"),
                "without a CSP, any injected script (XSS) runs with full access to the page",
                "send a Content-Security-Policy header, e.g. `default-src 'self'`, and tighten it from there",
            );
        }
        let frame_ancestors = csp
            .as_deref()
            .is_some_and(|v| v.to_ascii_lowercase().contains("frame-ancestors"));
        if response.header("x-frame-options").is_none() && !frame_ancestors {
            add(
                Severity::Medium,
                "the page can be framed by any site (no X-Frame-Options or CSP frame-ancestors)",
                seen_missing("X-Frame-Options"),
                "another site can load the page in an invisible frame and trick visitors into clicking (clickjacking)",
                "send `X-Frame-Options: DENY` (or SAMEORIGIN), or CSP `frame-ancestors 'none'`",
            );
        }
        if response.header("referrer-policy").is_none() {
            add(
                Severity::Low,
                "no Referrer-Policy",
                seen_missing("Referrer-Policy"),
                "full URLs (which may carry tokens or private paths) can leak to other sites in the Referer header",
                "send `Referrer-Policy: strict-origin-when-cross-origin` (or `no-referrer`)",
            );
        }
    }

    if response.status.is_success() || response.status.is_redirection() {
        match response.header("x-content-type-options") {
            Some(v) if v.trim().eq_ignore_ascii_case("nosniff") => {}
            other => add(
                Severity::Low,
                "no X-Content-Type-Options: nosniff",
                match other {
                    Some(v) => format!("GET / -> {status}, X-Content-Type-Options: {v}"),
                    None => seen_missing("X-Content-Type-Options"),
                },
                "browsers may guess (sniff) content types and run an uploaded file as script or HTML",
                "send `X-Content-Type-Options: nosniff`",
            ),
        }
        if response.header("strict-transport-security").is_none() {
            add(
                Severity::Info,
                "no Strict-Transport-Security",
                seen_missing("Strict-Transport-Security"),
                "HSTS only takes effect over HTTPS: when the site is served over HTTPS, it stops browsers from ever using plain http for it",
                "when served over HTTPS, send `Strict-Transport-Security: max-age=31536000`",
            );
        }
    }

    if let Some(server) = response.header("server")
        && server.chars().any(|c| c.is_ascii_digit())
    {
        add(
            Severity::Low,
            "the Server header shows a version banner",
            format!("GET / -> {status}, Server: {server}"),
            "the exact software version tells attackers which known vulnerabilities to try",
            "hide the version (nginx: `server_tokens off`; Apache: `ServerTokens Prod`)",
        );
    }
    if let Some(powered) = response.header("x-powered-by") {
        add(
            Severity::Low,
            "the X-Powered-By header reveals the software stack",
            format!("GET / -> {status}, X-Powered-By: {powered}"),
            "naming the framework and its version tells attackers which known vulnerabilities to try",
            "remove the header (PHP: `expose_php = Off`; Express: `app.disable('x-powered-by')`)",
        );
    }
    Ok(out)
}

/// A file that must not be served, and what proves it is (positive evidence in its body).
struct SensitivePath {
    path: &'static str,
    severity: Severity,
    title: &'static str,
    why: &'static str,
    fix: &'static str,
    /// Some(what proves it) when the response is the real file.
    evidence: fn(&ProbeResponse) -> Option<String>,
}

const SENSITIVE_PATHS: &[SensitivePath] = &[
    SensitivePath {
        path: "/.git/HEAD",
        severity: Severity::High,
        title: "/.git/ is publicly readable",
        why: "the whole git repository — source code and its history, often with secrets — can be downloaded",
        fix: "do not serve the .git directory: deploy without it, or deny `/.git` in the web server",
        evidence: git_head_evidence,
    },
    SensitivePath {
        path: "/.env",
        severity: Severity::High,
        title: "/.env is publicly readable",
        why: ".env files hold secrets (database passwords, API keys) that anyone can now read",
        fix: "move .env out of the served directory or deny dotfiles, then rotate every secret in it",
        evidence: env_evidence,
    },
    SensitivePath {
        path: "/server-status",
        severity: Severity::Medium,
        title: "Apache /server-status is public",
        why: "it shows the server version, client addresses and every URL being requested right now",
        fix: "restrict mod_status to local addresses (`Require local`) or disable it",
        evidence: server_status_evidence,
    },
    SensitivePath {
        path: "/.DS_Store",
        severity: Severity::Low,
        title: "/.DS_Store is publicly readable",
        why: "it lists the names of files in the directory, including ones not linked anywhere",
        fix: "delete .DS_Store files from the served directory and deny dotfiles",
        evidence: ds_store_evidence,
    },
    SensitivePath {
        path: "/index.php~",
        severity: Severity::Medium,
        title: "a PHP source backup (/index.php~) is publicly readable",
        why: "the PHP source is served as text, showing the code and any credentials in it",
        fix: "delete editor backup files from the served directory",
        evidence: php_source_evidence,
    },
    SensitivePath {
        path: "/index.php.bak",
        severity: Severity::Medium,
        title: "a PHP source backup (/index.php.bak) is publicly readable",
        why: "the PHP source is served as text, showing the code and any credentials in it",
        fix: "delete backup files from the served directory",
        evidence: php_source_evidence,
    },
    SensitivePath {
        path: "/.env.bak",
        severity: Severity::High,
        title: "/.env.bak is publicly readable",
        why: "a .env backup holds secrets (database passwords, API keys) that anyone can now read",
        fix: "delete the backup from the served directory, then rotate every secret in it",
        evidence: env_evidence,
    },
    SensitivePath {
        path: "/backup.zip",
        severity: Severity::High,
        title: "/backup.zip is publicly downloadable",
        why: "a backup archive usually holds the whole site: source, configuration and secrets",
        fix: "move backups out of the served directory",
        evidence: zip_evidence,
    },
    SensitivePath {
        path: "/backup.sql",
        severity: Severity::High,
        title: "a database dump (/backup.sql) is publicly downloadable",
        why: "a database dump holds all stored data, often with user accounts and password hashes",
        fix: "move database dumps out of the served directory",
        evidence: sql_evidence,
    },
    SensitivePath {
        path: "/db.sql",
        severity: Severity::High,
        title: "a database dump (/db.sql) is publicly downloadable",
        why: "a database dump holds all stored data, often with user accounts and password hashes",
        fix: "move database dumps out of the served directory",
        evidence: sql_evidence,
    },
];

fn git_head_evidence(r: &ProbeResponse) -> Option<String> {
    if !r.status.is_success() {
        return None;
    }
    let body = r.body.trim_ascii();
    // A ref ("ref: refs/heads/main") or a detached head (a SHA-1 or SHA-256 object id).
    let is_object_id =
        (body.len() == 40 || body.len() == 64) && body.iter().all(|b| b.is_ascii_hexdigit());
    (body.starts_with(b"ref: refs/") || is_object_id)
        .then(|| format!("starts \"{}\"", excerpt(body)))
}

/// Variable names of `NAME=value` lines (`^[A-Z_][A-Z0-9_]*=`).
fn env_names(body: &[u8]) -> Vec<String> {
    body.split(|&b| b == b'\n')
        .filter_map(|line| {
            let eq = line.iter().position(|&b| b == b'=')?;
            let name = &line[..eq];
            let first_ok = name
                .first()
                .is_some_and(|&b| b.is_ascii_uppercase() || b == b'_');
            let rest_ok = name
                .iter()
                .all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            (first_ok && rest_ok).then(|| String::from_utf8_lossy(name).into_owned())
        })
        .collect()
}

fn env_evidence(r: &ProbeResponse) -> Option<String> {
    if !r.status.is_success() || r.is_html() {
        return None;
    }
    let names = env_names(&r.body);
    if names.is_empty() {
        return None;
    }
    // Names only: the values are the secrets.
    let shown: Vec<&str> = names
        .iter()
        .take(MAX_ENV_NAMES_SHOWN)
        .map(String::as_str)
        .collect();
    let more = names.len().saturating_sub(shown.len());
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Some(format!(
        "defines {}{more} (values hidden)",
        shown.join(", ")
    ))
}

fn server_status_evidence(r: &ProbeResponse) -> Option<String> {
    if !r.status.is_success() {
        return None;
    }
    ["Apache Server Status", "Server Version:"]
        .into_iter()
        .find(|m| r.body_contains(m.as_bytes()))
        .map(|m| format!("contains \"{m}\""))
}

fn ds_store_evidence(r: &ProbeResponse) -> Option<String> {
    (r.status.is_success() && r.body.starts_with(b"\x00\x00\x00\x01Bud1"))
        .then(|| "starts with the .DS_Store signature (Bud1)".to_string())
}

/// A backup is judged only when it is not served as an HTML page (a page is not a backup).
fn backup_candidate(r: &ProbeResponse) -> bool {
    r.status.is_success() && !r.body.is_empty() && !r.declared_html()
}

fn php_source_evidence(r: &ProbeResponse) -> Option<String> {
    (backup_candidate(r) && r.body_contains(b"<?php"))
        .then(|| "contains PHP source (\"<?php\")".to_string())
}

fn zip_evidence(r: &ProbeResponse) -> Option<String> {
    (backup_candidate(r) && r.body.starts_with(b"PK\x03\x04"))
        .then(|| "starts with a zip signature (PK)".to_string())
}

fn sql_evidence(r: &ProbeResponse) -> Option<String> {
    if !backup_candidate(r) {
        return None;
    }
    ["CREATE TABLE", "INSERT INTO"]
        .into_iter()
        .find(|m| r.body_contains(m.as_bytes()))
        .map(|m| format!("contains \"{m}\""))
}

/// Markers of an auto-generated directory listing (Apache/nginx, Python's http.server).
const LISTING_MARKERS: [&str; 2] = ["<title>Index of /", "Directory listing for /"];

async fn check_paths(
    probe: &HttpProbe,
    budget: &RequestBudget,
) -> Result<Vec<Finding>, CheckError> {
    // The soft-404 baseline: what the backend answers for a path that cannot exist.
    let baseline = get(probe, budget, &random_path()).await?;
    let baseline = (baseline.edge_error().is_none()).then_some(baseline);
    let mut out = Vec::new();

    let root = get(probe, budget, "/").await?;
    if root.edge_error().is_none() && root.status.is_success() {
        let marker = LISTING_MARKERS.into_iter().find(|m| {
            root.body_contains(m.as_bytes())
                && !baseline
                    .as_ref()
                    .is_some_and(|b| b.body_contains(m.as_bytes()))
        });
        if let Some(marker) = marker {
            out.push(finding(
                Check::Paths,
                Severity::Medium,
                &probe.name,
                "directory listing is enabled at /",
                &format!(
                    "GET / -> {}, {} bytes, contains \"{marker}\"",
                    root.status.as_u16(),
                    root.body.len()
                ),
                "anyone can browse every file in the directory, including ones never linked",
                "turn off directory listings (nginx: `autoindex off`; Apache: `Options -Indexes`) or add an index page",
            ));
        }
    }

    for item in SENSITIVE_PATHS {
        let response = get(probe, budget, item.path).await?;
        if response.edge_error().is_some()
            || baseline.as_ref().is_some_and(|b| response.looks_like(b))
        {
            continue;
        }
        if let Some(evidence) = (item.evidence)(&response) {
            out.push(finding(
                Check::Paths,
                item.severity,
                &probe.name,
                item.title,
                &format!(
                    "GET {} -> {}, {} bytes, {evidence}",
                    item.path,
                    response.status.as_u16(),
                    response.body.len()
                ),
                item.why,
                item.fix,
            ));
        }
    }
    Ok(out)
}

async fn check_cors(probe: &HttpProbe, budget: &RequestBudget) -> Result<Vec<Finding>, CheckError> {
    let response = send(
        probe,
        budget,
        Method::GET,
        "/",
        &[(ORIGIN, SCAN_ORIGIN)],
        Bytes::new(),
    )
    .await?;
    if response.edge_error().is_some() {
        return Ok(Vec::new());
    }
    let Some(allow_origin) = response.header("access-control-allow-origin") else {
        return Ok(Vec::new());
    };
    let allow_origin = allow_origin.trim();
    let credentials = response
        .header("access-control-allow-credentials")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let seen = format!(
        "GET / with Origin: {SCAN_ORIGIN} -> {}, Access-Control-Allow-Origin: {allow_origin}{}",
        response.status.as_u16(),
        if credentials {
            ", Access-Control-Allow-Credentials: true"
        } else {
            ""
        }
    );
    let (severity, title, why, fix) = if allow_origin == SCAN_ORIGIN && credentials {
        (
            Severity::High,
            "CORS reflects any origin and allows credentials",
            "any website a logged-in visitor opens can read their authenticated responses (account data, tokens)",
            "allow only your own origins explicitly; never echo the Origin header back with credentials",
        )
    } else if allow_origin == SCAN_ORIGIN {
        (
            Severity::Medium,
            "CORS reflects any origin",
            "any website can read the responses; harmless only if nothing here depends on who the visitor is",
            "allow only your own origins explicitly instead of echoing the Origin header",
        )
    } else if allow_origin == "*" && credentials {
        (
            Severity::Medium,
            "CORS allows any origin (*) together with credentials",
            "browsers refuse this combination, but it shows the intent to share authenticated responses with every site",
            "list your own origins explicitly, or drop Access-Control-Allow-Credentials",
        )
    } else if allow_origin == "*" {
        (
            Severity::Info,
            "CORS allows any origin (*)",
            "any website can read the responses (without the visitor's cookies); fine for public data only",
            "keep `*` only for public, unauthenticated data; otherwise list your own origins",
        )
    } else {
        // A fixed origin of the owner's choice: a deliberate policy, nothing to report.
        return Ok(Vec::new());
    };
    Ok(vec![finding(
        Check::Cors,
        severity,
        &probe.name,
        title,
        &seen,
        why,
        fix,
    )])
}

/// The name of a `Set-Cookie` value and which protective attributes it carries.
struct CookieFlags {
    name: String,
    secure: bool,
    http_only: bool,
    same_site: bool,
}

fn parse_set_cookie(value: &str) -> CookieFlags {
    let mut parts = value.split(';');
    let pair = parts.next().unwrap_or("");
    let name = pair.split('=').next().unwrap_or("").trim().to_string();
    let mut flags = CookieFlags {
        name,
        secure: false,
        http_only: false,
        same_site: false,
    };
    for attribute in parts {
        let key = attribute.split('=').next().unwrap_or("").trim();
        if key.eq_ignore_ascii_case("secure") {
            flags.secure = true;
        } else if key.eq_ignore_ascii_case("httponly") {
            flags.http_only = true;
        } else if key.eq_ignore_ascii_case("samesite") {
            flags.same_site = true;
        }
    }
    flags
}

async fn check_cookies(
    probe: &HttpProbe,
    budget: &RequestBudget,
) -> Result<Vec<Finding>, CheckError> {
    let response = get(probe, budget, "/").await?;
    if response.edge_error().is_some() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for value in response.headers.get_all(SET_COOKIE) {
        let cookie = parse_set_cookie(&String::from_utf8_lossy(value.as_bytes()));
        let mut missing = Vec::new();
        let mut severity = Severity::Info;
        let mut why = Vec::new();
        if !cookie.http_only {
            missing.push("HttpOnly");
            severity = severity.max(Severity::Medium);
            why.push("without HttpOnly, any injected script can read it (session theft via XSS)");
        }
        if !cookie.secure {
            missing.push("Secure");
            severity = severity.max(Severity::Low);
            why.push("without Secure, it is also sent over plain http (this only matters when the site is served over HTTPS)");
        }
        if !cookie.same_site {
            missing.push("SameSite");
            severity = severity.max(Severity::Low);
            why.push("without SameSite, other sites' requests may carry it (CSRF)");
        }
        if missing.is_empty() {
            continue;
        }
        let name = if cookie.name.is_empty() {
            "(unnamed)".to_string()
        } else {
            bounded(&cookie.name, EXCERPT_CHARS)
        };
        out.push(finding(
            Check::Cookies,
            severity,
            &probe.name,
            &format!("cookie {name} lacks {}", missing.join(", ")),
            // The name only: cookie values can be session tokens.
            &format!(
                "GET / -> {}, Set-Cookie: {name}=(value hidden), without {}",
                response.status.as_u16(),
                missing.join(", ")
            ),
            &why.join("; "),
            &format!("set {} on the cookie", missing.join(", ")),
        ));
    }
    Ok(out)
}

/// A stack-trace or debug-page signature; `ignore_case` for phrases that vary in case.
struct Signature {
    text: &'static str,
    ignore_case: bool,
}

const fn sig(text: &'static str) -> Signature {
    Signature {
        text,
        ignore_case: false,
    }
}

const DEBUG_SIGNATURES: &[Signature] = &[
    sig("Traceback (most recent call last)"),
    sig("at java."),
    sig("Exception in thread"),
    sig("Werkzeug Debugger"),
    Signature {
        text: "stack trace",
        ignore_case: true,
    },
    sig("node_modules/"),
    sig(".php on line"),
    sig("Fatal error:"),
    sig("DEBUG = True"),
    sig("ActionController::"),
    sig("System.NullReferenceException"),
    sig("panicked at"),
];

fn find_signature(body: &[u8]) -> Option<&'static Signature> {
    DEBUG_SIGNATURES.iter().find(|s| {
        if s.ignore_case {
            contains_ignore_case(body, s.text.as_bytes())
        } else {
            contains(body, s.text.as_bytes())
        }
    })
}

async fn check_errors(
    probe: &HttpProbe,
    budget: &RequestBudget,
) -> Result<Vec<Finding>, CheckError> {
    // What `/` normally shows: a signature already there (a blog post about stack traces)
    // is content, not a leak.
    let root = get(probe, budget, "/").await?;
    let odd_path = format!("{}?id=%27%22%3C", random_path());
    let provoked = [
        (
            "GET of an unknown path with quotes and < in the query",
            get(probe, budget, &odd_path).await?,
        ),
        (
            "POST / with malformed JSON",
            send(
                probe,
                budget,
                Method::POST,
                "/",
                &[(CONTENT_TYPE, "application/json")],
                Bytes::from_static(b"{\"p0rt\":"),
            )
            .await?,
        ),
    ];
    let mut out = Vec::new();
    for (what, response) in provoked {
        if response.edge_error().is_some() {
            continue;
        }
        let Some(signature) = find_signature(&response.body) else {
            continue;
        };
        if find_signature(&root.body).is_some_and(|s| s.text == signature.text) {
            continue;
        }
        out.push(finding(
            Check::Errors,
            Severity::Medium,
            &probe.name,
            "an error page reveals debug output (stack trace)",
            &format!(
                "{what} -> {}, body contains \"{}\"",
                response.status.as_u16(),
                signature.text
            ),
            "stack traces and debug pages show source paths, library versions and sometimes configuration or secrets",
            "turn off debug mode in production and serve a generic error page; log the details server-side",
        ));
    }
    Ok(out)
}

/// TCP connect check of `ports` on a pinned address (operator-allowlisted targets only; the
/// caller has already validated `ip`). One finding per open port (Severity::Info for 80/443,
/// Medium otherwise, title "port N is open"), in port order; closed/filtered ports produce
/// nothing. Connects concurrently but at most PORT_SCAN_CONCURRENCY at once, each with
/// `connect_timeout`. Each connect takes one request from the budget: the whole check is
/// refused with BudgetExhausted (before connecting anywhere) when the budget cannot cover it.
pub async fn run_port_check(
    target: &str,
    ip: IpAddr,
    ports: &[u16],
    connect_timeout: Duration,
    budget: &RequestBudget,
) -> Result<Vec<Finding>, CheckError> {
    let mut ports: Vec<u16> = ports.iter().copied().filter(|&p| p != 0).collect();
    ports.sort_unstable();
    ports.dedup();
    let needed = u32::try_from(ports.len()).unwrap_or(u32::MAX);
    if !budget.try_take_n(needed) {
        return Err(CheckError::BudgetExhausted);
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(PORT_SCAN_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for port in ports {
        let limit = Arc::clone(&limit);
        tasks.spawn(async move {
            // The semaphore is never closed; a failed acquire just means "not open".
            let Ok(_permit) = limit.acquire_owned().await else {
                return (port, false);
            };
            let addr = SocketAddr::new(ip, port);
            let open = matches!(
                tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            (port, open)
        });
    }
    let mut open = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((port, true)) = joined {
            open.push(port);
        }
    }
    open.sort_unstable();
    Ok(open
        .into_iter()
        .map(|port| {
            let web = port == 80 || port == 443;
            finding(
                Check::Ports,
                if web {
                    Severity::Info
                } else {
                    Severity::Medium
                },
                target,
                &format!("port {port} is open"),
                &format!("TCP connect to {} succeeded", SocketAddr::new(ip, port)),
                if web {
                    "a web port: expected for a web server"
                } else {
                    "every open port is a service anyone can reach and try to log in to or exploit"
                },
                if web {
                    "nothing to do if you mean to serve the web here"
                } else {
                    "close the port or firewall it if the service need not be public"
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Longest request head the test backends read.
    const MAX_TEST_HEAD: usize = 16 * 1024;

    /// A request as the test backends see it.
    struct Req {
        method: String,
        path: String,
        /// Lowercased names.
        headers: Vec<(String, String)>,
    }

    impl Req {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    }

    fn reply(status: u16, headers: &[(&'static str, &str)], body: &[u8]) -> Reply {
        Reply {
            status,
            headers: headers.iter().map(|(n, v)| (*n, v.to_string())).collect(),
            body: body.to_vec(),
        }
    }

    /// Reads one request (head and Content-Length body), so closing never resets unread data.
    async fn read_request(socket: &mut TcpStream) -> Option<Req> {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            if buf.len() > MAX_TEST_HEAD {
                return None;
            }
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next()?.split(' ');
        let method = request_line.next()?.to_string();
        let path = request_line.next()?.to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let req = Req {
            method,
            path,
            headers,
        };
        let length: usize = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut have = buf.len() - (head_end + 4);
        while have < length {
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            have += n;
        }
        Some(req)
    }

    /// A backend on 127.0.0.1 answering each request with `handler`, one per connection.
    async fn serve(handler: fn(&Req) -> Reply) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut socket).await else {
                        return;
                    };
                    let r = handler(&req);
                    let mut out = format!("HTTP/1.1 {} X\r\n", r.status);
                    for (n, v) in &r.headers {
                        out.push_str(&format!("{n}: {v}\r\n"));
                    }
                    out.push_str(&format!(
                        "Content-Length: {}\r\nConnection: close\r\n\r\n",
                        r.body.len()
                    ));
                    let mut bytes = out.into_bytes();
                    bytes.extend_from_slice(&r.body);
                    let _ = socket.write_all(&bytes).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        addr
    }

    fn probe(edge: SocketAddr) -> HttpProbe {
        HttpProbe {
            edge,
            host: "eager-pixel-ant.localhost".to_string(),
            name: "eager-pixel-ant".to_string(),
            request_timeout: Duration::from_secs(5),
        }
    }

    async fn all_http_findings(probe: &HttpProbe) -> Vec<Finding> {
        let budget = RequestBudget::new(1000);
        let mut out = Vec::new();
        for check in Check::HTTP {
            out.extend(run_http_check(check, probe, &budget).await.unwrap());
        }
        out
    }

    fn has(findings: &[Finding], check: Check, severity: Severity, title: &str) -> bool {
        findings
            .iter()
            .any(|f| f.check == check && f.severity == severity && f.title.contains(title))
    }

    fn leaky(req: &Req) -> Reply {
        let html = ("Content-Type", "text/html");
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/") => {
                let mut r = reply(
                    200,
                    &[
                        html,
                        ("Server", "nginx/1.25.3"),
                        ("X-Powered-By", "PHP/8.1"),
                        ("Set-Cookie", "session=abc"),
                    ],
                    b"<html><head><title>Index of /</title></head><body>files</body></html>",
                );
                if let Some(origin) = req.header("origin") {
                    r.headers
                        .push(("Access-Control-Allow-Origin", origin.to_string()));
                    r.headers
                        .push(("Access-Control-Allow-Credentials", "true".to_string()));
                }
                r
            }
            ("GET", "/.git/HEAD") => reply(
                200,
                &[("Content-Type", "text/plain")],
                b"ref: refs/heads/main\n",
            ),
            ("GET", "/.env") => reply(
                200,
                &[("Content-Type", "application/octet-stream")],
                b"DB_PASSWORD=hunter2\n",
            ),
            ("POST", "/") => reply(
                500,
                &[html],
                b"<pre>Traceback (most recent call last):\n  File \"app.py\", line 3\nValueError</pre>",
            ),
            _ => reply(404, &[html], b"<h1>Not Found</h1>"),
        }
    }

    #[tokio::test]
    async fn leaky_backend_yields_each_expected_finding() {
        let probe = probe(serve(leaky).await);
        let findings = all_http_findings(&probe).await;
        let expected = [
            (Check::Headers, Severity::Medium, "Content-Security-Policy"),
            (Check::Headers, Severity::Medium, "framed"),
            (Check::Headers, Severity::Low, "nosniff"),
            (Check::Headers, Severity::Low, "Referrer-Policy"),
            (Check::Headers, Severity::Info, "Strict-Transport-Security"),
            (Check::Headers, Severity::Low, "version banner"),
            (Check::Headers, Severity::Low, "X-Powered-By"),
            (Check::Paths, Severity::High, "/.git/"),
            (Check::Paths, Severity::High, "/.env is publicly readable"),
            (Check::Paths, Severity::Medium, "directory listing"),
            (Check::Cors, Severity::High, "reflects any origin"),
            (Check::Cookies, Severity::Medium, "cookie session lacks"),
            (Check::Errors, Severity::Medium, "debug output"),
        ];
        for (check, severity, title) in expected {
            assert!(
                has(&findings, check, severity, title),
                "missing {check:?} {severity:?} {title:?} in {findings:#?}"
            );
        }
        assert_eq!(findings.len(), expected.len(), "{findings:#?}");
        for f in &findings {
            for text in [&f.seen, &f.title] {
                assert!(!text.contains("abc"), "cookie value leaked: {f:?}");
                assert!(!text.contains("hunter2"), ".env value leaked: {f:?}");
                assert!(text.chars().count() <= MAX_SEEN_CHARS);
            }
            assert_eq!(f.target, "eager-pixel-ant");
        }
        let env = findings.iter().find(|f| f.title.contains(".env")).unwrap();
        assert!(env.seen.contains("DB_PASSWORD"), "{env:?}");
        let errors = findings.iter().find(|f| f.check == Check::Errors).unwrap();
        assert!(errors.seen.contains("Traceback"), "{errors:?}");
    }

    fn clean(req: &Req) -> Reply {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/") => reply(
                200,
                &[
                    ("Content-Type", "text/html; charset=utf-8"),
                    (
                        "Content-Security-Policy",
                        "default-src 'self'; frame-ancestors 'none'",
                    ),
                    ("X-Content-Type-Options", "nosniff"),
                    ("Referrer-Policy", "no-referrer"),
                    ("Strict-Transport-Security", "max-age=31536000"),
                    ("Server", "nginx"),
                    (
                        "Set-Cookie",
                        "id=xyz; Secure; HttpOnly; SameSite=Lax; Path=/",
                    ),
                ],
                b"<html><body>Welcome</body></html>",
            ),
            ("POST", "/") => reply(400, &[("Content-Type", "text/plain")], b"bad request"),
            _ => reply(404, &[("Content-Type", "text/plain")], b"not found"),
        }
    }

    #[tokio::test]
    async fn clean_backend_yields_no_findings() {
        let probe = probe(serve(clean).await);
        let findings = all_http_findings(&probe).await;
        assert!(findings.is_empty(), "{findings:#?}");
    }

    fn soft_404(_req: &Req) -> Reply {
        reply(
            200,
            &[("Content-Type", "text/html")],
            b"<html><body>Welcome to my app</body></html>",
        )
    }

    /// A soft-404 page that is not HTML and echoes the path (a JSON API's catch-all).
    fn soft_404_echo(req: &Req) -> Reply {
        let body = format!("{{\"error\":\"no route\",\"path\":\"{}\"}}", req.path);
        reply(
            200,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    #[tokio::test]
    async fn soft_404_backends_yield_no_path_findings() {
        for handler in [soft_404 as fn(&Req) -> Reply, soft_404_echo] {
            let probe = probe(serve(handler).await);
            let budget = RequestBudget::new(100);
            let findings = run_http_check(Check::Paths, &probe, &budget).await.unwrap();
            assert!(findings.is_empty(), "{findings:#?}");
        }
    }

    fn not_found(_req: &Req) -> Reply {
        reply(
            404,
            &[("Content-Type", "text/plain")],
            b"ref: refs/heads/main\nA=1\n",
        )
    }

    #[tokio::test]
    async fn all_404_backend_yields_no_path_findings() {
        let probe = probe(serve(not_found).await);
        let budget = RequestBudget::new(100);
        let findings = run_http_check(Check::Paths, &probe, &budget).await.unwrap();
        assert!(findings.is_empty(), "{findings:#?}");
    }

    fn offline(_req: &Req) -> Reply {
        reply(
            503,
            &[
                ("Content-Type", "text/plain"),
                (EDGE_ERROR_HEADER, "offline"),
            ],
            b"eager-pixel-ant is offline\nconnect it with ssh -R\n",
        )
    }

    #[tokio::test]
    async fn offline_tunnel_is_a_high_reachability_finding() {
        let probe = probe(serve(offline).await);
        let budget = RequestBudget::new(10);
        let findings = run_http_check(Check::Reachability, &probe, &budget)
            .await
            .unwrap();
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let f = &findings[0];
        assert_eq!((f.check, f.severity), (Check::Reachability, Severity::High));
        assert_eq!(f.title, "eager-pixel-ant does not answer");
        assert!(
            f.seen.contains("503") && f.seen.contains("is offline"),
            "{f:?}"
        );
        assert!(!f.seen.contains("ssh -R"), "only the first line: {f:?}");
        // The other checks never judge the edge's own page.
        let budget = RequestBudget::new(100);
        for check in Check::HTTP {
            if check != Check::Reachability {
                let findings = run_http_check(check, &probe, &budget).await.unwrap();
                assert!(findings.is_empty(), "{check:?}: {findings:#?}");
            }
        }
    }

    #[tokio::test]
    async fn refused_connection_is_unreachable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let budget = RequestBudget::new(10);
        let result = run_http_check(Check::Reachability, &probe(addr), &budget).await;
        assert!(
            matches!(result, Err(CheckError::Unreachable(ref name, _)) if name == "eager-pixel-ant"),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn budget_runs_out_on_the_third_request() {
        let probe = probe(serve(clean).await);
        let budget = RequestBudget::new(2);
        for _ in 0..2 {
            run_http_check(Check::Reachability, &probe, &budget)
                .await
                .unwrap();
        }
        assert_eq!(budget.remaining(), 0);
        let third = run_http_check(Check::Reachability, &probe, &budget).await;
        assert!(
            matches!(third, Err(CheckError::BudgetExhausted)),
            "{third:?}"
        );
    }

    #[tokio::test]
    async fn port_check_reports_only_open_ports() {
        let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_port = open.local_addr().unwrap().port();
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let budget = RequestBudget::new(10);
        let findings = run_port_check(
            "127.0.0.1",
            "127.0.0.1".parse().unwrap(),
            &[open_port, closed_port, open_port],
            Duration::from_millis(500),
            &budget,
        )
        .await
        .unwrap();
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].title, format!("port {open_port} is open"));
        assert_eq!(findings[0].severity, Severity::Medium);
        assert_eq!(findings[0].check, Check::Ports);
        assert_eq!(budget.remaining(), 8, "one unit per distinct port");
        let short = RequestBudget::new(1);
        let result = run_port_check(
            "127.0.0.1",
            "127.0.0.1".parse().unwrap(),
            &[open_port, closed_port],
            Duration::from_millis(500),
            &short,
        )
        .await;
        assert!(
            matches!(result, Err(CheckError::BudgetExhausted)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn silent_backend_times_out_instead_of_hanging() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = read_request(&mut socket).await;
                held.push(socket);
            }
        });
        let mut probe = probe(addr);
        probe.request_timeout = Duration::from_millis(300);
        let budget = RequestBudget::new(10);
        let started = Instant::now();
        let result = run_http_check(Check::Reachability, &probe, &budget).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(result, Err(CheckError::Unreachable(..))),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn endless_body_is_read_only_up_to_the_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = read_request(&mut socket).await;
                    let head =
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n";
                    if socket.write_all(head).await.is_err() {
                        return;
                    }
                    let chunk = [b'a'; 8192];
                    while socket.write_all(&chunk).await.is_ok() {}
                });
            }
        });
        let probe = probe(addr);
        let budget = RequestBudget::new(10);
        let response = get(&probe, &budget, "/").await.unwrap();
        assert_eq!(response.body.len(), MAX_PROBE_BODY_BYTES);
        // The checks handle it like any other response.
        let findings = run_http_check(Check::Errors, &probe, &budget)
            .await
            .unwrap();
        assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn seen_is_bounded_and_clean() {
        let long = format!("a\u{0}b\r\n\u{1b}[31m{}", "x".repeat(500));
        let out = bounded(&long, MAX_SEEN_CHARS);
        assert_eq!(out.chars().count(), MAX_SEEN_CHARS);
        assert!(!out.chars().any(char::is_control));
        assert!(out.starts_with("ab[31m"));
        assert_eq!(excerpt(b"\xff\xferef"), "\u{fffd}\u{fffd}ref");
    }

    #[test]
    fn check_names_round_trip() {
        for check in Check::ALL {
            assert_eq!(Check::parse(check.as_str()), Some(check));
            assert!(!check.describe().is_empty());
        }
        assert_eq!(Check::parse("nope"), None);
        assert_eq!(Check::HTTP[0], Check::Reachability);
        assert_eq!(serde_json::to_string(&Check::Cors).unwrap(), "\"cors\"");
        assert!(Severity::High > Severity::Medium && Severity::Low > Severity::Info);
        assert_eq!(Severity::Medium.as_str(), "medium");
    }

    #[test]
    fn cookie_attributes_are_parsed_by_name() {
        let c = parse_set_cookie("sid=a=b; path=/; secure; HTTPONLY; SameSite=Strict");
        assert_eq!(c.name, "sid");
        assert!(c.secure && c.http_only && c.same_site);
        let c = parse_set_cookie("sid=secure; Path=/httponly");
        assert!(!c.secure && !c.http_only && !c.same_site);
    }

    #[test]
    fn env_names_need_the_name_equals_shape() {
        assert_eq!(
            env_names(b"# comment\nDB_PASSWORD=x\nlower=y\n_A1=z\n=no\nA B=no\n"),
            vec!["DB_PASSWORD".to_string(), "_A1".to_string()]
        );
    }
}
