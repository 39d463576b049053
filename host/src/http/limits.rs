//! What keeps one client, one tunnel or one slow backend from holding the HTTP edge: idle
//! timeouts on bodies both ways, a per-address connection cap, a per-tunnel cap on requests
//! in flight, and the client address as the edge resolves it (the TCP peer, or what a
//! configured trusted proxy forwarded).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use ipnet::IpNet;
use tokio::time::{Instant, Sleep};

/// Longest a request body may pause between two pieces before the request is dropped (408):
/// a client that announces a body and stops sending would otherwise hold its connection and
/// a channel to the backend for ever.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the backend may take to start its response (504).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a response body may pause between two pieces before it is cut off (like nginx's
/// `proxy_read_timeout`; a stream that sends nothing for longer is ended).
pub const RESPONSE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Concurrent HTTP connections from one client address; more are closed at accept.
pub const MAX_CONNECTIONS_PER_IP: usize = 256;
/// Requests in flight to one tunnel (until their response body ends); more get 503 with
/// `Retry-After`, so a slow backend cannot take the host's memory with it.
pub const MAX_IN_FLIGHT_PER_TUNNEL: usize = 128;
/// `Retry-After` seconds on a 503 for a busy tunnel.
pub const BUSY_RETRY_AFTER_SECONDS: u32 = 1;
/// Most `X-Forwarded-For` entries walked back from the right when the peer is trusted.
const MAX_FORWARDED_HOPS: usize = 16;
/// Concurrent HTTP connections accepted; beyond this new connections are closed at once.
pub const MAX_HTTP_CONNECTIONS: usize = 50_000;
/// A client must send its complete request headers within this time; a keep-alive
/// connection that sends no new request for as long is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest timeout setting accepted: longer ones only help a slow client hold resources.
pub const MAX_TIMEOUT_SETTING: Duration = Duration::from_secs(24 * 60 * 60);

/// Every HTTP edge limit an operator can set (`http.limits.*`; README, "HTTP edge limits").
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub max_in_flight_per_tunnel: usize,
    pub header_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub response_timeout: Duration,
    pub response_idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: MAX_HTTP_CONNECTIONS,
            max_connections_per_address: MAX_CONNECTIONS_PER_IP,
            max_in_flight_per_tunnel: MAX_IN_FLIGHT_PER_TUNNEL,
            header_timeout: HEADER_READ_TIMEOUT,
            body_idle_timeout: BODY_IDLE_TIMEOUT,
            response_timeout: RESPONSE_TIMEOUT,
            response_idle_timeout: RESPONSE_IDLE_TIMEOUT,
        }
    }
}

impl HttpLimits {
    /// Refuses zero caps and timeouts outside 1 s to [`MAX_TIMEOUT_SETTING`]; the error
    /// names the setting.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (key, value) in [
            ("http.limits.max_connections", self.max_connections),
            (
                "http.limits.max_connections_per_address",
                self.max_connections_per_address,
            ),
            (
                "http.limits.max_in_flight_per_tunnel",
                self.max_in_flight_per_tunnel,
            ),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        for (key, value) in [
            ("http.limits.header_timeout_seconds", self.header_timeout),
            (
                "http.limits.body_idle_timeout_seconds",
                self.body_idle_timeout,
            ),
            (
                "http.limits.response_timeout_seconds",
                self.response_timeout,
            ),
            (
                "http.limits.response_idle_timeout_seconds",
                self.response_idle_timeout,
            ),
        ] {
            if value < Duration::from_secs(1) || value > MAX_TIMEOUT_SETTING {
                return Err((
                    key,
                    format!("must be 1 to {} seconds", MAX_TIMEOUT_SETTING.as_secs()),
                ));
            }
        }
        Ok(())
    }

    /// The startup line listing every HTTP limit.
    pub fn describe(&self) -> String {
        format!(
            "http limits: connections {} (per address {}); requests in flight per tunnel {} \
             (then 503, Retry-After {BUSY_RETRY_AFTER_SECONDS}s); headers and keep-alive idle \
             {}s; request body idle {}s; response start {}s, response body idle {}s",
            self.max_connections,
            self.max_connections_per_address,
            self.max_in_flight_per_tunnel,
            self.header_timeout.as_secs(),
            self.body_idle_timeout.as_secs(),
            self.response_timeout.as_secs(),
            self.response_idle_timeout.as_secs(),
        )
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body went quiet for longer than its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}")]
pub struct BodyStalled(pub Duration);

pin_project_lite::pin_project! {
    /// A body that fails with [`BodyStalled`] when no frame arrives for `timeout`, and holds
    /// `guard` until it ends (or is dropped). The timer is armed only while the body waits.
    pub struct IdleBody<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        sleep: Option<Pin<Box<Sleep>>>,
        guard: Option<InFlightGuard>,
    }
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, timeout: Duration, guard: Option<InFlightGuard>) -> Self {
        IdleBody {
            inner,
            timeout,
            sleep: None,
            guard,
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(sleep) = this.sleep.as_mut() {
                    sleep.as_mut().reset(Instant::now() + *this.timeout);
                }
                if frame.is_none() {
                    this.guard.take();
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = *this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.guard.take();
                        Poll::Ready(Some(Err(Box::new(BodyStalled(timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts something in flight; the count drops with the guard.
pub struct InFlightGuard(Arc<AtomicUsize>);

impl InFlightGuard {
    /// A guard if fewer than `max` are in flight.
    pub fn try_new(count: &Arc<AtomicUsize>, max: usize) -> Option<InFlightGuard> {
        let mut current = count.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match count.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(InFlightGuard(count.clone())),
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Open connections per client address.
#[derive(Default)]
pub struct PerIpConnections {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerIpConnections`].
pub struct ConnectionSlot {
    table: Arc<PerIpConnections>,
    ip: IpAddr,
}

impl PerIpConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection from `ip`, unless it has `max` open already.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ConnectionSlot> {
        let mut open = self.lock();
        let count = open.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.table.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Proxies whose forwarded client address the edge believes.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(pub Vec<IpNet>);

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the TCP peer, unless the peer is a trusted proxy; then the
    /// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its
    /// left were written by parties nobody vouches for). `Forwarded: for=` is read when there
    /// is no `X-Forwarded-For`. Unparsable entries end the walk at the last trusted hop.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let mut hops: Vec<String> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_string())
            .collect();
        if hops.is_empty() {
            hops = headers
                .get_all(http::header::FORWARDED)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|element| {
                    element.split(';').find_map(|pair| {
                        let (key, value) = pair.trim().split_once('=')?;
                        key.eq_ignore_ascii_case("for")
                            .then(|| forwarded_for(value))
                    })
                })
                .collect();
        }
        let mut client = peer;
        for hop in hops.iter().rev().take(MAX_FORWARDED_HOPS) {
            let Ok(ip) = hop.parse::<IpAddr>() else { break };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// The address in a `Forwarded` `for=` value: `"[2001:db8::1]:4711"`, `192.0.2.1:80`, …
fn forwarded_for(value: &str) -> String {
    let value = value.trim().trim_matches('"');
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("").to_string();
    }
    match value.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host.to_string()
        }
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::BodyExt;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let none = TrustedProxies::default();
        let spoof = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(none.client_ip(ip("192.0.2.1"), &spoof), ip("192.0.2.1"));
        let lb = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()]);
        // An untrusted peer's header is ignored.
        assert_eq!(lb.client_ip(ip("192.0.2.1"), &spoof), ip("192.0.2.1"));
        // Through the balancer: the rightmost untrusted entry, not the client's own claims.
        let chain = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")]);
        assert_eq!(lb.client_ip(ip("10.0.0.5"), &chain), ip("203.0.113.9"));
        let fwd = headers(&[("forwarded", "for=\"[2001:db8::7]:4711\";proto=https")]);
        assert_eq!(lb.client_ip(ip("10.0.0.5"), &fwd), ip("2001:db8::7"));
        let fwd4 = headers(&[("forwarded", "for=198.51.100.4:80")]);
        assert_eq!(lb.client_ip(ip("10.0.0.5"), &fwd4), ip("198.51.100.4"));
        let junk = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(lb.client_ip(ip("10.0.0.5"), &junk), ip("10.0.0.5"));
    }

    #[test]
    fn per_ip_slots_are_capped_and_released() {
        let table = Arc::new(PerIpConnections::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let slots: Vec<_> = (0..3).filter_map(|_| table.try_open(ip, 2)).collect();
        assert_eq!(slots.len(), 2);
        assert!(table.try_open("192.0.2.2".parse().unwrap(), 2).is_some());
        drop(slots);
        assert!(table.try_open(ip, 2).is_some());
        assert!(table.lock().len() <= 1);
    }

    #[test]
    fn in_flight_is_capped_and_released() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = InFlightGuard::try_new(&count, 2).unwrap();
        let _b = InFlightGuard::try_new(&count, 2).unwrap();
        assert!(InFlightGuard::try_new(&count, 2).is_none());
        drop(a);
        assert!(InFlightGuard::try_new(&count, 2).is_some());
    }

    #[tokio::test]
    async fn a_stalled_body_fails_after_its_idle_timeout() {
        use futures_util::StreamExt;
        let frames = futures_util::stream::iter(vec![Ok::<_, BoxError>(Frame::data(
            Bytes::from_static(b"abc"),
        ))])
        .chain(futures_util::stream::pending());
        let count = Arc::new(AtomicUsize::new(0));
        let guard = InFlightGuard::try_new(&count, 1);
        let body = IdleBody::new(
            http_body_util::StreamBody::new(frames),
            Duration::from_millis(50),
            guard,
        );
        let mut body = std::pin::pin!(body);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "abc");
        let stalled = body.frame().await.unwrap();
        assert!(stalled.unwrap_err().is::<BodyStalled>());
        assert_eq!(
            count.load(Ordering::Relaxed),
            0,
            "the guard goes with the stall"
        );
    }
}
