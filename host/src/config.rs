//! Layered configuration: built-in defaults < YAML file (`--config`) < environment < flags.
//!
//! Every layer is parsed into the same [`Layer`] shape (all fields optional) and the layers
//! are applied in order onto the defaults, so precedence is one line in [`Config::load`].
//! The YAML layer rejects unknown keys; every error names the file, variable, flag or key
//! at fault and says what is allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

/// SSH edge port when nothing else is configured (P0rt's default).
pub const DEFAULT_SSH_PORT: u16 = 2222;
/// HTTP edge port when nothing else is configured.
pub const DEFAULT_HTTP_PORT: u16 = 8080;
/// Base domain; `localhost` makes `http://<name>.localhost:8080` work with curl out of the box.
pub const DEFAULT_DOMAIN: &str = "localhost";
/// Directory holding `domains.json`, the host key and the lock file.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// File name of the generated ed25519 host key inside the data directory.
pub const HOST_KEY_FILE_NAME: &str = "ssh_host_ed25519_key";
/// P0rt's host key file, in the working directory; served when no host key is configured.
pub const P0RT_HOST_KEY_FILE: &str = "ssh_host_key";
/// P0rt's config file, read from the working directory when no file is named.
pub const P0RT_CONFIG_FILE: &str = "config.yaml";
/// Redis port when only `REDIS_HOST` is given (P0rt's `REDIS_HOST` + `REDIS_PORT`).
pub const DEFAULT_REDIS_PORT: u16 = 6379;
/// Prefix of p0rt's Redis keys (the seed's layout: `p0rt:domain:{hash}`).
pub const DEFAULT_REDIS_PREFIX: &str = "p0rt:";
/// Domain records expire from Redis after this many days without a connection (P0rt: 365).
pub const DEFAULT_REDIS_TTL_DAYS: u64 = 365;
/// Longest record TTL accepted (100 years): beyond it the TTL in seconds stops being a
/// sensible Redis `EXPIRE` (and `days * 86400` would overflow).
pub const MAX_REDIS_TTL_DAYS: u64 = 36_500;
/// Highest Redis database number accepted (Redis' own `databases` limit is far lower by
/// default; the server refuses numbers it does not have).
pub const MAX_REDIS_DB: u32 = 1_000_000;
/// Directory scanned (and watched) for `*.wasm` plugins overriding the bundled ones.
pub const DEFAULT_PLUGINS_DIR: &str = "./plugins";
/// Redis URL used when Redis is selected but no URL is given (the seed's default).
pub const DEFAULT_REDIS_URL: &str = "redis://localhost:6379";

/// A secret string (password, token): never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call only where it is used, never where it is logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

/// Which backend keeps the domain records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Json,
    Redis,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Json => "json",
            StorageKind::Redis => "redis",
        }
    }
}

/// Scheme printed in public URLs (`https` when a TLS terminator sits in front of the HTTP edge).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PublicScheme {
    Http,
    Https,
}

/// Where the SSH host key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeySource {
    /// Nothing configured: P0rt's `./ssh_host_key` if it exists, and
    /// `<data_dir>/ssh_host_ed25519_key` (generated once if missing).
    Default,
    /// A file: loaded if present, generated once (ed25519) if not.
    File(PathBuf),
    /// The private key text itself, PEM or OpenSSH (`SSH_HOST_KEY` may carry it, as with P0rt).
    Inline(Secret),
}

/// The effective configuration after all layers are applied and validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub ssh_bind: IpAddr,
    pub ssh_port: u16,
    pub host_key: HostKeySource,
    /// OpenSSH `authorized_keys` file, besides P0rt's key list (`ssh.authorized_keys`).
    pub authorized_keys: Option<PathBuf>,
    /// `ssh.open_access` (P0rt's `P0RT_OPEN_ACCESS`): `Some(true)` any key may connect,
    /// `Some(false)` only listed keys, `None` restricted as soon as a key list exists (see
    /// [`crate::ssh::KeyAccess::from_config`]).
    pub open_access: Option<bool>,
    /// `ssh.key_list` (P0rt's `P0RT_AUTHORIZED_KEYS`): P0rt's JSON key list; `None`:
    /// `./authorized_keys.json` if it exists. Not read when the domain store is Redis.
    pub key_list: Option<PathBuf>,
    pub http_bind: IpAddr,
    pub http_port: u16,
    pub public_scheme: PublicScheme,
    /// Port printed in public URLs; defaults to the HTTP port (omitted when it is the scheme's default).
    pub public_port: Option<u16>,
    /// `https.*`: the HTTPS listener, its certificates, redirect and HSTS.
    pub https: HttpsConfig,
    /// `cluster.*`: several hosts on one Redis serving every tunnel (off by default).
    pub cluster: crate::cluster::settings::ClusterConfig,
    pub domain: String,
    pub storage: StorageKind,
    pub data_dir: PathBuf,
    /// Redis URL; `None` means not configured (the cache then stays in memory unless the
    /// store is Redis, which uses [`DEFAULT_REDIS_URL`]).
    pub redis_url: Option<String>,
    pub redis_password: Option<Secret>,
    /// `None`: the URL's database (or 0).
    pub redis_db: Option<u32>,
    /// Prefix of every key p0rt writes to Redis (the seed's `p0rt:`).
    pub redis_prefix: String,
    /// TTL of domain records in Redis, refreshed on each connection.
    pub redis_ttl_days: u64,
    /// `false`: never use Redis for the cache (the seed's `ENABLE_REDIS`).
    pub enable_redis: bool,
    /// PEM CA certificate trusted for `rediss://` (instead of the system roots).
    pub redis_ca_cert: Option<PathBuf>,
    /// Token that grants non-loopback clients access to `/domain-stats` (`Authorization: Bearer …`).
    pub admin_token: Option<Secret>,
    /// `admin.path` (`ADMIN_PATH`): where the web console lives on the base domain.
    pub admin_path: String,
    /// `metrics.listen` (`METRICS_LISTEN`): an address serving `/metrics` on its own, beside
    /// the base domain's; `None`: none.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub plugins_dir: PathBuf,
    /// `false`: built-in namer, no rate limiting, scan jobs denied.
    pub plugins_enabled: bool,
    /// Scan jobs: workers, queue caps, budgets, the raw-target allowlist (`scan.*`).
    pub scan: crate::scan::ScanSettings,
    /// `scan.allowed_targets` as written, parsed into `scan` by validation.
    scan_allowed_targets: Option<Vec<String>>,
    /// Proxies whose `X-Forwarded-For`/`Forwarded` the HTTP edge believes (`http.trusted_proxies`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `http.trusted_proxies` as written, parsed into `trusted_proxies` by validation.
    http_trusted_proxies: Option<Vec<String>>,
    /// Addresses never banned for failed authentication (`security.ban_exempt`).
    pub ban_exempt: Vec<ipnet::IpNet>,
    /// `security.ban_exempt` as written, parsed into `ban_exempt` by validation.
    security_ban_exempt: Option<Vec<String>>,
    /// Failed-auth ban escalation: (failures, ban length), ascending (`security.ban_tiers`).
    pub ban_tiers: Vec<(u32, Duration)>,
    security_ban_tiers: Option<Vec<String>>,
    /// `ssh.limits.*`.
    pub ssh_limits: crate::ssh::SshLimits,
    /// `ssh.limits.max_startups` as written, parsed into `ssh_limits` by validation.
    ssh_max_startups: Option<String>,
    /// `http.limits.*`.
    pub http_limits: crate::http::HttpLimits,
    /// `domain.reservations_enabled` (P0rt's `DOMAIN_RESERVATIONS_ENABLED`): a reserved name
    /// is handed to its key. On by default (P0rt never hands one over; `false` does the same).
    pub reservations_enabled: bool,
    /// Some layer set `storage.type`; if none did, a configured Redis URL moves the domain
    /// store to Redis, as in P0rt.
    storage_explicit: bool,
    /// The store is Redis only because a Redis URL is set and `storage.type` is not.
    pub storage_follows_redis_url: bool,
    /// The YAML file read, if any (`--config`, `CONFIG_FILE`, or P0rt's `./config.yaml`).
    pub config_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ssh_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ssh_port: DEFAULT_SSH_PORT,
            host_key: HostKeySource::Default,
            authorized_keys: None,
            open_access: None,
            key_list: None,
            http_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            http_port: DEFAULT_HTTP_PORT,
            public_scheme: PublicScheme::Http,
            public_port: None,
            https: HttpsConfig::default(),
            cluster: crate::cluster::settings::ClusterConfig::default(),
            domain: DEFAULT_DOMAIN.to_string(),
            storage: StorageKind::Json,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            redis_url: None,
            redis_password: None,
            redis_db: None,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_string(),
            redis_ttl_days: DEFAULT_REDIS_TTL_DAYS,
            enable_redis: true,
            redis_ca_cert: None,
            admin_token: None,
            admin_path: DEFAULT_ADMIN_PATH.to_string(),
            metrics_listen: None,
            plugins_dir: PathBuf::from(DEFAULT_PLUGINS_DIR),
            plugins_enabled: true,
            scan: crate::scan::ScanSettings::default(),
            scan_allowed_targets: None,
            trusted_proxies: Vec::new(),
            http_trusted_proxies: None,
            ban_exempt: Vec::new(),
            security_ban_exempt: None,
            ban_tiers: crate::bans::DEFAULT_TIERS.to_vec(),
            security_ban_tiers: None,
            ssh_limits: crate::ssh::SshLimits::default(),
            ssh_max_startups: None,
            http_limits: crate::http::HttpLimits::default(),
            reservations_enabled: true,
            storage_explicit: false,
            storage_follows_redis_url: false,
            config_file: None,
        }
    }
}

/// What went wrong while building the configuration. Each message names its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source} (check the path given to --config or CONFIG_FILE)"
    )]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?}: {problem}")]
    Env {
        var: &'static str,
        value: String,
        problem: String,
    },
    #[error("setting `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// One configuration layer, as read from YAML, the environment or the command line.
/// Field names are the YAML keys; unknown keys are rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Layer {
    /// P0rt's shape; see [`ServerLayer`].
    pub server: ServerLayer,
    pub ssh: SshLayer,
    pub http: HttpLayer,
    pub https: HttpsLayer,
    pub domain: DomainLayer,
    pub storage: StorageLayer,
    pub admin: AdminLayer,
    pub metrics: MetricsLayer,
    pub plugins: PluginsLayer,
    pub scan: ScanLayer,
    pub security: SecurityLayer,
    pub cluster: crate::cluster::settings::ClusterLayer,
}

/// `security.*`: failed-auth bans (see README, "Bans").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityLayer {
    /// Addresses or CIDRs never banned.
    pub ban_exempt: Option<Vec<String>>,
    /// Escalation, `failures:length` pairs such as `3:15m` (lengths in s, m, h or d).
    pub ban_tiers: Option<Vec<String>>,
}

/// `scan.*`: see docs/scans.md.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanLayer {
    pub workers: Option<usize>,
    pub queue_max: Option<usize>,
    pub max_active_per_key: Option<usize>,
    pub cache_ttl_seconds: Option<u64>,
    pub job_timeout_seconds: Option<u64>,
    pub max_requests: Option<u32>,
    pub visibility_timeout_seconds: Option<u64>,
    /// Hosts, IPs and CIDRs TCP port checks may contact.
    pub allowed_targets: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsLayer {
    pub dir: Option<PathBuf>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshLayer {
    pub bind: Option<IpAddr>,
    pub port: Option<u16>,
    /// Path of the host key, or the key text itself.
    pub host_key: Option<String>,
    pub authorized_keys: Option<PathBuf>,
    /// P0rt's `P0RT_OPEN_ACCESS`: true lets any key in, false only listed keys.
    pub open_access: Option<bool>,
    /// P0rt's `P0RT_AUTHORIZED_KEYS`: path of the JSON key list.
    pub key_list: Option<PathBuf>,
    pub limits: SshLimitsLayer,
}

/// `ssh.limits.*`: see [`crate::ssh::SshLimits`] and the README's "SSH edge limits".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshLimitsLayer {
    pub auth_timeout_seconds: Option<u64>,
    /// OpenSSH's `MaxStartups` form, `start:rate:full`.
    pub max_startups: Option<String>,
    pub max_unauthenticated_per_address: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_key: Option<usize>,
    pub max_tunnels_per_key: Option<usize>,
    pub max_forwards_per_connection: Option<usize>,
    pub max_session_channels: Option<usize>,
    pub max_tunnel_channels: Option<usize>,
    pub max_pending_channel_opens: Option<usize>,
}

/// `http.limits.*`: see [`crate::http::HttpLimits`] and the README's "HTTP edge limits".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimitsLayer {
    pub max_connections: Option<usize>,
    pub max_connections_per_address: Option<usize>,
    pub max_in_flight_per_tunnel: Option<usize>,
    pub header_timeout_seconds: Option<u64>,
    pub body_idle_timeout_seconds: Option<u64>,
    pub response_timeout_seconds: Option<u64>,
    pub response_idle_timeout_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLayer {
    pub bind: Option<IpAddr>,
    pub port: Option<u16>,
    pub public_scheme: Option<PublicScheme>,
    pub public_port: Option<u16>,
    /// CIDRs (or addresses) of proxies in front of the HTTP edge.
    pub trusted_proxies: Option<Vec<String>>,
    pub limits: HttpLimitsLayer,
}

/// `https.*`: see the README's "HTTPS".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpsLayer {
    /// 0 picks a free port; unset: no HTTPS.
    pub port: Option<u16>,
    /// Default: `http.bind`.
    pub bind: Option<IpAddr>,
    /// PEM certificate chain (a wildcard `*.<domain>` plus `<domain>`).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Plain-HTTP tunnel requests get a 308 to HTTPS.
    pub redirect: Option<bool>,
    /// `Strict-Transport-Security` max-age on HTTPS responses.
    pub hsts_max_age_seconds: Option<u64>,
    pub acme: AcmeLayer,
}

/// `https.acme.*`: per-name certificates from an ACME (RFC 8555) server.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeLayer {
    pub directory_url: Option<String>,
    pub email: Option<String>,
    /// PEM CA certificate trusted for the ACME server (instead of the system roots).
    pub ca_cert: Option<PathBuf>,
}

/// Longest HSTS max-age accepted (2 years, the preload list's own figure).
pub const MAX_HSTS_SECONDS: u64 = 63_072_000;

/// The effective `https.*` settings; HTTPS is on when `port` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpsConfig {
    pub port: Option<u16>,
    /// `None`: the HTTP edge's address.
    pub bind: Option<IpAddr>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub acme_directory_url: Option<String>,
    pub acme_email: Option<String>,
    pub acme_ca_cert: Option<PathBuf>,
    pub redirect: bool,
    pub hsts_max_age: Option<u64>,
}

/// Where HTTPS certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSetting<'a> {
    Files { cert: &'a Path, key: &'a Path },
    Acme { directory_url: &'a str },
}

impl HttpsConfig {
    fn apply(&mut self, layer: HttpsLayer) {
        if layer.port.is_some() {
            self.port = layer.port;
        }
        if layer.bind.is_some() {
            self.bind = layer.bind;
        }
        if layer.cert_file.is_some() {
            self.cert_file = layer.cert_file;
        }
        if layer.key_file.is_some() {
            self.key_file = layer.key_file;
        }
        if layer.acme.directory_url.is_some() {
            self.acme_directory_url = layer.acme.directory_url;
        }
        if layer.acme.email.is_some() {
            self.acme_email = layer.acme.email;
        }
        if layer.acme.ca_cert.is_some() {
            self.acme_ca_cert = layer.acme.ca_cert;
        }
        set(&mut self.redirect, layer.redirect);
        if layer.hsts_max_age_seconds.is_some() {
            self.hsts_max_age = layer.hsts_max_age_seconds;
        }
    }

    /// The certificate source, once validated (`None` when HTTPS is off).
    pub fn certificates(&self) -> Option<CertSetting<'_>> {
        self.port?;
        match (&self.cert_file, &self.key_file, &self.acme_directory_url) {
            (Some(cert), Some(key), _) => Some(CertSetting::Files { cert, key }),
            (_, _, Some(url)) => Some(CertSetting::Acme { directory_url: url }),
            _ => None,
        }
    }

    fn validate(&mut self, http_port: u16) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: String| ConfigError::Invalid { key, problem };
        let files = self.cert_file.is_some() || self.key_file.is_some();
        let Some(port) = self.port else {
            let set: Vec<&str> = [
                (files, "https.cert_file/key_file"),
                (
                    self.acme_directory_url.is_some(),
                    "https.acme.directory_url",
                ),
                (self.redirect, "https.redirect"),
                (self.hsts_max_age.is_some(), "https.hsts_max_age_seconds"),
            ]
            .iter()
            .filter_map(|(on, key)| on.then_some(*key))
            .collect();
            if set.is_empty() {
                return Ok(());
            }
            return Err(invalid(
                "https.port",
                format!(
                    "{} set but HTTPS is off: set https.port (HTTPS_PORT; 0 picks a free port)",
                    set.join(", ")
                ),
            ));
        };
        if port != 0 && port == http_port {
            return Err(invalid(
                "https.port",
                format!("{port} is also the HTTP port (http.port / HTTP_PORT)"),
            ));
        }
        match (&self.cert_file, &self.key_file, &self.acme_directory_url) {
            (Some(_), Some(_), Some(_)) => {
                return Err(invalid(
                    "https.acme.directory_url",
                    "give either certificate files (TLS_CERT_FILE, TLS_KEY_FILE) or an ACME \
                     directory (ACME_DIRECTORY_URL), not both"
                        .into(),
                ));
            }
            (Some(_), None, _) => {
                return Err(invalid(
                    "https.key_file",
                    "TLS_CERT_FILE is set without TLS_KEY_FILE: give both".into(),
                ));
            }
            (None, Some(_), _) => {
                return Err(invalid(
                    "https.cert_file",
                    "TLS_KEY_FILE is set without TLS_CERT_FILE: give both".into(),
                ));
            }
            (None, None, None) => {
                return Err(invalid(
                    "https.port",
                    "HTTPS needs certificates: set TLS_CERT_FILE and TLS_KEY_FILE (https.cert_file, \
                     https.key_file), or ACME_DIRECTORY_URL (https.acme.directory_url)"
                        .into(),
                ));
            }
            _ => {}
        }
        if let Some(url) = &self.acme_directory_url
            && !(url.starts_with("https://") && url.len() > "https://".len())
        {
            return Err(invalid(
                "https.acme.directory_url",
                format!("{url:?} is not an https:// URL (ACME servers are reached over HTTPS)"),
            ));
        }
        if let Some(email) = &self.acme_email {
            let email = email.trim().trim_start_matches("mailto:").to_string();
            let ok = email.split_once('@').is_some_and(|(user, host)| {
                !user.is_empty() && host.contains('.') && !email.chars().any(char::is_whitespace)
            });
            if !ok {
                return Err(invalid(
                    "https.acme.email",
                    format!("{email:?} is not an email address"),
                ));
            }
            self.acme_email = Some(email);
        }
        if self.acme_directory_url.is_none()
            && (self.acme_email.is_some() || self.acme_ca_cert.is_some())
        {
            return Err(invalid(
                "https.acme.directory_url",
                "ACME_EMAIL or ACME_CA_CERT is set but ACME_DIRECTORY_URL is not".into(),
            ));
        }
        if let Some(max_age) = self.hsts_max_age
            && max_age > MAX_HSTS_SECONDS
        {
            return Err(invalid(
                "https.hsts_max_age_seconds",
                format!("{max_age} is out of range: use 0 to {MAX_HSTS_SECONDS} seconds"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainLayer {
    pub base: Option<String>,
    /// P0rt's switch for name reservations (`DOMAIN_RESERVATIONS_ENABLED`).
    pub reservations_enabled: Option<bool>,
}

/// P0rt's `server.*` section (`server.ssh.port`, `server.ssh.host_key`, `server.http.port`),
/// accepted so a P0rt `config.yaml` works unchanged; p0rt's own keys win when both are set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLayer {
    pub ssh: ServerSshLayer,
    pub http: ServerHttpLayer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSshLayer {
    pub port: Option<u16>,
    pub host_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerHttpLayer {
    pub port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageLayer {
    #[serde(rename = "type")]
    pub kind: Option<StorageKind>,
    pub data_dir: Option<PathBuf>,
    pub redis_url: Option<String>,
    pub redis_password: Option<Secret>,
    pub redis_db: Option<u32>,
    pub redis_prefix: Option<String>,
    pub redis_ttl_days: Option<u64>,
    pub enable_redis: Option<bool>,
    pub redis_ca_cert: Option<PathBuf>,
}

/// `metrics.*`: see docs/api.md, "Metrics".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsLayer {
    /// Address and port of a listener serving only `/metrics`.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminLayer {
    pub token: Option<Secret>,
    pub path: Option<String>,
}

/// Flags of `p0rt serve`. Each flag overrides its environment variable and YAML key.
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// YAML config file (keys as in the README's configuration table, or P0rt's `server.*`
    /// shape; unknown keys are errors) [env: CONFIG_FILE] [default: ./config.yaml if present]
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Once serving, write the bound ports here as JSON (`{"ssh_port":…,"http_port":…,"pid":…}`),
    /// for supervisors and tests that start the host on port 0
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Address the SSH edge listens on [env: SSH_BIND] [default: 0.0.0.0]
    #[arg(long, value_name = "ADDR")]
    pub ssh_bind: Option<IpAddr>,
    /// SSH edge port; 0 picks a free port [env: SSH_SERVER_PORT] [default: 2222]
    #[arg(long, value_name = "PORT")]
    pub ssh_port: Option<u16>,
    /// Host key file (generated once if missing) [env: SSH_HOST_KEY] [default: ./ssh_host_key if present, and <data-dir>/ssh_host_ed25519_key]
    #[arg(long, value_name = "FILE")]
    pub host_key: Option<PathBuf>,
    /// Only keys in this OpenSSH authorized_keys file may connect [env: AUTHORIZED_KEYS] [default: any key]
    #[arg(long, value_name = "FILE")]
    pub authorized_keys: Option<PathBuf>,
    /// Address the HTTP edge listens on [env: HTTP_BIND] [default: 0.0.0.0]
    #[arg(long, value_name = "ADDR")]
    pub http_bind: Option<IpAddr>,
    /// HTTP edge port; 0 picks a free port [env: HTTP_PORT] [default: 8080]
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<u16>,
    /// Scheme shown in public URLs [env: PUBLIC_SCHEME] [default: http]
    #[arg(long, value_name = "SCHEME")]
    pub public_scheme: Option<PublicScheme>,
    /// Port shown in public URLs [env: PUBLIC_PORT] [default: the HTTP port]
    #[arg(long, value_name = "PORT")]
    pub public_port: Option<u16>,
    /// Base domain; tunnels are <name>.<domain> [env: DOMAIN_BASE] [default: localhost]
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Domain store backend [env: STORAGE_TYPE] [default: json]
    #[arg(long, value_name = "TYPE")]
    pub storage: Option<StorageKind>,
    /// Data directory (domains.json, host key, lock) [env: DATA_DIR] [default: ./data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Redis URL [env: REDIS_URL] [default: redis://localhost:6379]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Redis database number [env: REDIS_DB] [default: 0]
    #[arg(long, value_name = "N")]
    pub redis_db: Option<u32>,
    /// Prefix of p0rt's Redis keys [env: REDIS_PREFIX] [default: p0rt:]
    #[arg(long, value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
    /// PEM CA certificate to trust for rediss:// [env: REDIS_CA_CERT] [default: system roots]
    #[arg(long, value_name = "FILE")]
    pub redis_ca_cert: Option<PathBuf>,
    /// Keep the cache in memory even if Redis is configured [env: ENABLE_REDIS=false]
    #[arg(long)]
    pub no_redis: bool,
    /// Directory of *.wasm policy plugins, watched for changes [env: PLUGINS_DIR] [default: ./plugins]
    #[arg(long, value_name = "DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Run without plugins: built-in namer, no rate limiting, scans denied [env: PLUGINS_ENABLED=false]
    #[arg(long)]
    pub no_plugins: bool,
    /// Also serve /metrics on this address and port, alone [env: METRICS_LISTEN] [default: none]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl ServeArgs {
    fn to_layer(&self) -> Layer {
        Layer {
            ssh: SshLayer {
                bind: self.ssh_bind,
                port: self.ssh_port,
                host_key: self
                    .host_key
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                authorized_keys: self.authorized_keys.clone(),
                open_access: None,
                key_list: None,
                limits: SshLimitsLayer::default(),
            },
            http: HttpLayer {
                bind: self.http_bind,
                port: self.http_port,
                public_scheme: self.public_scheme,
                public_port: self.public_port,
                trusted_proxies: None,
                limits: HttpLimitsLayer::default(),
            },
            server: ServerLayer::default(),
            https: HttpsLayer::default(),
            domain: DomainLayer {
                base: self.domain.clone(),
                reservations_enabled: None,
            },
            storage: StorageLayer {
                kind: self.storage,
                data_dir: self.data_dir.clone(),
                redis_url: self.redis_url.clone(),
                redis_password: None,
                redis_db: self.redis_db,
                redis_prefix: self.redis_prefix.clone(),
                redis_ttl_days: None,
                enable_redis: self.no_redis.then_some(false),
                redis_ca_cert: self.redis_ca_cert.clone(),
            },
            admin: AdminLayer::default(),
            metrics: MetricsLayer {
                listen: self.metrics_listen,
            },
            plugins: PluginsLayer {
                dir: self.plugins_dir.clone(),
                enabled: self.no_plugins.then_some(false),
            },
            scan: ScanLayer::default(),
            security: SecurityLayer::default(),
            cluster: crate::cluster::settings::ClusterLayer::default(),
        }
    }
}

/// Environment variables read by p0rt; the first group are P0rt's own names.
pub const ENV_VARS: &[&str] = &[
    "SSH_SERVER_PORT",
    "HTTP_PORT",
    "DOMAIN_BASE",
    "SSH_HOST_KEY",
    "STORAGE_TYPE",
    "REDIS_URL",
    "P0RT_REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "STORAGE_DATA_DIR",
    "CONFIG_FILE",
    "P0RT_API_KEY",
    "DOMAIN_RESERVATIONS_ENABLED",
    "P0RT_OPEN_ACCESS",
    "P0RT_AUTHORIZED_KEYS",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "DATA_DIR",
    "SSH_BIND",
    "HTTP_BIND",
    "AUTHORIZED_KEYS",
    "PUBLIC_SCHEME",
    "PUBLIC_PORT",
    "HTTP_TRUSTED_PROXIES",
    "BAN_EXEMPT",
    "BAN_TIERS",
    "ADMIN_TOKEN",
    "ADMIN_PATH",
    "METRICS_LISTEN",
    "PLUGINS_DIR",
    "PLUGINS_ENABLED",
    "ENABLE_REDIS",
    "REDIS_PREFIX",
    "REDIS_TTL_DAYS",
    "REDIS_CA_CERT",
    "SCAN_WORKERS",
    "SCAN_QUEUE_MAX",
    "SCAN_MAX_ACTIVE_PER_KEY",
    "SCAN_CACHE_TTL_SECONDS",
    "SCAN_JOB_TIMEOUT_SECONDS",
    "SCAN_MAX_REQUESTS",
    "SCAN_VISIBILITY_TIMEOUT_SECONDS",
    "SCAN_ALLOWED_TARGETS",
    "SSH_AUTH_TIMEOUT_SECONDS",
    "SSH_MAX_STARTUPS",
    "SSH_MAX_UNAUTHENTICATED_PER_ADDRESS",
    "SSH_MAX_CONNECTIONS",
    "SSH_MAX_CONNECTIONS_PER_KEY",
    "SSH_MAX_TUNNELS_PER_KEY",
    "SSH_MAX_FORWARDS_PER_CONNECTION",
    "SSH_MAX_SESSION_CHANNELS",
    "SSH_MAX_TUNNEL_CHANNELS",
    "SSH_MAX_PENDING_CHANNEL_OPENS",
    "HTTP_MAX_CONNECTIONS",
    "HTTP_MAX_CONNECTIONS_PER_ADDRESS",
    "HTTP_MAX_IN_FLIGHT_PER_TUNNEL",
    "HTTP_HEADER_TIMEOUT_SECONDS",
    "HTTP_BODY_IDLE_TIMEOUT_SECONDS",
    "HTTP_RESPONSE_TIMEOUT_SECONDS",
    "HTTP_RESPONSE_IDLE_TIMEOUT_SECONDS",
    "HTTPS_PORT",
    "HTTPS_BIND",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "ACME_DIRECTORY_URL",
    "ACME_EMAIL",
    "ACME_CA_CERT",
    "HTTPS_REDIRECT",
    "HSTS",
    // crate::cluster::settings::CLUSTER_ENV_VARS
    "CLUSTER_ENABLED",
    "CLUSTER_LISTEN",
    "CLUSTER_ADVERTISE",
    "CLUSTER_SECRET",
    "CLUSTER_HOST_ID",
    "CLUSTER_LEASE_SECONDS",
    // crate::logs::LOG_FORMAT_VAR, read before the configuration
    "LOG_FORMAT",
];

fn parse_env<T: std::str::FromStr>(
    var: &'static str,
    value: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::Env {
        var,
        value: value.to_string(),
        problem: format!("expected {expected}"),
    })
}

fn parse_choice<T: clap::ValueEnum>(var: &'static str, value: &str) -> Result<T, ConfigError> {
    T::from_str(value.trim(), true).map_err(|_| {
        let allowed: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        ConfigError::Env {
            var,
            value: value.to_string(),
            problem: format!("expected one of: {}", allowed.join(", ")),
        }
    })
}

/// Builds the environment layer. `get` is the environment (injected so tests need not mutate it).
/// Empty values count as unset, as in P0rt's `.env` files.
pub fn env_layer(get: &dyn Fn(&str) -> Option<String>) -> Result<Layer, ConfigError> {
    let mut layer = Layer {
        cluster: crate::cluster::settings::env_layer(get)?,
        ..Layer::default()
    };
    let get = |var: &str| get(var).filter(|v| !v.trim().is_empty());
    const PORT: &str = "a port number from 0 to 65535";
    const ADDR: &str = "an IP address such as 0.0.0.0 or 127.0.0.1";
    if let Some(v) = get("SSH_SERVER_PORT") {
        layer.ssh.port = Some(parse_env("SSH_SERVER_PORT", &v, PORT)?);
    }
    if let Some(v) = get("SSH_BIND") {
        layer.ssh.bind = Some(parse_env("SSH_BIND", &v, ADDR)?);
    }
    if let Some(v) = get("SSH_HOST_KEY") {
        layer.ssh.host_key = Some(v);
    }
    if let Some(v) = get("AUTHORIZED_KEYS") {
        layer.ssh.authorized_keys = Some(PathBuf::from(v));
    }
    if let Some(v) = get("P0RT_OPEN_ACCESS") {
        // P0rt opens only on exactly "true"; anything but true/false is refused here rather
        // than read one way or the other.
        layer.ssh.open_access = Some(match v.trim() {
            "true" => true,
            "false" => false,
            _ => {
                return Err(ConfigError::Env {
                    var: "P0RT_OPEN_ACCESS",
                    value: v,
                    problem: "expected true or false".into(),
                });
            }
        });
    }
    if let Some(v) = get("P0RT_AUTHORIZED_KEYS") {
        layer.ssh.key_list = Some(PathBuf::from(v));
    }
    if let Some(v) = get("HTTP_PORT") {
        layer.http.port = Some(parse_env("HTTP_PORT", &v, PORT)?);
    }
    if let Some(v) = get("HTTP_BIND") {
        layer.http.bind = Some(parse_env("HTTP_BIND", &v, ADDR)?);
    }
    if let Some(v) = get("PUBLIC_SCHEME") {
        layer.http.public_scheme = Some(parse_choice("PUBLIC_SCHEME", &v)?);
    }
    let list = |v: String| -> Vec<String> {
        v.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect()
    };
    if let Some(v) = get("HTTP_TRUSTED_PROXIES") {
        layer.http.trusted_proxies = Some(list(v));
    }
    if let Some(v) = get("BAN_EXEMPT") {
        layer.security.ban_exempt = Some(list(v));
    }
    if let Some(v) = get("BAN_TIERS") {
        layer.security.ban_tiers = Some(list(v));
    }
    if let Some(v) = get("PUBLIC_PORT") {
        layer.http.public_port = Some(parse_env("PUBLIC_PORT", &v, PORT)?);
    }
    if let Some(v) = get("HTTPS_PORT") {
        layer.https.port = Some(parse_env("HTTPS_PORT", &v, PORT)?);
    }
    if let Some(v) = get("HTTPS_BIND") {
        layer.https.bind = Some(parse_env("HTTPS_BIND", &v, ADDR)?);
    }
    if let Some(v) = get("TLS_CERT_FILE") {
        layer.https.cert_file = Some(PathBuf::from(v));
    }
    if let Some(v) = get("TLS_KEY_FILE") {
        layer.https.key_file = Some(PathBuf::from(v));
    }
    if let Some(v) = get("ACME_DIRECTORY_URL") {
        layer.https.acme.directory_url = Some(v.trim().to_string());
    }
    if let Some(v) = get("ACME_EMAIL") {
        layer.https.acme.email = Some(v);
    }
    if let Some(v) = get("ACME_CA_CERT") {
        layer.https.acme.ca_cert = Some(PathBuf::from(v));
    }
    if let Some(v) = get("HTTPS_REDIRECT") {
        layer.https.redirect = Some(parse_env("HTTPS_REDIRECT", &v, "true or false")?);
    }
    if let Some(v) = get("HSTS") {
        layer.https.hsts_max_age_seconds = Some(parse_env(
            "HSTS",
            &v,
            "a max-age in seconds such as 31536000",
        )?);
    }
    if let Some(v) = get("DOMAIN_BASE") {
        layer.domain.base = Some(v);
    }
    if let Some(v) = get("STORAGE_TYPE") {
        layer.storage.kind = Some(parse_choice("STORAGE_TYPE", &v)?);
    }
    // P0rt's names first, so p0rt's own (below) win when both are set.
    if let Some(v) = get("STORAGE_DATA_DIR") {
        layer.storage.data_dir = Some(PathBuf::from(v));
    }
    if let Some(v) = get("DOMAIN_RESERVATIONS_ENABLED") {
        // P0rt: "true" or "1" turn it on, anything else off; p0rt refuses anything else.
        layer.domain.reservations_enabled = Some(match v.trim() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(ConfigError::Env {
                    var: "DOMAIN_RESERVATIONS_ENABLED",
                    value: v,
                    problem: "expected true, false, 1 or 0".into(),
                });
            }
        });
    }
    if let Some(v) = get("REDIS_HOST") {
        let port = match get("REDIS_PORT") {
            Some(p) => parse_env::<u16>("REDIS_PORT", &p, PORT)?,
            None => DEFAULT_REDIS_PORT,
        };
        let host = v.trim();
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        layer.storage.redis_url = Some(format!("redis://{host}:{port}"));
    }
    if let Some(v) = get("P0RT_REDIS_URL") {
        layer.storage.redis_url = Some(v);
    }
    if let Some(v) = get("P0RT_API_KEY") {
        layer.admin.token = Some(Secret::new(v));
    }
    if let Some(v) = get("DATA_DIR") {
        layer.storage.data_dir = Some(PathBuf::from(v));
    }
    if let Some(v) = get("REDIS_URL") {
        layer.storage.redis_url = Some(v);
    }
    if let Some(v) = get("REDIS_PASSWORD") {
        layer.storage.redis_password = Some(Secret::new(v));
    }
    if let Some(v) = get("REDIS_DB") {
        layer.storage.redis_db = Some(parse_env("REDIS_DB", &v, "a database number such as 0")?);
    }
    if let Some(v) = get("ADMIN_TOKEN") {
        layer.admin.token = Some(Secret::new(v));
    }
    if let Some(v) = get("ADMIN_PATH") {
        layer.admin.path = Some(v);
    }
    if let Some(v) = get("METRICS_LISTEN") {
        layer.metrics.listen = Some(parse_env(
            "METRICS_LISTEN",
            &v,
            "an address and port such as 127.0.0.1:9100",
        )?);
    }
    if let Some(v) = get("ENABLE_REDIS") {
        layer.storage.enable_redis = Some(parse_env("ENABLE_REDIS", &v, "true or false")?);
    }
    if let Some(v) = get("REDIS_PREFIX") {
        layer.storage.redis_prefix = Some(v);
    }
    if let Some(v) = get("REDIS_TTL_DAYS") {
        layer.storage.redis_ttl_days = Some(parse_env(
            "REDIS_TTL_DAYS",
            &v,
            "a number of days such as 365",
        )?);
    }
    if let Some(v) = get("REDIS_CA_CERT") {
        layer.storage.redis_ca_cert = Some(PathBuf::from(v));
    }
    if let Some(v) = get("PLUGINS_DIR") {
        layer.plugins.dir = Some(PathBuf::from(v));
    }
    if let Some(v) = get("PLUGINS_ENABLED") {
        layer.plugins.enabled = Some(parse_env("PLUGINS_ENABLED", &v, "true or false")?);
    }
    const COUNT: &str = "a whole number";
    const SECS: &str = "a number of seconds";
    if let Some(v) = get("SCAN_WORKERS") {
        layer.scan.workers = Some(parse_env("SCAN_WORKERS", &v, COUNT)?);
    }
    if let Some(v) = get("SCAN_QUEUE_MAX") {
        layer.scan.queue_max = Some(parse_env("SCAN_QUEUE_MAX", &v, COUNT)?);
    }
    if let Some(v) = get("SCAN_MAX_ACTIVE_PER_KEY") {
        layer.scan.max_active_per_key = Some(parse_env("SCAN_MAX_ACTIVE_PER_KEY", &v, COUNT)?);
    }
    if let Some(v) = get("SCAN_CACHE_TTL_SECONDS") {
        layer.scan.cache_ttl_seconds = Some(parse_env("SCAN_CACHE_TTL_SECONDS", &v, SECS)?);
    }
    if let Some(v) = get("SCAN_JOB_TIMEOUT_SECONDS") {
        layer.scan.job_timeout_seconds = Some(parse_env("SCAN_JOB_TIMEOUT_SECONDS", &v, SECS)?);
    }
    if let Some(v) = get("SCAN_MAX_REQUESTS") {
        layer.scan.max_requests = Some(parse_env("SCAN_MAX_REQUESTS", &v, COUNT)?);
    }
    if let Some(v) = get("SCAN_VISIBILITY_TIMEOUT_SECONDS") {
        layer.scan.visibility_timeout_seconds =
            Some(parse_env("SCAN_VISIBILITY_TIMEOUT_SECONDS", &v, SECS)?);
    }
    if let Some(v) = get("SCAN_ALLOWED_TARGETS") {
        layer.scan.allowed_targets = Some(
            v.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect(),
        );
    }
    limits_from_env(&get, &mut layer)?;
    Ok(layer)
}

/// The `SSH_*` and `HTTP_*` limit variables (each the `ssh.limits.*` / `http.limits.*` key
/// of the same name).
fn limits_from_env(
    get: &dyn Fn(&str) -> Option<String>,
    layer: &mut Layer,
) -> Result<(), ConfigError> {
    const COUNT: &str = "a whole number of at least 1";
    const SECS: &str = "a whole number of seconds";
    macro_rules! read {
        ($slot:expr, $var:literal, $expected:expr) => {
            if let Some(v) = get($var) {
                $slot = Some(parse_env($var, &v, $expected)?);
            }
        };
    }
    let ssh = &mut layer.ssh.limits;
    read!(ssh.auth_timeout_seconds, "SSH_AUTH_TIMEOUT_SECONDS", SECS);
    if let Some(v) = get("SSH_MAX_STARTUPS") {
        ssh.max_startups = Some(v);
    }
    read!(
        ssh.max_unauthenticated_per_address,
        "SSH_MAX_UNAUTHENTICATED_PER_ADDRESS",
        COUNT
    );
    read!(ssh.max_connections, "SSH_MAX_CONNECTIONS", COUNT);
    read!(
        ssh.max_connections_per_key,
        "SSH_MAX_CONNECTIONS_PER_KEY",
        COUNT
    );
    read!(ssh.max_tunnels_per_key, "SSH_MAX_TUNNELS_PER_KEY", COUNT);
    read!(
        ssh.max_forwards_per_connection,
        "SSH_MAX_FORWARDS_PER_CONNECTION",
        COUNT
    );
    read!(ssh.max_session_channels, "SSH_MAX_SESSION_CHANNELS", COUNT);
    read!(ssh.max_tunnel_channels, "SSH_MAX_TUNNEL_CHANNELS", COUNT);
    read!(
        ssh.max_pending_channel_opens,
        "SSH_MAX_PENDING_CHANNEL_OPENS",
        COUNT
    );
    let http = &mut layer.http.limits;
    read!(http.max_connections, "HTTP_MAX_CONNECTIONS", COUNT);
    read!(
        http.max_connections_per_address,
        "HTTP_MAX_CONNECTIONS_PER_ADDRESS",
        COUNT
    );
    read!(
        http.max_in_flight_per_tunnel,
        "HTTP_MAX_IN_FLIGHT_PER_TUNNEL",
        COUNT
    );
    read!(
        http.header_timeout_seconds,
        "HTTP_HEADER_TIMEOUT_SECONDS",
        SECS
    );
    read!(
        http.body_idle_timeout_seconds,
        "HTTP_BODY_IDLE_TIMEOUT_SECONDS",
        SECS
    );
    read!(
        http.response_timeout_seconds,
        "HTTP_RESPONSE_TIMEOUT_SECONDS",
        SECS
    );
    read!(
        http.response_idle_timeout_seconds,
        "HTTP_RESPONSE_IDLE_TIMEOUT_SECONDS",
        SECS
    );
    Ok(())
}

/// Parses `failures:length` pairs (`3:15m`, `10:1d`); failures must rise with each tier.
fn ban_tiers(entries: &[String]) -> Result<Vec<(u32, Duration)>, String> {
    let mut tiers: Vec<(u32, Duration)> = Vec::new();
    for entry in entries {
        let bad = || format!("{entry:?} is not failures:length (e.g. 3:15m; s, m, h or d)");
        let (count, length) = entry.split_once(':').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let length = length.trim();
        let (number, unit) = length.split_at(length.len().saturating_sub(1));
        let number: u64 = number.parse().map_err(|_| bad())?;
        let seconds = match unit {
            "s" => number,
            "m" => number * 60,
            "h" => number * 3600,
            "d" => number * 86_400,
            _ => return Err(bad()),
        };
        if count == 0 || seconds == 0 || tiers.last().is_some_and(|(last, _)| count <= *last) {
            return Err(format!(
                "{entry:?}: failures and lengths must be above 0, failures rising tier by tier"
            ));
        }
        tiers.push((count, Duration::from_secs(seconds)));
    }
    if tiers.is_empty() {
        return Err("give at least one tier".into());
    }
    Ok(tiers)
}

/// Parses a list of addresses or CIDRs (a bare address is one host).
fn networks(key: &'static str, entries: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    entries
        .iter()
        .map(|entry| {
            entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| ConfigError::Invalid {
                    key,
                    problem: format!("{entry:?} is not an address or CIDR"),
                })
        })
        .collect()
}

/// The YAML file to read: `--config`, else `CONFIG_FILE`, else P0rt's `./config.yaml` if it
/// exists. A named file must exist; the implicit one is read only when present.
fn config_file(args: &ServeArgs, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = &args.config {
        return Some(path.clone());
    }
    if let Some(path) = env("CONFIG_FILE").filter(|v| !v.trim().is_empty()) {
        return Some(PathBuf::from(path));
    }
    let implicit = Path::new(P0RT_CONFIG_FILE);
    implicit.is_file().then(|| implicit.to_path_buf())
}

/// Reads and parses a YAML config file into a layer. An empty file is an empty layer.
pub fn file_layer(path: &Path) -> Result<Layer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(Layer::default());
    }
    serde_norway::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Where the host key setting came from, so a derived default can follow `data_dir`.
fn host_key_source(value: &str) -> HostKeySource {
    if value.trim_start().starts_with("-----BEGIN") {
        HostKeySource::Inline(Secret::new(value))
    } else {
        HostKeySource::File(PathBuf::from(value))
    }
}

impl Config {
    /// Builds the configuration: defaults < `args.config` YAML < environment (`env`) < flags.
    pub fn load(
        args: &ServeArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut layers = Vec::with_capacity(3);
        let config_file = config_file(args, env);
        if let Some(path) = &config_file {
            layers.push(file_layer(path)?);
        }
        layers.push(env_layer(env)?);
        layers.push(args.to_layer());
        let mut config = Config::default();
        let mut host_key: Option<String> = None;
        for layer in layers {
            config.apply(layer, &mut host_key);
        }
        config.host_key = match host_key {
            Some(value) => host_key_source(&value),
            None => HostKeySource::Default,
        };
        config.config_file = config_file;
        if !config.storage_explicit && config.redis_url.is_some() {
            config.storage = StorageKind::Redis;
            config.storage_follows_redis_url = true;
        }
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, layer: Layer, host_key: &mut Option<String>) {
        let Layer {
            server,
            mut ssh,
            mut http,
            https,
            domain,
            storage,
            admin,
            metrics,
            plugins,
            scan,
            security,
            cluster,
        } = layer;
        self.cluster.apply(cluster);
        ssh.port = ssh.port.or(server.ssh.port);
        ssh.host_key = ssh.host_key.or(server.ssh.host_key);
        http.port = http.port.or(server.http.port);
        if storage.kind.is_some() {
            self.storage_explicit = true;
        }
        set(&mut self.reservations_enabled, domain.reservations_enabled);
        if security.ban_exempt.is_some() {
            self.security_ban_exempt = security.ban_exempt;
        }
        if security.ban_tiers.is_some() {
            self.security_ban_tiers = security.ban_tiers;
        }
        set(&mut self.ssh_bind, ssh.bind);
        set(&mut self.ssh_port, ssh.port);
        if ssh.host_key.is_some() {
            *host_key = ssh.host_key;
        }
        if ssh.authorized_keys.is_some() {
            self.authorized_keys = ssh.authorized_keys;
        }
        if ssh.open_access.is_some() {
            self.open_access = ssh.open_access;
        }
        if ssh.key_list.is_some() {
            self.key_list = ssh.key_list;
        }
        self.apply_limits(ssh.limits, http.limits);
        set(&mut self.http_bind, http.bind);
        set(&mut self.http_port, http.port);
        set(&mut self.public_scheme, http.public_scheme);
        if http.public_port.is_some() {
            self.public_port = http.public_port;
        }
        if http.trusted_proxies.is_some() {
            self.http_trusted_proxies = http.trusted_proxies;
        }
        set(&mut self.domain, domain.base);
        self.https.apply(https);
        set(&mut self.storage, storage.kind);
        set(&mut self.data_dir, storage.data_dir);
        if storage.redis_url.is_some() {
            self.redis_url = storage.redis_url;
        }
        if storage.redis_password.is_some() {
            self.redis_password = storage.redis_password;
        }
        if storage.redis_db.is_some() {
            self.redis_db = storage.redis_db;
        }
        set(&mut self.redis_prefix, storage.redis_prefix);
        set(&mut self.redis_ttl_days, storage.redis_ttl_days);
        set(&mut self.enable_redis, storage.enable_redis);
        if storage.redis_ca_cert.is_some() {
            self.redis_ca_cert = storage.redis_ca_cert;
        }
        if admin.token.is_some() {
            self.admin_token = admin.token;
        }
        set(&mut self.admin_path, admin.path);
        if metrics.listen.is_some() {
            self.metrics_listen = metrics.listen;
        }
        set(&mut self.plugins_dir, plugins.dir);
        set(&mut self.plugins_enabled, plugins.enabled);
        let settings = &mut self.scan;
        set(&mut settings.workers, scan.workers);
        set(&mut settings.max_waiting, scan.queue_max);
        set(&mut settings.max_active_per_key, scan.max_active_per_key);
        set(
            &mut settings.cache_ttl,
            scan.cache_ttl_seconds.map(Duration::from_secs),
        );
        set(
            &mut settings.job_timeout,
            scan.job_timeout_seconds.map(Duration::from_secs),
        );
        set(&mut settings.max_requests, scan.max_requests);
        set(
            &mut settings.visibility_timeout,
            scan.visibility_timeout_seconds.map(Duration::from_secs),
        );
        if scan.allowed_targets.is_some() {
            self.scan_allowed_targets = scan.allowed_targets;
        }
    }

    fn apply_limits(&mut self, ssh: SshLimitsLayer, http: HttpLimitsLayer) {
        let secs = |v: Option<u64>| v.map(Duration::from_secs);
        let l = &mut self.ssh_limits;
        set(&mut l.auth_timeout, secs(ssh.auth_timeout_seconds));
        if ssh.max_startups.is_some() {
            self.ssh_max_startups = ssh.max_startups;
        }
        set(
            &mut l.unauthenticated.max_per_source,
            ssh.max_unauthenticated_per_address,
        );
        set(&mut l.max_connections, ssh.max_connections);
        set(&mut l.max_connections_per_key, ssh.max_connections_per_key);
        set(&mut l.max_tunnels_per_key, ssh.max_tunnels_per_key);
        set(
            &mut l.max_forwards_per_connection,
            ssh.max_forwards_per_connection,
        );
        set(&mut l.max_session_channels, ssh.max_session_channels);
        set(&mut l.max_tunnel_channels, ssh.max_tunnel_channels);
        set(
            &mut l.max_pending_channel_opens,
            ssh.max_pending_channel_opens,
        );
        let l = &mut self.http_limits;
        set(&mut l.max_connections, http.max_connections);
        set(
            &mut l.max_connections_per_address,
            http.max_connections_per_address,
        );
        set(
            &mut l.max_in_flight_per_tunnel,
            http.max_in_flight_per_tunnel,
        );
        set(&mut l.header_timeout, secs(http.header_timeout_seconds));
        set(
            &mut l.body_idle_timeout,
            secs(http.body_idle_timeout_seconds),
        );
        set(&mut l.response_timeout, secs(http.response_timeout_seconds));
        set(
            &mut l.response_idle_timeout,
            secs(http.response_idle_timeout_seconds),
        );
    }

    /// Parses `ssh.limits.max_startups` and checks every SSH and HTTP limit.
    fn validate_limits(&mut self) -> Result<(), ConfigError> {
        if let Some(value) = &self.ssh_max_startups {
            self.ssh_limits.unauthenticated =
                crate::ssh::limits::parse_max_startups(value, self.ssh_limits.unauthenticated)
                    .map_err(|problem| ConfigError::Invalid {
                        key: "ssh.limits.max_startups",
                        problem,
                    })?;
        }
        self.ssh_limits
            .validate()
            .map_err(|e| ConfigError::Invalid {
                key: e.key,
                problem: e.problem,
            })?;
        self.http_limits
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid { key, problem })
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        self.validate_limits()?;
        let domain = self
            .domain
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if let Err(problem) = check_dns_name(&domain) {
            return Err(ConfigError::Invalid {
                key: "domain.base",
                problem: format!("{:?} is not a valid domain name: {problem}", self.domain),
            });
        }
        self.domain = domain;
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "storage.data_dir",
                problem: "must not be empty".into(),
            });
        }
        if !(1..=MAX_REDIS_TTL_DAYS).contains(&self.redis_ttl_days) {
            return Err(ConfigError::Invalid {
                key: "storage.redis_ttl_days",
                problem: format!(
                    "{} is out of range: use 1 to {MAX_REDIS_TTL_DAYS} days",
                    self.redis_ttl_days
                ),
            });
        }
        if let Some(db) = self.redis_db
            && db > MAX_REDIS_DB
        {
            return Err(ConfigError::Invalid {
                key: "storage.redis_db",
                problem: format!("{db} is out of range: use 0 to {MAX_REDIS_DB}"),
            });
        }
        if let Some(url) = self
            .redis_url
            .clone()
            .or_else(|| (self.storage == StorageKind::Redis).then(|| DEFAULT_REDIS_URL.to_string()))
        {
            crate::redis_link::parse_target(
                &url,
                self.redis_password.as_ref().map(Secret::expose),
                self.redis_db,
            )
            .map_err(|e| ConfigError::Invalid {
                key: "storage.redis_url",
                problem: e.to_string(),
            })?;
        }
        self.validate_scan()?;
        self.https.validate(self.http_port)?;
        self.cluster.validate(self.storage == StorageKind::Redis)?;
        if let Some(token) = &self.admin_token
            && token.expose().len() < MIN_ADMIN_TOKEN_LEN
        {
            return Err(ConfigError::Invalid {
                key: "admin.token",
                problem: format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters long"),
            });
        }
        check_admin_path(&self.admin_path).map_err(|problem| ConfigError::Invalid {
            key: "admin.path",
            problem,
        })?;
        Ok(())
    }

    fn validate_scan(&mut self) -> Result<(), ConfigError> {
        let s = &self.scan;
        let checks: [(&'static str, u64, u64, u64); 7] = [
            ("scan.workers", s.workers as u64, 0, 64),
            ("scan.queue_max", s.max_waiting as u64, 1, 100_000),
            (
                "scan.max_active_per_key",
                s.max_active_per_key as u64,
                1,
                1_000,
            ),
            (
                "scan.cache_ttl_seconds",
                s.cache_ttl.as_secs(),
                0,
                7 * 86_400,
            ),
            (
                "scan.job_timeout_seconds",
                s.job_timeout.as_secs(),
                1,
                3_600,
            ),
            ("scan.max_requests", u64::from(s.max_requests), 1, 10_000),
            (
                "scan.visibility_timeout_seconds",
                s.visibility_timeout.as_secs(),
                2,
                3_600,
            ),
        ];
        for (key, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    problem: format!("{value} is out of range: use {min} to {max}"),
                });
            }
        }
        if let Some(entries) = &self.http_trusted_proxies {
            self.trusted_proxies = networks("http.trusted_proxies", entries)?;
        }
        if let Some(entries) = &self.security_ban_exempt {
            self.ban_exempt = networks("security.ban_exempt", entries)?;
        }
        if let Some(entries) = &self.security_ban_tiers {
            self.ban_tiers = ban_tiers(entries).map_err(|problem| ConfigError::Invalid {
                key: "security.ban_tiers",
                problem,
            })?;
        }
        if let Some(entries) = &self.scan_allowed_targets {
            self.scan.allowed_targets = crate::scan::target::TargetAllowlist::parse(entries)
                .map_err(|problem| ConfigError::Invalid {
                    key: "scan.allowed_targets",
                    problem,
                })?;
        }
        Ok(())
    }

    /// The Redis URL the host uses, if it uses Redis at all: for the Redis domain store, or,
    /// with the JSON store, when a URL is set and `ENABLE_REDIS` is not `false` (then the
    /// cache, bans, tokens and the scan queue are in Redis). `serve` and the commands that
    /// work beside it (`p0rt security …`) both decide by this, so they read the same bans.
    pub fn redis_url_in_use(&self) -> Option<String> {
        match (&self.redis_url, self.storage) {
            (Some(url), StorageKind::Redis) => Some(url.clone()),
            (None, StorageKind::Redis) => Some(DEFAULT_REDIS_URL.to_string()),
            (Some(url), StorageKind::Json) => self.enable_redis.then(|| url.clone()),
            (None, StorageKind::Json) => None,
        }
    }

    /// How public URLs look once the edge listens on `http_port` and, when HTTPS is on,
    /// `https_port`: then they are `https` URLs on the HTTPS port (or `http.public_port`).
    pub fn public_urls_with_https(&self, http_port: u16, https_port: Option<u16>) -> PublicUrls {
        let Some(https_port) = https_port else {
            return self.public_urls(http_port);
        };
        let port = self.public_port.unwrap_or(https_port);
        PublicUrls {
            scheme: "https",
            domain: self.domain.clone(),
            port: (port != 443).then_some(port),
        }
    }

    /// How public URLs look once the HTTP edge listens on `http_port`.
    pub fn public_urls(&self, http_port: u16) -> PublicUrls {
        let (scheme, default_port) = match self.public_scheme {
            PublicScheme::Http => ("http", 80),
            PublicScheme::Https => ("https", 443),
        };
        let port = self.public_port.unwrap_or(http_port);
        PublicUrls {
            scheme,
            domain: self.domain.clone(),
            port: (port != default_port).then_some(port),
        }
    }
}

/// Formats the public URL of a tunnel name, e.g. `http://whale-guitar-fox.localhost:8080`.
#[derive(Clone, Debug)]
pub struct PublicUrls {
    scheme: &'static str,
    domain: String,
    /// `None` when it is the scheme's default port.
    port: Option<u16>,
}

impl PublicUrls {
    pub fn of(&self, name: &str) -> String {
        match self.port {
            None => format!("{}://{name}.{}", self.scheme, self.domain),
            Some(port) => format!("{}://{name}.{}:{port}", self.scheme, self.domain),
        }
    }

    /// The base domain's URL (front page, API).
    pub fn base(&self) -> String {
        match self.port {
            None => format!("{}://{}", self.scheme, self.domain),
            Some(port) => format!("{}://{}:{port}", self.scheme, self.domain),
        }
    }
}

/// A startup failure caused by the operator's settings (exit code 2, like a config error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

/// Shortest admin token accepted, so a guessable token cannot open `/domain-stats`.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;
/// Where the web console lives on the base domain unless `admin.path` says otherwise.
pub const DEFAULT_ADMIN_PATH: &str = "/admin";
/// Longest `admin.path` accepted.
pub const MAX_ADMIN_PATH_LEN: usize = 64;
/// Base-domain paths the console may not take (or sit under): the host's own endpoints.
const RESERVED_BASE_PATHS: [&str; 5] = ["/api", "/metrics", "/health", "/status", "/domain-stats"];

/// Why an `admin.path` is unusable: it must be `/` followed by letters, digits, `-`, `_`
/// or further `/`-separated parts, with no trailing `/`, and not one of the host's paths.
pub fn check_admin_path(path: &str) -> Result<(), String> {
    let shape_ok = path.len() > 1
        && path.len() <= MAX_ADMIN_PATH_LEN
        && path.starts_with('/')
        && !path.ends_with('/')
        && !path.contains("//")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'/');
    if !shape_ok {
        return Err(format!(
            "{path:?} must be like /admin: a / then letters, digits, - or _ (parts separated \
             by /, no trailing /), at most {MAX_ADMIN_PATH_LEN} characters"
        ));
    }
    let lower = path.to_ascii_lowercase();
    if let Some(taken) = RESERVED_BASE_PATHS
        .iter()
        .find(|r| lower == **r || lower.starts_with(&format!("{r}/")))
    {
        return Err(format!("{path:?} would hide the host's own {taken}"));
    }
    Ok(())
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

pub use crate::names::{check_dns_label, check_dns_name};

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p0rt.yaml");
        std::fs::write(
            &file,
            "ssh:\n  port: 1000\nhttp:\n  port: 1001\ndomain:\n  base: file.example\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            ssh_port: Some(3000),
            ..Default::default()
        };
        let c = Config::load(
            &args,
            &env(&[("SSH_SERVER_PORT", "2000"), ("HTTP_PORT", "2001")]),
        )
        .unwrap();
        assert_eq!(c.ssh_port, 3000, "flag beats env");
        assert_eq!(c.http_port, 2001, "env beats file");
        assert_eq!(c.domain, "file.example", "file beats default");
        assert_eq!(c.storage, StorageKind::Json, "default");
    }

    #[test]
    fn unknown_yaml_key_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p0rt.yaml");
        std::fs::write(&file, "ssh:\n  prot: 22\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let err = Config::load(&args, &env(&[])).unwrap_err().to_string();
        assert!(err.contains("prot") && err.contains("p0rt.yaml"), "{err}");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let err = Config::load(&ServeArgs::default(), &env(&[("SSH_SERVER_PORT", "70000")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SSH_SERVER_PORT") && err.contains("0 to 65535"),
            "{err}"
        );
    }

    #[test]
    fn secrets_are_masked_in_debug_output() {
        let c = Config::load(
            &ServeArgs::default(),
            &env(&[
                ("REDIS_PASSWORD", "hunter2-hunter2"),
                ("ADMIN_TOKEN", "0123456789abcdefXYZ"),
            ]),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("0123456789abcdef"),
            "{shown}"
        );
    }

    #[test]
    fn host_key_is_the_default_pair_unless_set() {
        let c = Config::load(&ServeArgs::default(), &env(&[("DATA_DIR", "/srv/p0rt")])).unwrap();
        assert_eq!(c.host_key, HostKeySource::Default);
        let c = Config::load(&ServeArgs::default(), &env(&[("SSH_HOST_KEY", "/etc/k")])).unwrap();
        assert_eq!(c.host_key, HostKeySource::File(PathBuf::from("/etc/k")));
        // P0rt's SSH_HOST_KEY holds the PEM text itself.
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n";
        let c = Config::load(&ServeArgs::default(), &env(&[("SSH_HOST_KEY", pem)])).unwrap();
        assert_eq!(c.host_key, HostKeySource::Inline(Secret::new(pem)));
    }

    #[test]
    fn https_settings_are_checked_and_printed_urls_follow_them() {
        let load = |vars: &[(&str, &str)]| Config::load(&ServeArgs::default(), &env(vars));
        let c = load(&[
            ("HTTPS_PORT", "8443"),
            ("TLS_CERT_FILE", "/c.pem"),
            ("TLS_KEY_FILE", "/k.pem"),
            ("HTTPS_REDIRECT", "true"),
            ("HSTS", "600"),
        ])
        .unwrap();
        assert_eq!(
            c.https.certificates(),
            Some(CertSetting::Files {
                cert: Path::new("/c.pem"),
                key: Path::new("/k.pem")
            })
        );
        assert!(c.https.redirect);
        assert_eq!(c.https.hsts_max_age, Some(600));
        assert_eq!(
            c.public_urls_with_https(8080, Some(8443)).of("a-b"),
            "https://a-b.localhost:8443"
        );
        assert_eq!(
            c.public_urls_with_https(8080, Some(443)).of("a-b"),
            "https://a-b.localhost"
        );
        assert_eq!(
            c.public_urls_with_https(8080, None).of("a-b"),
            "http://a-b.localhost:8080"
        );
        let c = load(&[
            ("HTTPS_PORT", "0"),
            ("ACME_DIRECTORY_URL", "https://acme.example/dir"),
            ("ACME_EMAIL", "ops@example.com"),
        ])
        .unwrap();
        assert_eq!(
            c.https.certificates(),
            Some(CertSetting::Acme {
                directory_url: "https://acme.example/dir"
            })
        );
        assert_eq!(load(&[]).unwrap().https.certificates(), None);
        for (vars, key) in [
            (&[("TLS_CERT_FILE", "/c")][..], "https.port"),
            (&[("HTTPS_REDIRECT", "true")][..], "https.port"),
            (&[("HTTPS_PORT", "1")][..], "https.port"),
            (
                &[("HTTPS_PORT", "1"), ("TLS_CERT_FILE", "/c")][..],
                "https.key_file",
            ),
            (
                &[
                    ("HTTPS_PORT", "1"),
                    ("TLS_CERT_FILE", "/c"),
                    ("TLS_KEY_FILE", "/k"),
                    ("ACME_DIRECTORY_URL", "https://a/d"),
                ][..],
                "https.acme.directory_url",
            ),
            (
                &[("HTTPS_PORT", "1"), ("ACME_DIRECTORY_URL", "http://a/d")][..],
                "https.acme.directory_url",
            ),
            (
                &[
                    ("HTTPS_PORT", "1"),
                    ("ACME_DIRECTORY_URL", "https://a/d"),
                    ("ACME_EMAIL", "nobody"),
                ][..],
                "https.acme.email",
            ),
            (
                &[
                    ("HTTPS_PORT", "8080"),
                    ("TLS_CERT_FILE", "/c"),
                    ("TLS_KEY_FILE", "/k"),
                ][..],
                "https.port",
            ),
        ] {
            let e = load(vars).expect_err(key).to_string();
            assert!(e.contains(key), "{vars:?}: {e}");
        }
        let e = load(&[("HSTS", "soon")]).unwrap_err().to_string();
        assert!(e.contains("HSTS"), "{e}");
    }

    #[test]
    fn public_url_omits_default_port() {
        let mut c = Config::default();
        assert_eq!(
            c.public_urls(8080).of("a-b-c"),
            "http://a-b-c.localhost:8080"
        );
        c.public_port = Some(80);
        assert_eq!(c.public_urls(8080).of("a-b-c"), "http://a-b-c.localhost");
    }
    #[test]
    fn ban_tiers_and_address_lists_are_checked() {
        let load = |vars: &[(&str, &str)]| Config::load(&ServeArgs::default(), &env(vars));
        let c = load(&[
            ("BAN_TIERS", "2:30s, 4:2h,9:1d"),
            ("BAN_EXEMPT", "10.0.0.0/8,192.0.2.1"),
        ])
        .unwrap();
        assert_eq!(
            c.ban_tiers,
            [
                (2, Duration::from_secs(30)),
                (4, Duration::from_secs(7200)),
                (9, Duration::from_secs(86_400))
            ]
        );
        assert_eq!(c.ban_exempt.len(), 2);
        for bad in ["3", "3:15x", "0:1m", "3:0m", "5:1m,3:1h", "x:1m"] {
            let e = load(&[("BAN_TIERS", bad)]).expect_err(bad).to_string();
            assert!(e.contains("security.ban_tiers"), "{bad}: {e}");
        }
        let e = load(&[("BAN_EXEMPT", "nonsense")]).unwrap_err().to_string();
        assert!(
            e.contains("security.ban_exempt") && e.contains("nonsense"),
            "{e}"
        );
        let c = load(&[("HTTP_TRUSTED_PROXIES", "10.1.2.3/8")]).unwrap();
        assert_eq!(
            c.trusted_proxies,
            ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
        );
    }

    #[test]
    fn p0rt_settings_and_yaml_shape_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        // P0rt's config.yaml as its README shows it.
        std::fs::write(
            &path,
            "server:\n  ssh:\n    port: 2022\n    host_key: /etc/p0rt/key\n  http:\n    port: 8081\n\
             domain:\n  base: tunnels.example.com\n  reservations_enabled: true\n\
             storage:\n  type: json\n  data_dir: /var/lib/p0rt\n",
        )
        .unwrap();
        let file = path.to_string_lossy().into_owned();
        let c = Config::load(&ServeArgs::default(), &env(&[("CONFIG_FILE", &file)])).unwrap();
        assert_eq!((c.ssh_port, c.http_port), (2022, 8081));
        assert!(matches!(&c.host_key, HostKeySource::File(p) if p == Path::new("/etc/p0rt/key")));
        assert_eq!(c.domain, "tunnels.example.com");
        assert!(c.reservations_enabled);
        assert_eq!(c.data_dir, Path::new("/var/lib/p0rt"));
        assert_eq!(c.config_file.as_deref(), Some(path.as_path()));
        // p0rt's own key wins over P0rt's in the same file; unknown keys stay errors.
        std::fs::write(&path, "server:\n  ssh:\n    port: 1\nssh:\n  port: 2\n").unwrap();
        let c = Config::load(&ServeArgs::default(), &env(&[("CONFIG_FILE", &file)])).unwrap();
        assert_eq!(c.ssh_port, 2);
        std::fs::write(&path, "server:\n  ssh:\n    prot: 1\n").unwrap();
        let e = Config::load(&ServeArgs::default(), &env(&[("CONFIG_FILE", &file)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("prot") && e.contains("config.yaml"), "{e}");
        let missing = dir.path().join("nope.yaml").to_string_lossy().into_owned();
        let e = Config::load(&ServeArgs::default(), &env(&[("CONFIG_FILE", &missing)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.yaml") && e.contains("CONFIG_FILE"), "{e}");

        let load = |vars: &[(&str, &str)]| Config::load(&ServeArgs::default(), &env(vars)).unwrap();
        // Environment names P0rt uses where p0rt's differ; p0rt's win when both are set.
        let c = load(&[("STORAGE_DATA_DIR", "/srv/a")]);
        assert_eq!(c.data_dir, Path::new("/srv/a"));
        let c = load(&[("STORAGE_DATA_DIR", "/srv/a"), ("DATA_DIR", "/srv/b")]);
        assert_eq!(c.data_dir, Path::new("/srv/b"));
        let c = load(&[("P0RT_API_KEY", "k3y-k3y-k3y-k3y-k3y")]);
        assert_eq!(
            c.admin_token.as_ref().map(Secret::expose),
            Some("k3y-k3y-k3y-k3y-k3y")
        );
        let c = load(&[("DOMAIN_RESERVATIONS_ENABLED", "1")]);
        assert!(c.reservations_enabled);
        assert!(
            load(&[]).reservations_enabled,
            "on by default: a reservation is its key's"
        );
        assert!(!load(&[("DOMAIN_RESERVATIONS_ENABLED", "false")]).reservations_enabled);
        // A Redis URL moves the store to Redis unless STORAGE_TYPE says otherwise (P0rt).
        assert_eq!(load(&[]).storage, StorageKind::Json);
        let c = load(&[("REDIS_URL", "redis://r:1")]);
        assert_eq!(
            (c.storage, c.storage_follows_redis_url),
            (StorageKind::Redis, true)
        );
        let c = load(&[("REDIS_URL", "redis://r:1"), ("STORAGE_TYPE", "json")]);
        assert_eq!(
            (c.storage, c.storage_follows_redis_url),
            (StorageKind::Json, false)
        );
        assert_eq!(
            c.redis_url.as_deref(),
            Some("redis://r:1"),
            "still the cache's"
        );
        assert_eq!(c.redis_url_in_use().as_deref(), Some("redis://r:1"));
        let c = load(&[
            ("REDIS_URL", "redis://r:1"),
            ("STORAGE_TYPE", "json"),
            ("ENABLE_REDIS", "false"),
        ]);
        assert_eq!(
            c.redis_url_in_use(),
            None,
            "JSON store, Redis off: no Redis at all"
        );
        let c = load(&[("REDIS_URL", "redis://r:1"), ("ENABLE_REDIS", "false")]);
        assert_eq!(
            c.redis_url_in_use().as_deref(),
            Some("redis://r:1"),
            "the Redis store uses Redis whatever ENABLE_REDIS says"
        );
        let c = load(&[("P0RT_REDIS_URL", "redis://p:2")]);
        assert_eq!(c.redis_url.as_deref(), Some("redis://p:2"));
        assert_eq!(c.storage, StorageKind::Redis);
        let c = load(&[("REDIS_HOST", "h"), ("REDIS_PORT", "7000")]);
        assert_eq!(c.redis_url.as_deref(), Some("redis://h:7000"));
        let c = load(&[("REDIS_HOST", "::1")]);
        assert_eq!(c.redis_url.as_deref(), Some("redis://[::1]:6379"));
        // Precedence as in P0rt: REDIS_URL, then P0RT_REDIS_URL, then REDIS_HOST.
        let c = load(&[
            ("REDIS_HOST", "h"),
            ("P0RT_REDIS_URL", "redis://p:2"),
            ("REDIS_URL", "redis://r:1"),
        ]);
        assert_eq!(c.redis_url.as_deref(), Some("redis://r:1"));
        let e = Config::load(
            &ServeArgs::default(),
            &env(&[("DOMAIN_RESERVATIONS_ENABLED", "yes please")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("DOMAIN_RESERVATIONS_ENABLED"), "{e}");
    }

    #[test]
    fn limits_come_from_yaml_and_env_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p0rt.yaml");
        std::fs::write(
            &path,
            "ssh:\n  limits:\n    auth_timeout_seconds: 7\n    max_startups: \"5:50:10\"\n    \
             max_tunnel_channels: 9\nhttp:\n  limits:\n    max_in_flight_per_tunnel: 3\n    \
             body_idle_timeout_seconds: 4\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        let c = Config::load(
            &args,
            &env(&[
                ("SSH_MAX_TUNNEL_CHANNELS", "11"),
                ("HTTP_MAX_CONNECTIONS", "99"),
            ]),
        )
        .unwrap();
        assert_eq!(c.ssh_limits.auth_timeout, Duration::from_secs(7));
        let u = c.ssh_limits.unauthenticated;
        assert_eq!((u.drop_start, u.max_total), (5, 10));
        assert_eq!(c.ssh_limits.max_tunnel_channels, 11, "env over file");
        assert_eq!(c.ssh_limits.max_forwards_per_connection, 16, "default kept");
        assert_eq!(c.http_limits.max_in_flight_per_tunnel, 3);
        assert_eq!(c.http_limits.body_idle_timeout, Duration::from_secs(4));
        assert_eq!(c.http_limits.max_connections, 99);
        let load = |vars: &[(&str, &str)]| Config::load(&ServeArgs::default(), &env(vars));
        for (var, bad, key) in [
            (
                "SSH_MAX_CONNECTIONS_PER_KEY",
                "0",
                "ssh.limits.max_connections_per_key",
            ),
            (
                "SSH_AUTH_TIMEOUT_SECONDS",
                "0",
                "ssh.limits.auth_timeout_seconds",
            ),
            ("SSH_MAX_STARTUPS", "300:30:200", "ssh.limits.max_startups"),
            (
                "HTTP_RESPONSE_TIMEOUT_SECONDS",
                "0",
                "http.limits.response_timeout_seconds",
            ),
            (
                "HTTP_MAX_CONNECTIONS_PER_ADDRESS",
                "0",
                "http.limits.max_connections_per_address",
            ),
        ] {
            let e = load(&[(var, bad)]).expect_err(var).to_string();
            assert!(e.contains(key), "{var}={bad}: {e}");
        }
        let e = load(&[("HTTP_MAX_IN_FLIGHT_PER_TUNNEL", "lots")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTP_MAX_IN_FLIGHT_PER_TUNNEL"), "{e}");
        std::fs::write(&path, "http:\n  limits:\n    max_inflight: 3\n").unwrap();
        let e = Config::load(&args, &env(&[])).unwrap_err().to_string();
        assert!(e.contains("max_inflight"), "unknown keys stay errors: {e}");
    }
}
