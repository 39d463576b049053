//! `ratelimit`: fixed-window request limits per client IP, per tunnel and per owner key.
//!
//! Counters live in the host cache (`increment` with a TTL of one window), so they are
//! shared by every host when the cache is Redis. Configuration (sidecar `ratelimit.json`):
//!
//! ```json
//! { "per_ip":     { "limit": 600,  "window_seconds": 60 },
//!   "per_tunnel": { "limit": 3000, "window_seconds": 60 },
//!   "per_key":    { "limit": 6000, "window_seconds": 60 } }
//! ```
//! A limit of 0 turns that bucket off.

use std::cell::RefCell;

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit", world: "rate-limit-plugin" });

use exports::p0rt::policy::rate_limit::{Decision, Denial, Guest as RateLimit, RequestInfo};
use p0rt::policy::{cache, clock};

#[derive(Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Bucket {
    limit: u32,
    window_seconds: u32,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    per_ip: Bucket,
    per_tunnel: Bucket,
    per_key: Bucket,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            per_ip: Bucket {
                limit: 600,
                window_seconds: 60,
            },
            per_tunnel: Bucket {
                limit: 3000,
                window_seconds: 60,
            },
            per_key: Bucket {
                limit: 6000,
                window_seconds: 60,
            },
        }
    }
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
}

struct RateLimiter;

/// Counts one request in `bucket` for `subject`; returns the seconds until the window ends
/// if the limit is exceeded.
fn over_limit(kind: &str, subject: &str, bucket: Bucket, now: i64) -> Option<u32> {
    if bucket.limit == 0 || bucket.window_seconds == 0 {
        return None;
    }
    let window = i64::from(bucket.window_seconds);
    let index = now.div_euclid(window);
    let key = format!("{kind}:{subject}:{index}");
    let count = cache::increment(&key, 1, Some(bucket.window_seconds));
    if count > i64::from(bucket.limit) {
        Some(((index + 1) * window - now).max(1) as u32)
    } else {
        None
    }
}

impl RateLimit for RateLimiter {
    fn check(request: RequestInfo) -> Decision {
        let config = CONFIG.with(|c| *c.borrow());
        let now = clock::now_unix_seconds();
        let checks = [
            (
                "ip",
                request.client_ip.as_str(),
                config.per_ip,
                "too many requests from your address",
            ),
            (
                "tunnel",
                request.name.as_str(),
                config.per_tunnel,
                "this tunnel is receiving too many requests",
            ),
            (
                "key",
                request.owner_key_hash.as_str(),
                config.per_key,
                "this tunnel owner's request budget is used up",
            ),
        ];
        for (kind, subject, bucket, message) in checks {
            if let Some(retry) = over_limit(kind, subject, bucket, now) {
                return Decision::Deny(Denial {
                    status: 429,
                    retry_after_seconds: Some(retry),
                    message: message.to_string(),
                });
            }
        }
        Decision::Allow
    }
}

impl exports::p0rt::policy::init::Guest for RateLimiter {
    fn init(config: String) -> Result<(), String> {
        let parsed: Config =
            serde_json::from_str(&config).map_err(|e| format!("ratelimit config: {e}"))?;
        CONFIG.with(|c| *c.borrow_mut() = parsed);
        Ok(())
    }
}

export!(RateLimiter);
