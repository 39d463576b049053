//! The host's metrics: per-tunnel live counters ([`crate::tunnels::TunnelStats`]) and the
//! process-wide Prometheus registry served at `/metrics` on the base domain (to the same
//! callers as the admin API, see [`crate::admin::authorize`]).
//!
//! Labels are bounded: status classes, fixed reason words; never a tunnel name, key or
//! address. The hot paths call the one-line functions here ([`ssh_connection`],
//! [`ssh_auth_failure`], [`count_response`]); gauges that mirror state (live tunnels, bans,
//! Redis health) are read when scraped.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Class {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
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
    bans: Gauge,
    redis_healthy: Gauge,
    redis_enabled: Gauge,
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
            bans: Gauge::default(),
            redis_healthy: Gauge::default(),
            redis_enabled: Gauge::default(),
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
        registry.register("bans_active", "Addresses banned now", m.bans.clone());
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
    started: Instant,
    response: Response<Body>,
) -> Response<Body> {
    let Some(tunnel) = tunnel else {
        return response;
    };
    let m = metrics();
    m.requests
        .get_or_create(&Class {
            class: class(response.status()),
        })
        .inc();
    m.latency.observe(started.elapsed().as_secs_f64());
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
    if let Some(admin) = &edge.admin
        && let Ok(bans) = admin.bans.list().await
    {
        m.bans.set(bans.len() as i64);
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &m.registry) {
        tracing::warn!("encoding metrics failed: {e}");
    }
    full(StatusCode::OK, CONTENT_TYPE, text)
}
