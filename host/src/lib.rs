//! p0rt: a self-hosted SSH reverse-tunnel host whose policies are WebAssembly plugins.
//!
//! The binary (`main.rs`) only parses the command line; everything else lives here,
//! one module per capability:
//!
//! - [`config`]: layered configuration (defaults < YAML < environment < flags).
//! - [`store`]: the domain store (key hash ↔ name records), JSON file backend.
//! - [`naming`]: the built-in three-word namer, the fallback for the naming plugin.
//! - [`tunnels`]: the registry of live tunnels (which SSH session serves which name).
//! - [`ssh`]: the SSH edge (russh): auth, `tcpip-forward`, session output.
//! - [`http`]: the HTTP edge (hyper): routes by `Host` into `forwarded-tcpip` channels.
//! - [`server`]: wires the pieces together and runs them.

pub mod cache;
pub mod config;
pub mod http;
pub mod naming;
pub mod plugins;
pub mod redis_link;
pub mod server;
pub mod ssh;
pub mod store;
pub mod tunnels;

/// Seconds since the Unix epoch, the unit of every timestamp in the domain store.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
