//! The HTTP/1.1 client one host uses to forward requests to another host's internal
//! listener: connections are pooled per peer and reused across requests; upgrades
//! (WebSocket) get the connection to themselves.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A request or response body between hosts (the HTTP edge's own body type).
pub type PeerBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Time allowed to connect to another host's internal listener; beyond it the host is
/// taken as unreachable for this request.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections kept per peer host.
pub const MAX_IDLE_PER_PEER: usize = 64;
/// An idle connection to a peer unused this long is closed.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub type PeerClient = Client<HttpConnector, PeerBody>;

pub fn new_client() -> PeerClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(PEER_CONNECT_TIMEOUT));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(MAX_IDLE_PER_PEER)
        .pool_idle_timeout(PEER_IDLE_TIMEOUT)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        // The owning host answers with exactly what its backend sent.
        .set_host(false)
        .build(connector)
}
