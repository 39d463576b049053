//! p0rt: a self-hosted SSH reverse-tunnel host whose policies are WebAssembly plugins.
//!
//! The binary (`main.rs`) only parses the command line; everything else lives here, one
//! module per capability. Arrows point at what a module uses; nothing points back up:
//!
//! ```text
//! server (wiring, shutdown)
//!   ├─► ssh   (SSH edge: auth, tcpip-forward, session output) ─┐
//!   ├─► http  (HTTP edge: route by Host, admit, proxy)        ├─► tunnels ─► names, store, policy
//!   ├─► scan  (jobs, queue, workers; used by both edges)       ┘
//!   └─► plugins (PolicyPlugins: implements policy) ─► cache, store
//! store, cache ─► redis_link           config ─► names
//! ```
//!
//! - [`names`]: key hashes, tunnel names and labels (newtypes), the DNS-label rule, reserved
//!   words, the built-in namer. A leaf.
//! - [`password`]: salted password hashes for basic auth in front of tunnels. A leaf.
//! - [`policy`]: the traits the host asks its policies through, and their decisions.
//! - [`tunnels`]: the tunnel service: naming, sub-names, ownership, takeover, the live registry.
//! - [`ssh`], [`http`]: the two edges.
//! - [`plugins`]: WebAssembly policy plugins (wasmtime), their fallbacks, reload and tools.
//! - [`store`]: the domain store (JSON file or Redis), opening it, migration, and the name
//!   reservations kept beside it (P0rt's `reservations.json` or Redis keys).
//! - [`bans`]: failed-auth bans per address (escalating, persisted, shared on Redis).
//! - [`cache`]: the plugins' cache (Redis with in-memory fallback).
//! - [`redis_link`]: one Redis connection (standalone, Sentinel, Cluster) with timeouts.
//! - [`scan`]: scan jobs: admission, queue (memory or Redis Streams), workers, checks.
//! - [`tokens`]: per-key API tokens (`ssh … token`), stored hashed.
//! - [`cluster`]: several hosts on one Redis serving every tunnel (leases, forwarding).
//! - [`config`]: layered configuration (defaults < YAML < environment < flags).
//! - [`admin`]: the operator's admin API (`/api/v1/`) and `p0rt admin …`.
//! - [`logs`]: the host's log, text or JSON (`LOG_FORMAT`).
//! - [`server`]: wires the pieces together, runs and stops them ([`shutdown`]: the stop signal).

pub mod admin;
pub mod bans;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod http;
pub mod listen;
pub mod logs;
pub mod metrics;
pub mod names;
pub mod password;
pub mod plugins;
pub mod policy;
pub mod redis_link;
pub mod scan;
pub mod server;
pub mod shutdown;
pub mod ssh;
pub mod store;
pub mod tokens;
pub mod tunnels;

/// Seconds since the Unix epoch, the unit of every timestamp in the domain store.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
