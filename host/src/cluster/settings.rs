//! `cluster.*` settings (`CLUSTER_*` in the environment): whether this host shares its
//! tunnels with other hosts on the same Redis, where its internal listener is, what the
//! others dial, the shared secret and the lease length. Layered like every other section
//! (defaults < YAML < environment); checked in [`ClusterConfig::validate`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Secret};

/// Internal listener address when clustering is on and `cluster.listen` is unset.
pub const DEFAULT_CLUSTER_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7420);
/// Lease of a tunnel's location record (and of a host's own record), renewed at a third of it:
/// a host that dies stops routing traffic elsewhere within this long.
pub const DEFAULT_CLUSTER_LEASE_SECONDS: u64 = 10;
/// Shortest lease accepted: renewals every second would be most of Redis' work.
pub const MIN_CLUSTER_LEASE_SECONDS: u64 = 3;
/// Longest lease accepted: a dead host's names would be unreachable for longer than this.
pub const MAX_CLUSTER_LEASE_SECONDS: u64 = 300;
/// Shortest shared secret accepted (it is the only thing between the internet and the
/// internal listener, which trusts the client address it is told).
pub const MIN_CLUSTER_SECRET_LEN: usize = 32;
/// Longest host id accepted (it is part of every location record).
pub const MAX_HOST_ID_LEN: usize = 64;

/// The environment variables of this section.
pub const CLUSTER_ENV_VARS: [&str; 6] = [
    "CLUSTER_ENABLED",
    "CLUSTER_LISTEN",
    "CLUSTER_ADVERTISE",
    "CLUSTER_SECRET",
    "CLUSTER_HOST_ID",
    "CLUSTER_LEASE_SECONDS",
];

/// `cluster.*` as read from one layer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterLayer {
    pub enabled: Option<bool>,
    /// Address of the internal listener other hosts forward requests to.
    pub listen: Option<SocketAddr>,
    /// `host:port` other hosts dial; default the listen address.
    pub advertise: Option<String>,
    pub secret: Option<Secret>,
    pub host_id: Option<String>,
    pub lease_seconds: Option<u64>,
}

/// The effective `cluster.*` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Off (the default): tunnels are served by the host their SSH client reached only.
    pub enabled: bool,
    pub listen: SocketAddr,
    /// `None`: the listen address (with its bound port when it is 0).
    pub advertise: Option<String>,
    pub secret: Option<Secret>,
    /// `None` until validated; then always set (random unless configured).
    pub host_id: Option<String>,
    pub lease: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            listen: DEFAULT_CLUSTER_LISTEN,
            advertise: None,
            secret: None,
            host_id: None,
            lease: Duration::from_secs(DEFAULT_CLUSTER_LEASE_SECONDS),
        }
    }
}

fn env_error(var: &'static str, value: &str, problem: &str) -> ConfigError {
    ConfigError::Env {
        var,
        value: value.to_string(),
        problem: problem.to_string(),
    }
}

/// The `CLUSTER_*` variables as a layer. Empty values count as unset.
pub fn env_layer(get: &dyn Fn(&str) -> Option<String>) -> Result<ClusterLayer, ConfigError> {
    let get = |var: &str| get(var).filter(|v| !v.trim().is_empty());
    let mut layer = ClusterLayer::default();
    if let Some(v) = get("CLUSTER_ENABLED") {
        layer.enabled = Some(
            v.trim()
                .parse()
                .map_err(|_| env_error("CLUSTER_ENABLED", &v, "expected true or false"))?,
        );
    }
    if let Some(v) = get("CLUSTER_LISTEN") {
        layer.listen = Some(v.trim().parse().map_err(|_| {
            env_error(
                "CLUSTER_LISTEN",
                &v,
                "expected an address and port such as 10.0.0.5:7420",
            )
        })?);
    }
    if let Some(v) = get("CLUSTER_ADVERTISE") {
        layer.advertise = Some(v.trim().to_string());
    }
    if let Some(v) = get("CLUSTER_SECRET") {
        layer.secret = Some(Secret::new(v));
    }
    if let Some(v) = get("CLUSTER_HOST_ID") {
        layer.host_id = Some(v.trim().to_string());
    }
    if let Some(v) = get("CLUSTER_LEASE_SECONDS") {
        layer.lease_seconds = Some(v.trim().parse().map_err(|_| {
            env_error(
                "CLUSTER_LEASE_SECONDS",
                &v,
                "expected a number of seconds such as 10",
            )
        })?);
    }
    Ok(layer)
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// Checks a `host:port` (host a name or an IP, `[v6]` in brackets) that other hosts dial.
fn check_advertise(value: &str) -> Result<(), String> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| format!("{value:?} needs a port, as host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{value:?}: the port is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("{value:?}: other hosts cannot dial port 0"));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() {
        return Err(format!("{value:?} has no host"));
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Err(format!(
                "{value:?} is not an address other hosts can dial; give this host's own address"
            ));
        }
    } else {
        crate::names::check_dns_name(bare).map_err(|p| format!("{value:?}: {p}"))?;
    }
    Ok(())
}

impl ClusterConfig {
    pub fn apply(&mut self, layer: ClusterLayer) {
        if let Some(v) = layer.enabled {
            self.enabled = v;
        }
        if let Some(v) = layer.listen {
            self.listen = v;
        }
        if layer.advertise.is_some() {
            self.advertise = layer.advertise;
        }
        if layer.secret.is_some() {
            self.secret = layer.secret;
        }
        if layer.host_id.is_some() {
            self.host_id = layer.host_id;
        }
        if let Some(v) = layer.lease_seconds {
            self.lease = Duration::from_secs(v);
        }
    }

    /// Checks the settings (only when clustering is on) and picks a random host id if none
    /// is set. `redis_store`: whether the domain store is Redis, which clustering needs.
    pub fn validate(&mut self, redis_store: bool) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if !redis_store {
            return Err(invalid(
                "cluster.enabled",
                "clustering keeps tunnel locations and names in Redis: set STORAGE_TYPE=redis \
                 and REDIS_URL (storage.type, storage.redis_url), or CLUSTER_ENABLED=false",
            ));
        }
        match &self.secret {
            None => {
                return Err(invalid(
                    "cluster.secret",
                    "clustering needs a shared secret (CLUSTER_SECRET), the same on every host",
                ));
            }
            Some(secret) if secret.expose().len() < MIN_CLUSTER_SECRET_LEN => {
                return Err(invalid(
                    "cluster.secret",
                    format!("must be at least {MIN_CLUSTER_SECRET_LEN} characters long"),
                ));
            }
            Some(_) => {}
        }
        let lease = self.lease.as_secs();
        if !(MIN_CLUSTER_LEASE_SECONDS..=MAX_CLUSTER_LEASE_SECONDS).contains(&lease) {
            return Err(invalid(
                "cluster.lease_seconds",
                format!(
                    "{lease} is out of range: use {MIN_CLUSTER_LEASE_SECONDS} to \
                     {MAX_CLUSTER_LEASE_SECONDS} seconds"
                ),
            ));
        }
        match &self.advertise {
            Some(advertise) => {
                check_advertise(advertise).map_err(|p| invalid("cluster.advertise", p))?
            }
            None if self.listen.ip().is_unspecified() => {
                return Err(invalid(
                    "cluster.advertise",
                    format!(
                        "the internal listener is on {}, which other hosts cannot dial: set \
                         CLUSTER_ADVERTISE to this host's address (e.g. 10.0.0.5:{}), or \
                         CLUSTER_LISTEN to a specific address",
                        self.listen,
                        self.listen.port()
                    ),
                ));
            }
            None => {}
        }
        match &self.host_id {
            Some(id) => {
                let ok = !id.is_empty()
                    && id.len() <= MAX_HOST_ID_LEN
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !ok {
                    return Err(invalid(
                        "cluster.host_id",
                        format!("{id:?}: use 1 to {MAX_HOST_ID_LEN} letters, digits, '-' or '_'"),
                    ));
                }
            }
            None => {
                let bytes: [u8; 6] = rand::random();
                self.host_id = Some(hex::encode(bytes));
            }
        }
        Ok(())
    }

    /// The host id (set once validated).
    pub fn host_id(&self) -> &str {
        self.host_id.as_deref().unwrap_or("unnamed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> ClusterConfig {
        ClusterConfig {
            enabled: true,
            listen: "127.0.0.1:7420".parse().unwrap(),
            secret: Some(Secret::new("x".repeat(MIN_CLUSTER_SECRET_LEN))),
            ..ClusterConfig::default()
        }
    }

    fn problem(mut c: ClusterConfig, redis: bool) -> String {
        c.validate(redis).unwrap_err().to_string()
    }

    #[test]
    fn off_by_default_and_checked_only_when_on() {
        let mut c = ClusterConfig::default();
        assert!(!c.enabled);
        c.validate(false).unwrap();
        assert_eq!(c.host_id, None);
    }

    #[test]
    fn every_bad_setting_is_named() {
        assert!(problem(enabled(), false).contains("cluster.enabled"));
        let mut c = enabled();
        c.secret = None;
        assert!(problem(c, true).contains("cluster.secret"));
        let mut c = enabled();
        c.secret = Some(Secret::new("short"));
        let e = problem(c, true);
        assert!(e.contains("cluster.secret") && !e.contains("short"), "{e}");
        let mut c = enabled();
        c.lease = Duration::from_secs(1);
        assert!(problem(c, true).contains("cluster.lease_seconds"));
        let mut c = enabled();
        c.listen = "0.0.0.0:7420".parse().unwrap();
        assert!(problem(c, true).contains("CLUSTER_ADVERTISE"));
        for bad in [
            "0.0.0.0:7420",
            "[::]:7420",
            "10.0.0.5",
            "10.0.0.5:0",
            ":7420",
            "a b:1",
        ] {
            let mut c = enabled();
            c.advertise = Some(bad.into());
            assert!(problem(c, true).contains("cluster.advertise"), "{bad}");
        }
        for bad in ["", "a/b", &"x".repeat(MAX_HOST_ID_LEN + 1)] {
            let mut c = enabled();
            c.host_id = Some(bad.into());
            assert!(problem(c, true).contains("cluster.host_id"), "{bad:?}");
        }
    }

    #[test]
    fn a_random_host_id_is_picked_and_a_good_advertise_kept() {
        let mut c = enabled();
        c.listen = "0.0.0.0:7420".parse().unwrap();
        c.advertise = Some("p0rt-2.internal:7420".into());
        c.validate(true).unwrap();
        assert_eq!(c.host_id().len(), 12);
        let mut other = enabled();
        other.validate(true).unwrap();
        assert_ne!(c.host_id(), other.host_id());
    }

    #[test]
    fn yaml_then_env_unknown_keys_refused_secret_masked() {
        use crate::config::{Config, ServeArgs};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p0rt.yaml");
        let secret = "yaml-secret-0123456789abcdef0123456789";
        std::fs::write(
            &file,
            format!(
                "storage:\n  type: redis\ncluster:\n  enabled: true\n  listen: 127.0.0.1:0\n  \
                 secret: {secret}\n  host_id: edge-1\n  lease_seconds: 5\n"
            ),
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let env = |k: &str| (k == "CLUSTER_LEASE_SECONDS").then(|| "7".to_string());
        let c = Config::load(&args, &env).unwrap();
        assert!(c.cluster.enabled);
        assert_eq!(c.cluster.host_id(), "edge-1");
        assert_eq!(
            c.cluster.lease,
            Duration::from_secs(7),
            "env beats the file"
        );
        assert!(!format!("{c:?}").contains(secret), "the secret is masked");
        std::fs::write(&file, "cluster:\n  secert: x\n").unwrap();
        let e = Config::load(&args, &|_| None).unwrap_err().to_string();
        assert!(e.contains("secert"), "{e}");
    }

    #[test]
    fn env_values_are_parsed_and_bad_ones_named() {
        let get = |k: &str| match k {
            "CLUSTER_ENABLED" => Some("true".to_string()),
            "CLUSTER_LISTEN" => Some("127.0.0.1:0".to_string()),
            "CLUSTER_LEASE_SECONDS" => Some("5".to_string()),
            _ => None,
        };
        let layer = env_layer(&get).unwrap();
        assert_eq!(layer.enabled, Some(true));
        assert_eq!(layer.lease_seconds, Some(5));
        let bad = |k: &str| (k == "CLUSTER_LISTEN").then(|| "nowhere".to_string());
        assert!(
            env_layer(&bad)
                .unwrap_err()
                .to_string()
                .contains("CLUSTER_LISTEN")
        );
    }
}
