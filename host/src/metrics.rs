//! The host's metrics: per-tunnel live counters ([`crate::tunnels::TunnelStats`]) and the
//! process-wide Prometheus registry served at `/metrics` on the base domain (to the same
//! callers as the admin API, see [`crate::admin::authorize`]).
//!
//! Labels are bounded: status classes, fixed reason and verdict words, plugin roles, cache
//! backends and operations, scan job states; never a tunnel name, key or address. Plugin
//! names are the one label taken from outside the code (file names in the plugins
//! directory, which only the operator writes): each is reduced to a safe label once, when
//! the plugin loads ([`plugin_label`]), and after [`MAX_PLUGIN_LABELS`] distinct names every
//! further one counts as `other`, so even a directory rewritten forever adds a bounded number
//! of series. The hot paths call the one-line functions here ([`ssh_connection`],
//! [`ssh_auth_failure`], [`count_response`], [`DecisionCounters`], [`cache_op`]…); gauges that
//! mirror state (live tunnels, bans, Redis health) are read when scraped.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cache::RedisHealth;
use crate::http::{Body, HttpEdge, full};
use crate::tunnels::{Tunnel, TunnelStats};

/// Content type of the Prometheus text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Latency buckets: 1 ms doubling to about 33 s.
const LATENCY_BUCKETS: (f64, f64, u16) = (0.001, 2.0, 16);
/// Most distinct plugin names used as label values; later ones count as [`OTHER_PLUGIN`].
pub const MAX_PLUGIN_LABELS: usize = 32;
/// Longest plugin name kept in a label value (longer ones are cut).
pub const MAX_PLUGIN_LABEL_CHARS: usize = 64;
/// The label value of plugins beyond [`MAX_PLUGIN_LABELS`].
pub const OTHER_PLUGIN: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Class {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decision {
    role: &'static str,
    plugin: Arc<str>,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Failure {
    role: &'static str,
    plugin: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Fallback {
    role: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheOp {
    backend: &'static str,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

struct Metrics {
    registry: Registry,
    ssh_connections: Counter,
    ssh_auth_failures: Family<Reason, Counter>,
    requests: Family<Class, Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
    latency: Histogram,
    tunnels: Gauge,
    bans: Family<Kind, Gauge>,
    redis_healthy: Gauge,
    redis_enabled: Gauge,
    plugin_decisions: Family<Decision, Counter>,
    plugin_failures: Family<Failure, Counter>,
    plugin_fallbacks: Family<Fallback, Counter>,
    cache_ops: Family<CacheOp, Counter>,
    scan_jobs: Family<State, Counter>,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("p0rt");
        let m = Metrics {
            registry: Registry::default(),
            ssh_connections: Counter::default(),
            ssh_auth_failures: Family::default(),
            requests: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            latency: Histogram::new(exponential_buckets(
                LATENCY_BUCKETS.0,
                LATENCY_BUCKETS.1,
                LATENCY_BUCKETS.2,
            )),
            tunnels: Gauge::default(),
            bans: Family::default(),
            redis_healthy: Gauge::default(),
            redis_enabled: Gauge::default(),
            plugin_decisions: Family::default(),
            plugin_failures: Family::default(),
            plugin_fallbacks: Family::default(),
            cache_ops: Family::default(),
            scan_jobs: Family::default(),
        };
        registry.register(
            "ssh_connections",
            "SSH connections accepted",
            m.ssh_connections.clone(),
        );
        registry.register(
            "ssh_auth_failures",
            "SSH connections refused at authentication, by reason",
            m.ssh_auth_failures.clone(),
        );
        registry.register(
            "http_requests",
            "Requests that reached a live tunnel, by status class",
            m.requests.clone(),
        );
        registry.register(
            "http_request_bytes",
            "Declared request body bytes sent to tunnels",
            m.bytes_in.clone(),
        );
        registry.register(
            "http_response_bytes",
            "Response body bytes sent to visitors of tunnels",
            m.bytes_out.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response headers, for tunnels",
            m.latency.clone(),
        );
        registry.register(
            "tunnels_live",
            "Live tunnels on this host",
            m.tunnels.clone(),
        );
        registry.register(
            "bans_active",
            "Bans in force, by kind (address, name, key)",
            m.bans.clone(),
        );
        registry.register(
            "redis_healthy",
            "1 when the cache's Redis answers, else 0",
            m.redis_healthy.clone(),
        );
        registry.register(
            "redis_enabled",
            "1 when the host uses Redis for its cache",
            m.redis_enabled.clone(),
        );
        registry.register(
            "plugin_decisions",
            "Answers of policy plugins (rate-limit answers reused from a lease included), by \
             role, plugin and verdict",
            m.plugin_decisions.clone(),
        );
        registry.register(
            "plugin_failures",
            "Calls a policy plugin failed, by role, plugin and reason",
            m.plugin_failures.clone(),
        );
        registry.register(
            "plugin_fallbacks",
            "Decisions the host's fallback made because a plugin could not, by role and reason",
            m.plugin_fallbacks.clone(),
        );
        registry.register(
            "cache_operations",
            "Cache operations, by the backend that served them (redis, memory) and operation",
            m.cache_ops.clone(),
        );
        registry.register(
            "scan_jobs",
            "Scan jobs that reached each state on this host",
            m.scan_jobs.clone(),
        );
        Metrics { registry, ..m }
    })
}

/// One SSH connection accepted.
pub fn ssh_connection() {
    metrics().ssh_connections.inc();
}

/// One SSH connection refused at authentication; `reason` is one of a fixed set of words.
pub fn ssh_auth_failure(reason: &'static str) {
    metrics()
        .ssh_auth_failures
        .get_or_create(&Reason { reason })
        .inc();
}

/// The label value for a plugin named `name`: its name made safe for the text format
/// (letters, digits, `-`, `_`, `.`; anything else becomes `_`) and cut to
/// [`MAX_PLUGIN_LABEL_CHARS`], or [`OTHER_PLUGIN`] once [`MAX_PLUGIN_LABELS`] distinct names
/// have been seen. Called when a plugin loads, never per call.
pub fn plugin_label(name: &str) -> Arc<str> {
    static SEEN: Mutex<Vec<Arc<str>>> = Mutex::new(Vec::new());
    let clean: String = name
        .chars()
        .take(MAX_PLUGIN_LABEL_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = seen.iter().find(|s| &***s == clean.as_str()) {
        return known.clone();
    }
    if seen.len() >= MAX_PLUGIN_LABELS {
        return Arc::from(OTHER_PLUGIN);
    }
    let label: Arc<str> = Arc::from(clean);
    seen.push(label.clone());
    label
}

/// One plugin's answers by verdict: `p0rt_plugin_decisions_total` for its role (the role's
/// WIT interface name) and label (see [`plugin_label`]), counted without hashing the label
/// set on every answer: each verdict's counter is looked up in the family once, on its
/// first use, and kept.
pub struct DecisionCounters {
    role: &'static str,
    plugin: Arc<str>,
    by_verdict: std::sync::RwLock<Vec<(&'static str, Counter)>>,
}

impl DecisionCounters {
    pub fn new(role: &'static str, plugin: Arc<str>) -> DecisionCounters {
        DecisionCounters {
            role,
            plugin,
            by_verdict: Default::default(),
        }
    }

    /// One answer `verdict` (a fixed word).
    pub fn inc(&self, verdict: &'static str) {
        let known = self.by_verdict.read().unwrap_or_else(|p| p.into_inner());
        if let Some((_, counter)) = known.iter().find(|(v, _)| *v == verdict) {
            counter.inc();
            return;
        }
        drop(known);
        let counter = metrics()
            .plugin_decisions
            .get_or_create(&Decision {
                role: self.role,
                plugin: self.plugin.clone(),
                verdict,
            })
            .clone();
        counter.inc();
        let mut known = self.by_verdict.write().unwrap_or_else(|p| p.into_inner());
        if !known.iter().any(|(v, _)| *v == verdict) {
            known.push((verdict, counter));
        }
    }
}

/// One failed call of a plugin; `reason` is a fixed word ([`crate::plugins::PluginError::word`]).
pub fn plugin_failure(role: &'static str, plugin: &Arc<str>, reason: &'static str) {
    metrics()
        .plugin_failures
        .get_or_create(&Failure {
            role,
            plugin: plugin.clone(),
            reason,
        })
        .inc();
}

/// One decision made by the host's fallback for `role`, because of `reason` (a fixed word).
pub fn plugin_fallback(role: &'static str, reason: &'static str) {
    metrics()
        .plugin_fallbacks
        .get_or_create(&Fallback { role, reason })
        .inc();
}

/// One cache operation `op` served by `backend` (`redis` or `memory`).
pub fn cache_op(backend: &'static str, op: &'static str) {
    metrics()
        .cache_ops
        .get_or_create(&CacheOp { backend, op })
        .inc();
}

/// One scan job reached `state` on this host.
pub fn scan_job(state: &'static str) {
    metrics().scan_jobs.get_or_create(&State { state }).inc();
}

/// The request counter of `status`'s class. Each class's counter is looked up in the family
/// (hashing its label set) once, on its first use, and kept: this runs for every request.
fn class_counter(status: StatusCode) -> &'static Counter {
    static CLASSES: [OnceLock<Counter>; 5] = [const { OnceLock::new() }; 5];
    let class = class(status);
    let index = match class.as_bytes()[0] {
        b'1' => 0,
        b'2' => 1,
        b'3' => 2,
        b'4' => 3,
        _ => 4,
    };
    CLASSES[index].get_or_init(|| metrics().requests.get_or_create(&Class { class }).clone())
}

fn class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

pin_project_lite::pin_project! {
    /// A response body that adds the bytes it yields to a tunnel's `bytes_out`.
    struct Counting {
        #[pin]
        inner: Body,
        stats: Arc<TunnelStats>,
    }
}

impl HttpBody for Counting {
    type Data = Bytes;
    type Error = crate::http::limits::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.stats.bytes_out.fetch_add(data.len() as u64, Relaxed);
            metrics().bytes_out.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts one request that reached `tunnel` (its declared body length as `bytes_in`, its
/// status class, its time to response headers since `started`), and wraps the response
/// so its body bytes count as `bytes_out`.
pub fn count_response(
    tunnel: Option<&Arc<Tunnel>>,
    declared_in: Option<u64>,
    elapsed: Duration,
    response: Response<Body>,
) -> Response<Body> {
    let Some(tunnel) = tunnel else {
        return response;
    };
    let m = metrics();
    class_counter(response.status()).inc();
    m.latency.observe(elapsed.as_secs_f64());
    m.bytes_in.inc_by(declared_in.unwrap_or(0));
    let stats = tunnel.stats.clone();
    stats.requests.fetch_add(1, Relaxed);
    stats.bytes_in.fetch_add(declared_in.unwrap_or(0), Relaxed);
    response.map(|inner| Counting { inner, stats }.boxed())
}

/// A request's declared body length (`Content-Length`), if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// `GET /metrics` on the base domain: the Prometheus text, to the admin API's callers.
pub async fn serve(headers: &HeaderMap, peer: SocketAddr, edge: &HttpEdge) -> Response<Body> {
    if let Err(e) = crate::admin::authorize(peer.ip(), headers, edge.admin_token.as_ref()) {
        return crate::admin::api::error_response(&e);
    }
    let m = metrics();
    m.tunnels.set(edge.tunnels.live_tunnels().len() as i64);
    let (enabled, healthy) = match edge.cache.health() {
        RedisHealth::Healthy { .. } => (1, 1),
        RedisHealth::Unhealthy { .. } => (1, 0),
        RedisHealth::Disabled => (0, 0),
    };
    m.redis_enabled.set(enabled);
    m.redis_healthy.set(healthy);
    if let Some(admin) = &edge.admin {
        if let Ok(count) = admin.bans.count().await {
            m.bans
                .get_or_create(&Kind { kind: "address" })
                .set(count as i64);
        }
        let (names, keys) = admin.bans.identity_counts();
        m.bans
            .get_or_create(&Kind { kind: "name" })
            .set(names as i64);
        m.bans.get_or_create(&Kind { kind: "key" }).set(keys as i64);
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &m.registry) {
        tracing::warn!("encoding metrics failed: {e}");
    }
    full(StatusCode::OK, CONTENT_TYPE, text)
}

/// Connections the separate metrics listener serves at once (scrapers are few).
pub const MAX_LISTENER_CONNECTIONS: usize = 16;
/// Time a client of the metrics listener has to send its request headers.
const LISTENER_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The separate metrics listener (`metrics.listen`): `GET /metrics` and nothing else, to
/// the same callers as the base domain's (the admin token, or direct loopback clients when
/// none is set), whatever the `Host` header. Runs until `stop`.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    edge: Arc<HttpEdge>,
    mut stop: crate::shutdown::Stop,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_LISTENER_CONNECTIONS));
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("metrics listener accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.stopped() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let edge = edge.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let edge = edge.clone();
                    async move {
                        let response = if req.uri().path() != "/metrics" {
                            full(
                                StatusCode::NOT_FOUND,
                                "text/plain; charset=utf-8",
                                "only /metrics is served here\n",
                            )
                        } else if req.method() != http::Method::GET
                            && req.method() != http::Method::HEAD
                        {
                            full(
                                StatusCode::METHOD_NOT_ALLOWED,
                                "text/plain; charset=utf-8",
                                "GET /metrics\n",
                            )
                        } else {
                            serve(req.headers(), peer, &edge).await
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(LISTENER_HEADER_TIMEOUT);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(socket), service)
                .await
            {
                tracing::debug!("metrics connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_labels_are_safe_and_bounded() {
        assert_eq!(&*plugin_label("ratelimit"), "ratelimit");
        assert_eq!(&*plugin_label("we\"ird\nname{x}"), "we_ird_name_x_");
        assert_eq!(plugin_label(&"x".repeat(500)).len(), MAX_PLUGIN_LABEL_CHARS);
        for i in 0..MAX_PLUGIN_LABELS * 2 {
            let label = plugin_label(&format!("many-{i}"));
            assert!(label.starts_with("many-") || &*label == OTHER_PLUGIN);
        }
        assert_eq!(&*plugin_label("one-more-name"), OTHER_PLUGIN);
        // Names seen before keep their label.
        assert_eq!(&*plugin_label("ratelimit"), "ratelimit");
    }
}
