//! The web console: server-rendered pages at `admin.path` (`ADMIN_PATH`, default `/admin`)
//! on the base domain, over the same data and actions as the admin API ([`super::api`]).
//!
//! - Log in with the admin token (`POST {path}/login`, compared in constant time); the host
//!   then keeps a session in the cache under `session:{id}` ([`SESSION_TTL`]), so hosts on
//!   one Redis share it and it survives a restart there. `{id}` is the SHA-256 of the
//!   cookie's value, so whoever can read the cache cannot log in with what they read; and a
//!   session remembers a digest of the token it logged in with, so changing `ADMIN_TOKEN`
//!   ends every session made with the old one. The cookie is `HttpOnly`,
//!   `SameSite=Strict`, scoped to the console's path, and `Secure` when the public scheme is
//!   https. With no `ADMIN_TOKEN` set there is nothing to log in with: the console refuses.
//! - Failed logins count per client address in the cache; after [`MAX_FAILED_LOGINS`] in
//!   [`FAILED_LOGIN_WINDOW`] the address gets 429 until the window ends.
//! - Every state-changing request (anything but GET/HEAD) carries the session's CSRF token in
//!   the form field [`CSRF_FIELD`] or the header [`CSRF_HEADER`]; else 403.
//! - Every answer carries a strict CSP ([`CSP`]); the CSS and JS are compiled into the binary.
//! - `{path}/events` streams the tunnels JSON every [`EVENTS_INTERVAL`] (server-sent events),
//!   one stream per session (a new one ends the old), ending on logout or expiry.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;

use super::{AdminError, AdminState, api, token_matches};
use crate::bans::Identity;
use crate::cache::Cache;
use crate::http::{Body, HttpEdge, full};

/// How long a console session lasts after login (it is not extended by use).
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 60 * 60);
/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "p0rt_console";
/// Random bytes in a session id and in a CSRF token.
const SECRET_BYTES: usize = 32;
/// Failed logins one client address may make per [`FAILED_LOGIN_WINDOW`].
pub const MAX_FAILED_LOGINS: i64 = 10;
/// Window over which failed logins are counted.
pub const FAILED_LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Form field that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
/// Header that carries the CSRF token (for scripts).
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Time between two updates of the live tunnel stream.
pub const EVENTS_INTERVAL: Duration = Duration::from_secs(1);
/// Longest life of one event stream; the browser's `EventSource` reconnects by itself.
pub const EVENTS_MAX_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Most event streams open at once on one host (one per session).
pub const MAX_EVENT_STREAMS: usize = 64;
/// The console's Content-Security-Policy: nothing but its own script, style and stream.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       connect-src 'self'; img-src 'self'; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = include_str!("console/console.css");
const SCRIPT: &str = include_str!("console/console.js");

/// The console's settings and its live event streams.
pub struct ConsoleState {
    /// `admin.path`, e.g. `/admin` (checked by [`crate::config::check_admin_path`]).
    pub path: String,
    /// Whether cookies get `Secure` (the public scheme is https).
    pub secure_cookie: bool,
    /// Session id → generation of its current event stream.
    streams: Mutex<HashMap<String, u64>>,
    next_stream: AtomicU64,
}

impl ConsoleState {
    pub fn new(path: &str, secure_cookie: bool) -> ConsoleState {
        ConsoleState {
            path: path.to_string(),
            secure_cookie,
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
        }
    }

    /// Whether `path` is the console's (its path itself or below it).
    pub fn owns(&self, path: &str) -> bool {
        path.strip_prefix(self.path.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the cache holds under `session:{id}`.
#[derive(Serialize, Deserialize)]
struct Session {
    csrf: String,
    /// Unix seconds.
    created: i64,
    /// [`token_digest`] of the admin token the session logged in with.
    #[serde(default)]
    token: String,
}

/// A digest of the admin token, kept in sessions to end them when the token changes.
fn token_digest(token: &crate::config::Secret) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(format!(
        "p0rt console token\n{}",
        token.expose()
    )))
}

/// Why a console request was refused.
#[derive(Debug, thiserror::Error)]
enum ConsoleError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The client's address failed to log in too often.
    #[error("too many failed logins from your address; wait a minute and try again")]
    TooManyLogins,
    /// A state-changing request without the session's CSRF token (the caller's fault, or a
    /// forged cross-site request).
    #[error("missing or wrong CSRF token; reload the page and try again")]
    Csrf,
    /// The session is missing or expired.
    #[error("not logged in (or the session expired); log in again")]
    LoggedOut,
}

impl ConsoleError {
    fn status(&self) -> StatusCode {
        match self {
            ConsoleError::Admin(e) => e.status(),
            ConsoleError::TooManyLogins => StatusCode::TOO_MANY_REQUESTS,
            ConsoleError::Csrf => StatusCode::FORBIDDEN,
            ConsoleError::LoggedOut => StatusCode::UNAUTHORIZED,
        }
    }
}

/// Serves one request under the console's path from TCP peer `peer`.
pub async fn handle(req: Request<Incoming>, peer: SocketAddr, edge: &HttpEdge) -> Response<Body> {
    let mut response = match &edge.admin {
        None => page_error(
            "/",
            &ConsoleError::Admin(AdminError::Unavailable(
                "the console is not set up on this host".into(),
            )),
        ),
        Some(state) => {
            let client = edge.trusted_proxies.client_ip(peer.ip(), req.headers());
            match serve(req, client, edge, state).await {
                Ok(response) => response,
                Err(e) => {
                    if e.status().is_server_error() {
                        tracing::warn!("admin console: {e}");
                    }
                    page_error(&state.console.path, &e)
                }
            }
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn serve(
    req: Request<Incoming>,
    client: IpAddr,
    edge: &HttpEdge,
    state: &Arc<AdminState>,
) -> Result<Response<Body>, ConsoleError> {
    let console = &state.console;
    let base = console.path.as_str();
    let sub = req.uri().path()[base.len()..]
        .trim_end_matches('/')
        .to_string();
    let method = req.method().clone();
    let read_only = method == Method::GET || method == Method::HEAD;
    match (sub.as_str(), read_only) {
        ("/console.css", true) => return Ok(asset("text/css; charset=utf-8", STYLE)),
        ("/console.js", true) => return Ok(asset("text/javascript; charset=utf-8", SCRIPT)),
        ("/login", false) if method == Method::POST => {
            let form = read_form(req).await?;
            return login(&form, client, edge, console).await;
        }
        _ => {}
    }
    let Some((id, session)) =
        current_session(req.headers(), &edge.cache, edge.admin_token.as_ref()).await
    else {
        return match (sub.as_str(), read_only) {
            ("", true) => Ok(html(StatusCode::OK, login_page(base, None))),
            ("/events", _) => Err(ConsoleError::LoggedOut),
            (_, true) => Ok(redirect(base)),
            (_, false) => Err(ConsoleError::Csrf),
        };
    };
    if read_only {
        return match sub.as_str() {
            "" => Ok(redirect(&format!("{base}/tunnels"))),
            "/events" => events(edge, state, id),
            "/tunnels" => Ok(page(
                base,
                &session,
                "Tunnels",
                None,
                tunnels_body(base, &session, &api::tunnels(edge)),
            )),
            "/names" => names_page(edge, base, &session).await,
            "/bans" => bans_page(state, base, &session, None).await,
            "/plugins" => Ok(plugins_page(state, base, &session, None)),
            "/scans" => scans_page(edge, base, &session).await,
            "/health" => Ok(health_page(edge, state, base, &session)),
            _ => Err(AdminError::NotFound(format!("no console page {base}{sub}")).into()),
        };
    }
    let presented = req
        .headers()
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let form = read_form(req).await?;
    let presented = presented.or_else(|| form.get(CSRF_FIELD).cloned());
    let csrf_ok =
        presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(session.csrf.as_bytes())));
    if !csrf_ok {
        return Err(ConsoleError::Csrf);
    }
    if method != Method::POST {
        return Err(AdminError::MethodNotAllowed("GET, POST").into());
    }
    let parts: Vec<&str> = sub.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["logout"] => {
            edge.cache.delete(&session_key(&id)).await;
            console.streams().remove(&id);
            let mut response = redirect(base);
            response
                .headers_mut()
                .insert(header::SET_COOKIE, cookie(console, "", Duration::ZERO));
            Ok(response)
        }
        ["tunnels", name, "disconnect"] => {
            let name = api::decode(name)?;
            let (_, done) = api::disconnect_name(edge, &name).await?;
            let notice = format!("disconnected {}", list_text(&done["disconnected"]));
            Ok(page(
                base,
                &session,
                "Tunnels",
                Some(&notice),
                tunnels_body(base, &session, &api::tunnels(edge)),
            ))
        }
        ["bans"] => {
            let ip = api::parse_ip(form.get("ip").map_or("", |s| s.trim()))?;
            api::ban(state, ip, ban_body(&form)?).await?;
            bans_page(state, base, &session, Some(&format!("banned {ip}"))).await
        }
        ["bans", ip, "unban"] => {
            let ip = api::parse_ip(&api::decode(ip)?)?;
            api::unban(state, ip).await?;
            bans_page(state, base, &session, Some(&format!("unbanned {ip}"))).await
        }
        ["bans", "identity"] => {
            let (kind, target) = identity_target(
                form.get("kind").map_or("", |s| s.trim()),
                form.get("target").map_or("", |s| s.trim()),
            )?;
            api::ban_identity(state, kind, &target, ban_body(&form)?).await?;
            let notice = format!("banned {} {target}", kind.as_str());
            bans_page(state, base, &session, Some(&notice)).await
        }
        ["bans", kind @ ("names" | "keys"), target, "unban"] => {
            let kind = if *kind == "names" { "name" } else { "key" };
            let (kind, target) = identity_target(kind, &api::decode(target)?)?;
            api::unban_identity(state, kind, &target).await?;
            let notice = format!("unbanned {} {target}", kind.as_str());
            bans_page(state, base, &session, Some(&notice)).await
        }
        ["plugins", "reload"] => {
            state.plugins.reload().await;
            Ok(plugins_page(
                state,
                base,
                &session,
                Some("plugins reloaded"),
            ))
        }
        _ => Err(AdminError::NotFound(format!("no console action {base}{sub}")).into()),
    }
}

/// A ban's length (`seconds`, empty: until lifted) and `reason` from the console's form.
fn ban_body(form: &HashMap<String, String>) -> Result<api::BanBody, AdminError> {
    let field = |name: &str| form.get(name).map(|s| s.trim()).filter(|s| !s.is_empty());
    let seconds = field("seconds")
        .map(|s| {
            s.parse::<u64>()
                .map_err(|_| AdminError::BadRequest("seconds must be a whole number".into()))
        })
        .transpose()?;
    let reason = field("reason").map(str::to_string);
    Ok(api::BanBody { seconds, reason })
}

/// A name or key to ban from the console's form: `kind` is `name` or `key`.
fn identity_target(kind: &str, target: &str) -> Result<(Identity, String), AdminError> {
    match kind {
        "name" => crate::store::reservations::check_name(target)
            .map(|n| (Identity::Name, n.to_string()))
            .map_err(|e| AdminError::BadRequest(e.to_string())),
        "key" => api::parse_key(target).map(|k| (Identity::Key, k)),
        _ => Err(AdminError::BadRequest("ban a name or a key".into())),
    }
}

/// The cache key of the session whose cookie value is `id`: its SHA-256, never the id.
fn session_key(id: &str) -> String {
    use sha2::Digest as _;
    format!(
        "session:{}",
        hex::encode(sha2::Sha256::digest(id.as_bytes()))
    )
}

/// The session named by the request's cookie, if it exists in the cache and was made with
/// the admin token in force now.
async fn current_session(
    headers: &HeaderMap,
    cache: &Cache,
    token: Option<&crate::config::Secret>,
) -> Option<(String, Session)> {
    let token = token?;
    let id = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())?;
    // Only ids this module could have made reach the cache.
    if id.len() != SECRET_BYTES * 2 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let raw = cache.get(&session_key(&id)).await?;
    let session: Session = serde_json::from_slice(&raw).ok()?;
    let current = token_digest(token);
    if !bool::from(session.token.as_bytes().ct_eq(current.as_bytes())) {
        return None;
    }
    Some((id, session))
}

fn cookie(console: &ConsoleState, value: &str, max_age: Duration) -> HeaderValue {
    let secure = if console.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let text = format!(
        "{SESSION_COOKIE}={value}; Path={}; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
        console.path,
        max_age.as_secs()
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

async fn login(
    form: &HashMap<String, String>,
    client: IpAddr,
    edge: &HttpEdge,
    console: &ConsoleState,
) -> Result<Response<Body>, ConsoleError> {
    let base = console.path.as_str();
    let Some(token) = &edge.admin_token else {
        return Err(AdminError::Forbidden(
            "the console needs an admin token: set ADMIN_TOKEN on the host".into(),
        )
        .into());
    };
    let failures_key = format!("console-login-failures:{client}");
    let failures = edge
        .cache
        .get(&failures_key)
        .await
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok())
        .unwrap_or(0);
    if failures >= MAX_FAILED_LOGINS {
        return Err(ConsoleError::TooManyLogins);
    }
    let presented = form.get("token").map_or("", |t| t.trim());
    if presented.is_empty() || !token_matches(presented, token) {
        let _ = edge
            .cache
            .increment(&failures_key, 1, Some(FAILED_LOGIN_WINDOW))
            .await;
        tracing::info!("admin console: failed login from {client}");
        return Ok(html(
            StatusCode::UNAUTHORIZED,
            login_page(base, Some("Wrong admin token.")),
        ));
    }
    let id = hex::encode(rand::random::<[u8; SECRET_BYTES]>());
    let session = Session {
        csrf: hex::encode(rand::random::<[u8; SECRET_BYTES]>()),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        token: token_digest(token),
    };
    let value = serde_json::to_vec(&session).unwrap_or_default();
    edge.cache
        .set(&session_key(&id), Bytes::from(value), Some(SESSION_TTL))
        .await;
    tracing::info!("admin console: login from {client}");
    let mut response = redirect(&format!("{base}/tunnels"));
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie(console, &id, SESSION_TTL));
    Ok(response)
}

/// A bounded `application/x-www-form-urlencoded` body as name → value (last one wins).
async fn read_form(req: Request<Incoming>) -> Result<HashMap<String, String>, AdminError> {
    let body = Limited::new(req.into_body(), api::MAX_BODY_BYTES);
    let bytes: Bytes = match tokio::time::timeout(api::BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => return Err(AdminError::TooLarge(api::MAX_BODY_BYTES)),
        Err(_) => return Err(AdminError::BodyTimeout),
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| AdminError::BadRequest("the form is not UTF-8".into()))?;
    let mut form = HashMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = api::decode(&name.replace('+', " "))?;
        let value = api::decode(&value.replace('+', " "))?;
        form.insert(name, value);
    }
    Ok(form)
}

/// Ends the event stream it belongs to from the registry when the stream goes away.
struct StreamGuard {
    state: Arc<AdminState>,
    id: String,
    generation: u64,
}

impl StreamGuard {
    fn current(&self) -> bool {
        self.state.console.streams().get(&self.id) == Some(&self.generation)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self.state.console.streams();
        if streams.get(&self.id) == Some(&self.generation) {
            streams.remove(&self.id);
        }
    }
}

/// `{path}/events`: `data: <GET tunnels JSON>` every [`EVENTS_INTERVAL`] until the client
/// goes, the session ends, a newer stream of the session starts, or [`EVENTS_MAX_LIFETIME`].
fn events(
    edge: &HttpEdge,
    state: &Arc<AdminState>,
    id: String,
) -> Result<Response<Body>, ConsoleError> {
    let generation = {
        let mut streams = state.console.streams();
        if streams.len() >= MAX_EVENT_STREAMS && !streams.contains_key(&id) {
            return Err(AdminError::Unavailable(format!(
                "{MAX_EVENT_STREAMS} console streams are open; close one"
            ))
            .into());
        }
        let generation = state.console.next_stream.fetch_add(1, Ordering::Relaxed);
        streams.insert(id.clone(), generation);
        generation
    };
    let guard = StreamGuard {
        state: state.clone(),
        id,
        generation,
    };
    let (tunnels, cache) = (edge.tunnels.clone(), edge.cache.clone());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval(EVENTS_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => return,
            }
            if !guard.current()
                || started.elapsed() > EVENTS_MAX_LIFETIME
                || !cache.exists(&session_key(&guard.id)).await
            {
                return;
            }
            let data = api::tunnels_of(&tunnels);
            if tx
                .send(Bytes::from(format!("data: {data}\n\n")))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok::<_, crate::http::limits::BoxError>(Frame::data(b))))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    Ok(response)
}

// ---- rendering ----------------------------------------------------------------------------

/// HTML-escapes text for element content and quoted attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one path part for a form's action.
fn path_part(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    full(status, "text/html; charset=utf-8", body)
}

fn asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    full(StatusCode::OK, content_type, text)
}

fn redirect(to: &str) -> Response<Body> {
    let mut response = full(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn document(base: &str, title: &str, csrf: Option<&str>, body: &str) -> String {
    let base = esc(base);
    let meta = csrf.map_or(String::new(), |t| {
        format!("<meta name=\"csrf-token\" content=\"{}\">", esc(t))
    });
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{meta}\
         <title>{} · p0rt console</title>\
         <link rel=\"stylesheet\" href=\"{base}/console.css\">\
         <script src=\"{base}/console.js\" defer></script></head>\
         <body data-base=\"{base}\">{body}</body></html>\n",
        esc(title)
    )
}

fn login_page(base: &str, error: Option<&str>) -> String {
    let error = error.map_or(String::new(), |e| {
        format!("<p class=\"error\" id=\"login-error\">{}</p>", esc(e))
    });
    let body = format!(
        "<main class=\"login\"><h1>p0rt console</h1>{error}\
         <form method=\"post\" action=\"{}/login\" id=\"login\">\
         <label>Admin token <input type=\"password\" name=\"token\" id=\"token\" \
         autocomplete=\"current-password\" required autofocus></label>\
         <button type=\"submit\" id=\"login-submit\">Log in</button></form></main>",
        esc(base)
    );
    document(base, "Log in", None, &body)
}

const PAGES: [(&str, &str); 6] = [
    ("tunnels", "Tunnels"),
    ("names", "Names"),
    ("bans", "Bans"),
    ("plugins", "Plugins"),
    ("scans", "Scans"),
    ("health", "Health"),
];

/// A hidden CSRF field for a form.
fn csrf_input(session: &Session) -> String {
    format!(
        "<input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{}\">",
        esc(&session.csrf)
    )
}

fn page(
    base: &str,
    session: &Session,
    title: &str,
    notice: Option<&str>,
    content: String,
) -> Response<Body> {
    let b = esc(base);
    let mut nav = String::new();
    for (slug, label) in PAGES {
        let current = if label == title {
            " class=\"current\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{b}/{slug}\"{current}>{label}</a>");
    }
    let notice = notice.map_or(String::new(), |n| {
        format!("<p class=\"notice\" id=\"notice\">{}</p>", esc(n))
    });
    let body = format!(
        "<header><strong>p0rt</strong><nav>{nav}</nav>\
         <form method=\"post\" action=\"{b}/logout\" class=\"logout\">{}\
         <button type=\"submit\" id=\"logout\">Log out</button></form></header>\
         <main><h1>{}</h1>{notice}{content}</main>",
        csrf_input(session),
        esc(title)
    );
    html(
        StatusCode::OK,
        document(base, title, Some(&session.csrf), &body),
    )
}

fn page_error(base: &str, e: &ConsoleError) -> Response<Body> {
    let body = format!(
        "<main><h1>{}</h1><p class=\"error\" id=\"error\">{}</p>\
         <p><a href=\"{}\">Back to the console</a></p></main>",
        e.status().as_u16(),
        esc(&e.to_string()),
        esc(base)
    );
    html(e.status(), document(base, "Error", None, &body))
}

/// A JSON value as one table cell's text.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => esc(s),
        Value::Number(_) | Value::Bool(_) => value.to_string(),
        other => esc(&other.to_string()),
    }
}

fn list_text(value: &Value) -> String {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// A table of JSON objects (columns: the first row's keys), with an optional action column.
fn json_table(id: &str, rows: &[Value], action: Option<&dyn Fn(&Value) -> String>) -> String {
    if rows.is_empty() {
        return format!("<p class=\"empty\" id=\"{id}-empty\">none</p>");
    }
    let columns: Vec<String> = match &rows[0] {
        Value::Object(map) => map.keys().cloned().collect(),
        _ => vec!["value".into()],
    };
    let mut out = format!("<table id=\"{id}\"><thead><tr>");
    for c in &columns {
        let _ = write!(out, "<th>{}</th>", esc(c));
    }
    if action.is_some() {
        out.push_str("<th></th>");
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for c in &columns {
            let value = match row {
                Value::Object(map) => map.get(c).cloned().unwrap_or(Value::Null),
                other => other.clone(),
            };
            let _ = write!(out, "<td>{}</td>", cell(&value));
        }
        if let Some(action) = action {
            let _ = write!(out, "<td>{}</td>", action(row));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

fn tunnels_body(base: &str, session: &Session, list: &Value) -> String {
    let b = esc(base);
    let mut rows = String::new();
    let empty = Vec::new();
    let tunnels = list["tunnels"].as_array().unwrap_or(&empty);
    for t in tunnels {
        let name = t["name"].as_str().unwrap_or_default();
        let _ = write!(
            rows,
            "<tr data-name=\"{n}\"><td data-field=\"name\">{n}</td>\
             <td data-field=\"fingerprint\">{}</td><td data-field=\"client\">{}</td>\
             <td data-field=\"since\">{}</td><td data-field=\"requests\">{}</td>\
             <td data-field=\"bytes_in\">{}</td><td data-field=\"bytes_out\">{}</td>\
             <td data-field=\"in_flight\">{}</td><td><form method=\"post\" \
             action=\"{b}/tunnels/{}/disconnect\">{}<button type=\"submit\" \
             class=\"disconnect\">Disconnect</button></form></td></tr>",
            cell(&t["fingerprint"]),
            cell(&t["client"]),
            cell(&t["since"]),
            cell(&t["requests"]),
            cell(&t["bytes_in"]),
            cell(&t["bytes_out"]),
            cell(&t["in_flight"]),
            esc(&path_part(name)),
            csrf_input(session),
            n = esc(name),
        );
    }
    format!(
        "<p class=\"live\" id=\"live\">Live: updated every second.</p>\
         <table id=\"tunnels\"><thead><tr><th>name</th><th>key</th><th>client</th>\
         <th>since</th><th>requests</th><th>bytes in</th><th>bytes out</th>\
         <th>in flight</th><th></th></tr></thead><tbody>{rows}</tbody></table>\
         <p class=\"empty\" id=\"tunnels-empty\"{}>no live tunnels</p>",
        if tunnels.is_empty() { "" } else { " hidden" }
    )
}

async fn names_page(
    edge: &HttpEdge,
    base: &str,
    session: &Session,
) -> Result<Response<Body>, ConsoleError> {
    let (_, domains) = api::domains(edge, &format!("per_page={}", api::MAX_PER_PAGE)).await?;
    let (_, reservations) = api::reservations(edge).await?;
    let empty = Vec::new();
    let content = format!(
        "<h2>Reservations</h2>{}<h2>Names ({} stored, first {} shown)</h2>{}",
        json_table(
            "reservations",
            reservations["reservations"].as_array().unwrap_or(&empty),
            None
        ),
        cell(&domains["total"]),
        api::MAX_PER_PAGE,
        json_table(
            "domains",
            domains["domains"].as_array().unwrap_or(&empty),
            None
        ),
    );
    Ok(page(base, session, "Names", None, content))
}

async fn bans_page(
    state: &AdminState,
    base: &str,
    session: &Session,
    notice: Option<&str>,
) -> Result<Response<Body>, ConsoleError> {
    let (_, bans) = api::bans(state).await?;
    let b = esc(base);
    let csrf = csrf_input(session);
    let unban = |row: &Value| {
        let ip = row["ip"].as_str().unwrap_or_default();
        format!(
            "<form method=\"post\" action=\"{b}/bans/{}/unban\">{csrf}\
             <button type=\"submit\" class=\"unban\">Unban</button></form>",
            esc(&path_part(ip))
        )
    };
    let unban_identity = |field: &'static str, list: &'static str| {
        let (b, csrf) = (b.clone(), csrf.clone());
        move |row: &Value| {
            let target = row[field].as_str().unwrap_or_default();
            format!(
                "<form method=\"post\" action=\"{b}/bans/{list}/{}/unban\">{csrf}\
                 <button type=\"submit\" class=\"unban\">Unban</button></form>",
                esc(&path_part(target))
            )
        }
    };
    let (unban_name, unban_key) = (
        unban_identity("name", "names"),
        unban_identity("key", "keys"),
    );
    let empty = Vec::new();
    let content = format!(
        "<h2>Addresses</h2>\
         <form method=\"post\" action=\"{b}/bans\" id=\"ban\" class=\"inline\">{csrf}\
         <label>Address <input name=\"ip\" id=\"ban-ip\" required></label>\
         <label>Seconds <input name=\"seconds\" inputmode=\"numeric\" \
         placeholder=\"{}\"></label><label>Reason <input name=\"reason\"></label>\
         <button type=\"submit\">Ban</button></form>{}\
         <h2>Names and keys</h2>\
         <form method=\"post\" action=\"{b}/bans/identity\" id=\"ban-identity\" \
         class=\"inline\">{csrf}<label>Ban <select name=\"kind\" id=\"ban-kind\">\
         <option value=\"name\">name</option><option value=\"key\">key</option></select>\
         </label><label>Name or key <input name=\"target\" id=\"ban-target\" required \
         placeholder=\"name, SHA256:… or key hash\"></label>\
         <label>Seconds <input name=\"seconds\" inputmode=\"numeric\" \
         placeholder=\"until lifted\"></label><label>Reason <input name=\"reason\"></label>\
         <button type=\"submit\">Ban</button></form><h3>Names</h3>{}<h3>Keys</h3>{}",
        api::DEFAULT_BAN.as_secs(),
        json_table(
            "bans",
            bans["addresses"].as_array().unwrap_or(&empty),
            Some(&unban)
        ),
        json_table(
            "name-bans",
            bans["names"].as_array().unwrap_or(&empty),
            Some(&unban_name)
        ),
        json_table(
            "key-bans",
            bans["keys"].as_array().unwrap_or(&empty),
            Some(&unban_key)
        ),
    );
    Ok(page(base, session, "Bans", notice, content))
}

fn plugins_page(
    state: &AdminState,
    base: &str,
    session: &Session,
    notice: Option<&str>,
) -> Response<Body> {
    let status = serde_json::to_value(state.plugins.status()).unwrap_or_default();
    let rows: Vec<Value> = match status {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        other => vec![other],
    };
    let content = format!(
        "<form method=\"post\" action=\"{}/plugins/reload\" id=\"reload\">{}\
         <button type=\"submit\">Reload plugins</button></form>{}",
        esc(base),
        csrf_input(session),
        json_table("plugins", &rows, None)
    );
    page(base, session, "Plugins", notice, content)
}

async fn scans_page(
    edge: &HttpEdge,
    base: &str,
    session: &Session,
) -> Result<Response<Body>, ConsoleError> {
    let jobs = edge
        .scans
        .list(None)
        .await
        .map_err(|e| AdminError::Unavailable(e.to_string()))?;
    let rows: Vec<Value> = serde_json::to_value(jobs)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    Ok(page(
        base,
        session,
        "Scans",
        None,
        json_table("scans", &rows, None),
    ))
}

fn health_page(
    edge: &HttpEdge,
    state: &AdminState,
    base: &str,
    session: &Session,
) -> Response<Body> {
    let status = api::status(edge, state);
    let mut content = String::from("<table id=\"health\"><tbody>");
    if let Value::Object(map) = &status {
        for (key, value) in map {
            let shown = match value {
                Value::Object(inner) => inner
                    .iter()
                    .map(|(k, v)| format!("{}: {}", esc(k), cell(v)))
                    .collect::<Vec<_>>()
                    .join(", "),
                other => cell(other),
            };
            let _ = write!(
                content,
                "<tr><th>{}</th><td data-field=\"{}\">{shown}</td></tr>",
                esc(key),
                esc(key)
            );
        }
    }
    content.push_str("</tbody></table>");
    page(base, session, "Health", None, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(path_part("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn admin_paths_are_checked() {
        use crate::config::check_admin_path;
        for good in ["/admin", "/ops/console", "/a-b_c9"] {
            assert!(check_admin_path(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/",
            "admin",
            "/admin/",
            "//x",
            "/a b",
            "/a?b",
            "/api",
            "/api/x",
            "/metrics",
            "/Health",
            "/status/x",
            "/domain-stats",
        ] {
            assert!(check_admin_path(bad).is_err(), "{bad}");
        }
        assert!(check_admin_path(&format!("/{}", "a".repeat(64))).is_err());
    }

    #[test]
    fn the_console_owns_its_path_and_below_only() {
        let console = ConsoleState::new("/admin", false);
        assert!(console.owns("/admin"));
        assert!(console.owns("/admin/"));
        assert!(console.owns("/admin/tunnels"));
        assert!(!console.owns("/administrator"));
        assert!(!console.owns("/"));
    }
}
