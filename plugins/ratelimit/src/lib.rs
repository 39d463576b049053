//! `ratelimit`: fixed-window request limits per client IP, per tunnel and per owner key.
//!
//! Counters live in the host cache (`increment-many` with a TTL of one window), so they are
//! shared by every host when the cache is Redis. Configuration (sidecar `ratelimit.json`):
//!
//! ```json
//! { "per_ip":     { "limit": 600,  "window_seconds": 60 },
//!   "per_tunnel": { "limit": 3000, "window_seconds": 60 },
//!   "per_key":    { "limit": 6000, "window_seconds": 60 } }
//! ```
//! A limit of 0 turns that bucket off.
//!
//! Per tier (the `owner-tier` the operator's key list gives the tunnel owner's key), other
//! limits, in the same shape; a bucket a tier leaves out keeps the top-level one, and a
//! tunnel whose owner has no tier, or one not listed here, gets the top-level limits:
//!
//! ```json
//! { "per_tunnel": { "limit": 3000, "window_seconds": 60 },
//!   "tiers": { "premium": { "per_tunnel": { "limit": 30000, "window_seconds": 60 } },
//!              "free":    { "per_ip": { "limit": 60, "window_seconds": 60 } } } }
//! ```
//! The tunnel and key buckets belong to one owner, so one tier; the per-IP bucket counts a
//! client over every tunnel, so a tier with a per-IP limit of its own counts it in a counter
//! of its own (the client's requests to that tier's tunnels), never in the shared one.
//!
//! Every bucket is counted in one batched host call per request (one Redis round trip); the
//! first bucket over its limit (ip, then tunnel, then key) picks the answer. A denied request
//! is taken back out of the buckets after the denying one (a second call, on the deny path
//! only), so one address over its own limit never uses up its tunnel's or owner's budget.
//!
//! Leases: a client that keeps sending is leased up to 64 further requests (the most the host
//! accepts), counted up front in every bucket, which the host then admits without calling the
//! plugin (until the earliest window ends, and for at most a minute). A lease never exceeds a
//! quarter of what any bucket has left, nor what the client already sent in this window; it
//! is checked again once counted, and
//! the part that other calls (another host on the same Redis) pushed over a limit in the
//! meantime is given back, so limits are never exceeded. Requests leased but not sent stay
//! counted, which can deny a client (or its tunnel) early by at most that many requests.

// Natively (unit tests) the component glue is left out, so its callees look unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Bucket {
    limit: u32,
    window_seconds: u32,
}

impl Bucket {
    fn enabled(self) -> bool {
        self.limit != 0 && self.window_seconds != 0
    }
}

/// One tier's limits; a bucket left out is the top-level one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierLimits {
    per_ip: Option<Bucket>,
    per_tunnel: Option<Bucket>,
    per_key: Option<Bucket>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    per_ip: Bucket,
    per_tunnel: Bucket,
    per_key: Bucket,
    /// By tier name, as the key list writes it (`premium`, `free`, …).
    tiers: BTreeMap<String, TierLimits>,
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
            tiers: BTreeMap::new(),
        }
    }
}

fn parse_config(text: &str) -> Result<Config, String> {
    let config: Config =
        serde_json::from_str(text).map_err(|e| format!("ratelimit config: {e}"))?;
    if config.tiers.keys().any(|tier| tier.trim().is_empty()) {
        return Err("ratelimit config: a tier name is empty".into());
    }
    Ok(config)
}

/// One bucket a request counts in.
#[derive(Debug, PartialEq, Eq)]
struct Count {
    /// The cache key of the current window's counter.
    key: String,
    limit: u32,
    window_seconds: u32,
    /// Seconds until the current window ends (at least 1).
    retry_after: u32,
    /// Shown to the client when this bucket denies.
    message: &'static str,
}

/// The counters a request increments: the enabled buckets, in the order they are judged,
/// with the limits of the owner's tier when the config has some for it.
fn counts(
    config: &Config,
    client_ip: &str,
    name: &str,
    owner_key_hash: &str,
    owner_tier: Option<&str>,
    now: i64,
) -> Vec<Count> {
    let tier = owner_tier.and_then(|tier| config.tiers.get_key_value(tier));
    let own = tier.map(|(_, limits)| *limits).unwrap_or_default();
    // A tier's own per-IP limit counts in a counter of its own (see the module docs).
    let ip_subject = match tier {
        Some((tier, limits)) if limits.per_ip.is_some() => format!("{client_ip}@{tier}"),
        _ => client_ip.to_string(),
    };
    let buckets = [
        (
            "ip",
            ip_subject.as_str(),
            own.per_ip.unwrap_or(config.per_ip),
            "too many requests from your address",
        ),
        (
            "tunnel",
            name,
            own.per_tunnel.unwrap_or(config.per_tunnel),
            "this tunnel is receiving too many requests",
        ),
        (
            "key",
            owner_key_hash,
            own.per_key.unwrap_or(config.per_key),
            "this tunnel owner's request budget is used up",
        ),
    ];
    buckets
        .into_iter()
        .filter(|(_, _, bucket, _)| bucket.enabled())
        .map(|(kind, subject, bucket, message)| {
            let window = i64::from(bucket.window_seconds);
            let index = now.div_euclid(window);
            Count {
                key: format!("{kind}:{subject}:{index}"),
                limit: bucket.limit,
                window_seconds: bucket.window_seconds,
                retry_after: ((index + 1) * window - now).max(1) as u32,
                message,
            }
        })
        .collect()
}

/// The first bucket whose new count is over its limit, if any: its index.
fn first_over_limit(counts: &[Count], values: &[i64]) -> Option<usize> {
    counts
        .iter()
        .zip(values)
        .position(|(count, value)| *value > i64::from(count.limit))
}

/// Most requests one lease covers: the most the host accepts (`p0rt:policy` 0.2). A busy
/// client calls the plugin once per lease, so this divides the plugin's cost per request
/// (32 → 64 took the plugins' share of the host's instructions per request at 16 visitors
/// from 5.1 % to 2.4 %; docs/benchmarks.md).
const MAX_LEASE: u32 = 64;
/// A lease takes at most this fraction (1/N) of what any bucket has left, so near a limit
/// leases shrink, and requests leased but never sent cost others of the bucket little.
const LEASE_SHARE_OF_LEFT: i64 = 4;

/// How many further requests to lease to this client after an admitted request, given the
/// buckets' new counts: no more than a quarter of what any bucket has left, and no more than
/// the client has already sent in the first bucket's window (so a client that stops early
/// leaves few counted requests unused). Fewer than 2 is not worth a second host call.
fn lease_size(counts: &[Count], values: &[i64]) -> u32 {
    let Some(first) = values.first() else {
        return 0;
    };
    let left = counts
        .iter()
        .zip(values)
        .map(|(count, value)| i64::from(count.limit) - value)
        .min()
        .unwrap_or(0);
    let size = (first - 1)
        .min(left / LEASE_SHARE_OF_LEFT)
        .clamp(0, i64::from(MAX_LEASE)) as u32;
    if size < 2 { 0 } else { size }
}

/// How much of a lease of `size` requests, just counted in every bucket (`after`: the
/// buckets' counts with it), stays within every limit. The lease size was computed from
/// earlier counts, and other calls may have counted requests in between (another host on the
/// same Redis, or a concurrent call): the part over a limit is not granted (and the caller
/// takes it back out), so leases never let more requests through than the limits allow.
fn granted_lease(counts: &[Count], after: &[i64], size: u32) -> u32 {
    counts
        .iter()
        .zip(after)
        .map(|(count, value)| {
            let over = (value - i64::from(count.limit)).max(0);
            (i64::from(size) - over).max(0)
        })
        .min()
        .unwrap_or(0) as u32
}

/// Longest lease the host accepts (`p0rt:policy` 0.2: `lease.millis` is at most 60 000); a
/// longer one is an invalid decision, which the host answers with its built-in limiter.
const MAX_LEASE_MILLIS: u32 = 60_000;

/// How long a lease may hold: until the earliest of the buckets' windows ends, and never
/// longer than [`MAX_LEASE_MILLIS`] (a window of more than a minute).
fn lease_millis(counts: &[Count]) -> u32 {
    counts
        .iter()
        .map(|count| count.retry_after.saturating_mul(1000))
        .min()
        .unwrap_or(0)
        .min(MAX_LEASE_MILLIS)
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
}

/// The component glue. Only built for wasm, so the logic above can be unit-tested natively.
#[cfg(target_arch = "wasm32")]
mod component {
    use super::*;

    wit_bindgen::generate!({ path: "../../wit/v0.2", world: "rate-limit-plugin" });

    use exports::p0rt::policy::rate_limit::{
        Decision, Denial, Guest as RateLimit, Lease, RequestFacts,
    };
    use p0rt::policy::{cache, clock};

    struct RateLimiter;

    impl RateLimit for RateLimiter {
        fn check(request: RequestFacts) -> Decision {
            let now = clock::now_unix_seconds();
            let counts = CONFIG.with_borrow(|config| {
                counts(
                    config,
                    &request.client_ip,
                    &request.name,
                    &request.owner_key_hash,
                    request.owner_tier.as_deref(),
                    now,
                )
            });
            if counts.is_empty() {
                return Decision::Allow(None);
            }
            let ops: Vec<cache::IncrementOp> = counts
                .iter()
                .map(|count| cache::IncrementOp {
                    key: count.key.clone(),
                    amount: 1,
                    ttl_seconds: Some(count.window_seconds),
                })
                .collect();
            let values = cache::increment_many(&ops);
            let Some(denier) = first_over_limit(&counts, &values) else {
                // A busy client gets a lease: its next requests are counted now, in one more
                // call, and the host admits them without asking.
                let size = lease_size(&counts, &values);
                if size == 0 {
                    return Decision::Allow(None);
                }
                let leased: Vec<cache::IncrementOp> = ops
                    .iter()
                    .map(|op| cache::IncrementOp {
                        key: op.key.clone(),
                        amount: i64::from(size),
                        ttl_seconds: op.ttl_seconds,
                    })
                    .collect();
                let after = cache::increment_many(&leased);
                // Other calls (on this host or another one) may have counted requests since
                // `values`: keep only the part of the lease still within every limit and
                // give the rest back.
                let granted = granted_lease(&counts, &after, size);
                if granted < size {
                    let excess: Vec<cache::IncrementOp> = ops
                        .iter()
                        .map(|op| cache::IncrementOp {
                            key: op.key.clone(),
                            amount: -i64::from(size - granted),
                            ttl_seconds: op.ttl_seconds,
                        })
                        .collect();
                    cache::increment_many(&excess);
                }
                if granted == 0 {
                    return Decision::Allow(None);
                }
                return Decision::Allow(Some(Lease {
                    requests: granted,
                    millis: lease_millis(&counts),
                }));
            };
            let refunds: Vec<cache::IncrementOp> = ops[denier + 1..]
                .iter()
                .map(|op| cache::IncrementOp {
                    key: op.key.clone(),
                    amount: -1,
                    ttl_seconds: op.ttl_seconds,
                })
                .collect();
            if !refunds.is_empty() {
                cache::increment_many(&refunds);
            }
            let count = &counts[denier];
            Decision::Deny(Denial {
                status: 429,
                retry_after_seconds: Some(count.retry_after),
                message: count.message.to_string(),
            })
        }
    }

    impl exports::p0rt::policy::init::Guest for RateLimiter {
        fn init(config: String) -> Result<(), String> {
            CONFIG.replace(parse_config(&config)?);
            Ok(())
        }
    }

    export!(RateLimiter);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_retry_after() {
        let c = counts(&Config::default(), "192.0.2.1", "app", "k", None, 125);
        let keys: Vec<&str> = c.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["ip:192.0.2.1:2", "tunnel:app:2", "key:k:2"]);
        assert!(
            c.iter()
                .all(|c| c.retry_after == 55 && c.window_seconds == 60)
        );
    }

    #[test]
    fn disabled_buckets_are_not_counted() {
        let config = parse_config(r#"{"per_ip": {"limit": 0, "window_seconds": 60}}"#).unwrap();
        let c = counts(&config, "ip", "app", "k", None, 0);
        assert_eq!(c.len(), 2);
        assert!(c[0].key.starts_with("tunnel:"));
        assert!(parse_config(r#"{"per_host": {}}"#).is_err());
    }

    #[test]
    fn leases_stay_within_every_limit_and_the_clients_own_pace() {
        let c = counts(&Config::default(), "ip", "app", "k", None, 0);
        // A first request gets no lease; a busy client up to MAX_LEASE.
        assert_eq!(lease_size(&c, &[1, 1, 1]), 0);
        assert_eq!(lease_size(&c, &[5, 10, 10]), 4);
        assert_eq!(lease_size(&c, &[200, 200, 200]), MAX_LEASE);
        // Never more than a quarter of what a bucket has left (per IP: 600 - 500).
        assert_eq!(lease_size(&c, &[500, 500, 500]), 25);
        assert_eq!(lease_size(&c, &[300, 2960, 300]), 10);
        assert_eq!(lease_size(&c, &[590, 590, 590]), 2);
        assert_eq!(lease_size(&c, &[595, 595, 595]), 0);
        assert_eq!(lease_size(&c, &[599, 600, 600]), 0);
        assert_eq!(lease_millis(&c), 60_000);
    }

    #[test]
    fn a_lease_overtaken_by_other_counts_keeps_only_what_is_left() {
        let c = counts(&Config::default(), "ip", "app", "k", None, 0);
        // Nobody counted in between: all of it.
        assert_eq!(granted_lease(&c, &[132, 132, 132], 32), 32);
        // Another host counted 20 requests in between, ending 12 over the per-IP limit.
        assert_eq!(granted_lease(&c, &[612, 700, 700], 32), 20);
        // It is all over some bucket (here the tunnel's): none of it.
        assert_eq!(granted_lease(&c, &[100, 3040, 100], 32), 0);
    }

    #[test]
    fn leases_of_long_windows_stay_within_what_the_host_accepts() {
        let config = parse_config(
            r#"{"per_ip": {"limit": 40, "window_seconds": 3600},
                "per_tunnel": {"limit": 0, "window_seconds": 60},
                "per_key": {"limit": 0, "window_seconds": 60}}"#,
        )
        .unwrap();
        let c = counts(&config, "ip", "app", "k", None, 10);
        assert_eq!(c[0].retry_after, 3590);
        assert_eq!(lease_millis(&c), MAX_LEASE_MILLIS);
    }

    #[test]
    fn a_tier_has_its_own_limits_and_keeps_the_rest() {
        let config = parse_config(
            r#"{"per_tunnel": {"limit": 100, "window_seconds": 60},
                "tiers": {
                    "premium": {"per_tunnel": {"limit": 1000, "window_seconds": 60}},
                    "free": {"per_ip": {"limit": 10, "window_seconds": 60}}
                }}"#,
        )
        .unwrap();
        let limits = |tier: Option<&str>| -> Vec<(String, u32)> {
            counts(&config, "192.0.2.1", "app", "k", tier, 0)
                .into_iter()
                .map(|c| (c.key, c.limit))
                .collect()
        };
        let shared_ip = ("ip:192.0.2.1:0".to_string(), 600);
        // No tier, or one the config does not name: the top-level limits.
        let plain = vec![
            shared_ip.clone(),
            ("tunnel:app:0".to_string(), 100),
            ("key:k:0".to_string(), 6000),
        ];
        assert_eq!(limits(None), plain);
        assert_eq!(limits(Some("vip")), plain);
        // premium: its tunnel limit, the rest inherited (the IP counter stays shared).
        assert_eq!(
            limits(Some("premium")),
            [
                shared_ip,
                ("tunnel:app:0".to_string(), 1000),
                ("key:k:0".to_string(), 6000)
            ]
        );
        // free: a per-IP limit of its own, counted apart from the shared per-IP counter.
        assert_eq!(
            limits(Some("free"))[0],
            ("ip:192.0.2.1@free:0".to_string(), 10)
        );
        assert!(parse_config(r#"{"tiers": {"x": {"per_host": {}}}}"#).is_err());
        assert!(parse_config(r#"{"tiers": {"": {}}}"#).is_err());
    }

    #[test]
    fn first_bucket_over_its_limit_answers() {
        let c = counts(&Config::default(), "ip", "app", "k", None, 0);
        assert_eq!(first_over_limit(&c, &[600, 3000, 6000]), None);
        let message = |values: &[i64]| first_over_limit(&c, values).map(|i| c[i].message);
        assert_eq!(
            message(&[601, 3001, 1]),
            Some("too many requests from your address")
        );
        assert_eq!(
            message(&[1, 1, 6001]),
            Some("this tunnel owner's request budget is used up")
        );
    }
}
