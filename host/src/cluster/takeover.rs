//! Takeover across hosts: a host that starts serving a name publishes it on
//! `{prefix}cluster:takeover` (Redis pub/sub; a cluster delivers it on every node), and the
//! host that served it for the same key lets its old tunnel go at once. The subscription is
//! made again whenever the connection breaks (a Redis restart), and each time it is, the
//! host renews its leases at once, since a restarted Redis may have lost them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::redis_link::{RedisLink, RedisOpError};

/// Pause before subscribing again after the subscription broke or could not be made.
pub const RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(500);
/// Longest message read from the channel; anything longer is not ours.
const MAX_MESSAGE_BYTES: usize = 4096;

/// One takeover: `host` serves `name` for `owner` from now on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Takeover {
    pub name: String,
    pub host: String,
    pub owner: String,
}

pub fn channel(prefix: &str) -> String {
    format!("{prefix}cluster:takeover")
}

pub async fn publish(
    link: &Arc<RedisLink>,
    prefix: &str,
    takeover: &Takeover,
) -> Result<(), RedisOpError> {
    let mut cmd = redis::cmd("PUBLISH");
    cmd.arg(channel(prefix))
        .arg(serde_json::to_string(takeover).unwrap_or_default());
    link.query::<i64>(&cmd, super::leases::WRITE_TIMEOUT)
        .await
        .map(|_| ())
}

/// Subscribes and hands every takeover to `on_takeover` until `stop`; calls `on_subscribed`
/// each time a subscription is (re)made.
pub async fn listen(
    link: Arc<RedisLink>,
    prefix: String,
    mut stop: crate::shutdown::Stop,
    on_subscribed: impl Fn(),
    on_takeover: impl Fn(Takeover),
) {
    let channel = channel(&prefix);
    let mut broken = false;
    loop {
        let subscribed = async {
            let mut pubsub = link.pubsub().await?;
            pubsub
                .subscribe(&channel)
                .await
                .map_err(|e| RedisOpError::Unreachable(e.to_string()))?;
            Ok::<_, RedisOpError>(pubsub)
        };
        let pubsub = tokio::select! {
            pubsub = subscribed => pubsub,
            _ = stop.stopped() => return,
        };
        match pubsub {
            Ok(pubsub) => {
                if broken {
                    tracing::info!("cluster: subscribed to {channel} again");
                }
                on_subscribed();
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message,
                        _ = stop.stopped() => return,
                    };
                    let Some(message) = message else { break };
                    let payload = message.get_payload_bytes();
                    if payload.len() > MAX_MESSAGE_BYTES {
                        continue;
                    }
                    match serde_json::from_slice::<Takeover>(payload) {
                        Ok(takeover) => on_takeover(takeover),
                        Err(e) => tracing::debug!("cluster: unreadable takeover message: {e}"),
                    }
                }
                tracing::warn!("cluster: lost the subscription to {channel}; subscribing again");
                broken = true;
            }
            Err(e) => {
                if !broken {
                    tracing::warn!("cluster: cannot subscribe to {channel}: {e}; retrying");
                }
                broken = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUBSCRIBE_BACKOFF) => {}
            _ = stop.stopped() => return,
        }
    }
}
