//! The base domain's own endpoints: front page, health, domain stats, plugin status.

use std::net::SocketAddr;

use http::header::{self, HeaderMap};
use http::{Response, StatusCode};

use super::error::EdgeError;
use super::{Body, HttpEdge, full};
use crate::cache::{Cache, RedisHealth};

pub async fn endpoint(
    path: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    edge: &HttpEdge,
) -> Result<Response<Body>, EdgeError> {
    let admin_only = |path: &'static str| {
        if admin_allowed(headers, peer, edge) {
            Ok(())
        } else {
            Err(EdgeError::AdminOnly(path))
        }
    };
    Ok(match path {
        "/health" => full(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/health/redis" => redis_health(&edge.cache, admin_allowed(headers, peer, edge)),
        "/status/plugins" => {
            admin_only("/status/plugins")?;
            let status = (edge.plugin_status)();
            full(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&status).unwrap_or_default(),
            )
        }
        "/status/cluster" => {
            admin_only("/status/cluster")?;
            let status = match &edge.cluster {
                Some(cluster) => cluster.status().await,
                None => serde_json::json!({ "enabled": false }),
            };
            full(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&status).unwrap_or_default(),
            )
        }
        "/domain-stats" => {
            admin_only("/domain-stats")?;
            let stats = edge
                .store
                .stats(crate::unix_now())
                .await
                .map_err(EdgeError::Store)?;
            full(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&stats).unwrap_or_default(),
            )
        }
        "/" => full(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            format!(
                "p0rt tunnel host\n\nssh -p {} -R 80:localhost:3000 {}\n",
                edge.ssh_port, edge.domain
            ),
        ),
        _ => return Err(EdgeError::UnknownName),
    })
}

/// The seed's `/health/redis` shapes. Error details (which may name hosts) only go to
/// loopback or admin clients.
fn redis_health(cache: &Cache, detailed: bool) -> Response<Body> {
    // Field order as in the seed's examples.
    #[derive(serde::Serialize)]
    struct Shape<'a> {
        status: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        latency_ms: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        message: &'a str,
    }
    let (status, shape) = match cache.health() {
        RedisHealth::Healthy { latency_ms } => (
            StatusCode::OK,
            Shape {
                status: "healthy",
                latency_ms: Some(latency_ms),
                error: None,
                message: "Redis connection is healthy",
            },
        ),
        RedisHealth::Unhealthy { error } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Shape {
                status: "unhealthy",
                latency_ms: None,
                error: Some(if detailed {
                    error
                } else {
                    "connection failed".to_string()
                }),
                message: "Redis connection failed",
            },
        ),
        RedisHealth::Disabled => (
            StatusCode::OK,
            Shape {
                status: "disabled",
                latency_ms: None,
                error: None,
                message: "Redis is not available or not configured",
            },
        ),
    };
    full(
        status,
        "application/json",
        serde_json::to_vec(&shape).unwrap_or_default(),
    )
}

fn admin_allowed(headers: &HeaderMap, peer: SocketAddr, edge: &HttpEdge) -> bool {
    if peer.ip().is_loopback() {
        return true;
    }
    let Some(token) = &edge.admin_token else {
        return false;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(presented.as_bytes(), token.expose().as_bytes())
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
