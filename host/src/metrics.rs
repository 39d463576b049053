//! Counters of the host: per-tunnel live counters ([`crate::tunnels::TunnelStats`]) fed by
//! the HTTP edge through [`count_response`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::http::Body;
use crate::tunnels::{Tunnel, TunnelStats};

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

/// Counts one request that reached `tunnel` (its declared body length as `bytes_in`), and
/// wraps the response so its body bytes count as `bytes_out`.
pub fn count_response(
    tunnel: Option<&Arc<Tunnel>>,
    declared_in: Option<u64>,
    response: Response<Body>,
) -> Response<Body> {
    let Some(tunnel) = tunnel else {
        return response;
    };
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
