//! Wires configuration, store, SSH edge and HTTP edge together and runs them.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::config::{Config, StorageKind};
use crate::plugins::{PluginOptions, PolicyPlugins};
use crate::redis_link::{RedisLink, RedisOpError, parse_target};
use crate::store::json::{DOMAINS_FILE_NAME, JsonStore, lock_data_dir};
use crate::store::redis::RedisStore;
use crate::store::{DomainStore, migrate};
use crate::tunnels::Registry;

/// Subdirectory of the data directory holding compiled plugins.
pub const PLUGIN_COMPILE_CACHE_DIR: &str = "plugin-cache";

/// Everything the edges share.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn DomainStore>,
    pub registry: Registry,
    pub plugins: Arc<PolicyPlugins>,
    pub cache: Cache,
    /// Port the SSH edge actually listens on (differs from the config when it asked for 0).
    pub ssh_port: u16,
    /// Port the HTTP edge actually listens on.
    pub http_port: u16,
}

/// A startup failure caused by the operator's settings (exit code 2, like a config error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

/// Connects to the configured Redis and checks it answers. A refused password or an unknown
/// master is a settings error; an unreachable server is only a warning (it may come back).
pub async fn connect_redis(config: &Config, url: &str) -> anyhow::Result<Arc<RedisLink>> {
    let target = parse_target(
        url,
        config.redis_password.as_ref().map(|s| s.expose()),
        config.redis_db,
    )
    .map_err(|e| SettingsError(e.to_string()))?;
    let ca_cert = match &config.redis_ca_cert {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            SettingsError(format!("cannot read REDIS_CA_CERT {}: {e}", path.display()))
        })?),
        None => None,
    };
    let link = RedisLink::new(target, url, ca_cert);
    match link.check().await {
        Ok(latency) => tracing::info!(
            "redis at {} answers ({} µs)",
            link.display,
            latency.as_micros()
        ),
        Err(e @ (RedisOpError::Auth(_) | RedisOpError::Config(_))) => {
            return Err(SettingsError(format!("redis at {}: {e}", link.display)).into());
        }
        Err(e) => tracing::warn!(
            "redis at {} is unreachable ({e}); starting anyway: live tunnels keep routing, keys seen \
             before keep their names, new keys are refused until it returns",
            link.display
        ),
    }
    Ok(link)
}

/// The data-directory lock held while the store is open (JSON keeps its own).
pub enum DirLock {
    InStore,
    Held(std::fs::File),
}

/// Opens the configured domain store.
pub async fn open_store(
    config: &Config,
    link: Option<&Arc<RedisLink>>,
) -> anyhow::Result<(Arc<dyn DomainStore>, DirLock)> {
    match (config.storage, link) {
        (StorageKind::Json, _) => {
            let store = JsonStore::open(&config.data_dir)?;
            tracing::info!(
                "domain store: {} ({} records)",
                config.data_dir.join(DOMAINS_FILE_NAME).display(),
                store.len()
            );
            store.spawn_flusher();
            Ok((store, DirLock::InStore))
        }
        (StorageKind::Redis, Some(link)) => {
            let lock = lock_data_dir(&config.data_dir)?;
            let store = RedisStore::new(link.clone(), &config.redis_prefix, config.redis_ttl_days);
            tracing::info!(
                "domain store: redis at {} (keys {}domain:*)",
                link.display,
                config.redis_prefix
            );
            // The seed promises domain data is preserved when switching from JSON to Redis.
            let file = config.data_dir.join(DOMAINS_FILE_NAME);
            if file.exists() && matches!(store.is_empty().await, Ok(true)) {
                match migrate::json_file_into(&config.data_dir, store.as_ref()).await {
                    Ok(report) => tracing::info!(
                        "redis had no domains; imported {}: {report}",
                        file.display()
                    ),
                    Err(e) => {
                        tracing::error!("could not import {} into redis: {e}", file.display())
                    }
                }
            }
            Ok((store, DirLock::Held(lock)))
        }
        (StorageKind::Redis, None) => {
            Err(SettingsError("STORAGE_TYPE=redis needs a Redis URL".into()).into())
        }
    }
}

/// Runs the host until SIGINT/SIGTERM or a fatal error.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // rustls (Redis over TLS) needs a process-wide crypto provider; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let link = match config.redis_url_in_use() {
        Some(url) if config.storage == StorageKind::Redis || config.enable_redis => {
            Some(connect_redis(&config, &url).await?)
        }
        _ => None,
    };
    let (store, _lock) = open_store(&config, link.as_ref()).await?;
    let cache = match (&link, config.enable_redis) {
        (Some(link), true) => {
            tracing::info!("cache: redis at {} with in-memory fallback", link.display);
            Cache::with_redis(link.clone(), &config.redis_prefix)
        }
        _ => Cache::in_memory(),
    };
    let host_key = crate::ssh::load_or_create_host_key(&config.host_key)
        .map_err(|e| SettingsError(e.to_string()))?;
    let plugins = PolicyPlugins::start(
        PluginOptions {
            dir: Some(config.plugins_dir.clone()),
            compile_cache: Some(config.data_dir.join(PLUGIN_COMPILE_CACHE_DIR)),
            enabled: config.plugins_enabled,
        },
        cache.clone(),
        Some(store.clone()),
    )
    .await
    .context("starting the bundled plugins")?;
    for status in plugins.status() {
        match (&status.role, &status.error) {
            (Some(role), None) => tracing::info!(
                "plugin {} ({}) serves {role} [{}]",
                status.name,
                status.sha256.as_deref().map(|s| &s[..12]).unwrap_or("?"),
                status.origin
            ),
            (_, Some(error)) => tracing::warn!(
                "plugin {} ({}) not active: {error}",
                status.name,
                status.origin
            ),
            _ => {}
        }
    }
    plugins.spawn_watcher();

    let ssh_listener = TcpListener::bind((config.ssh_bind, config.ssh_port))
        .await
        .with_context(|| {
            format!(
                "cannot listen for SSH on {}:{} (ssh.port / SSH_SERVER_PORT)",
                config.ssh_bind, config.ssh_port
            )
        })?;
    let http_listener = TcpListener::bind((config.http_bind, config.http_port))
        .await
        .with_context(|| {
            format!(
                "cannot listen for HTTP on {}:{} (http.port / HTTP_PORT)",
                config.http_bind, config.http_port
            )
        })?;
    let ssh_addr = ssh_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    tracing::info!("ssh edge listening on {ssh_addr}");
    tracing::info!("http edge listening on {http_addr}");
    tracing::info!(
        "tunnels will be served as {}",
        config.public_url("<name>", http_addr.port())
    );

    let state = Arc::new(AppState {
        config,
        store: store.clone(),
        registry: Registry::default(),
        plugins,
        cache,
        ssh_port: ssh_addr.port(),
        http_port: http_addr.port(),
    });
    tokio::select! {
        _ = crate::ssh::serve(ssh_listener, state.clone(), host_key) => {}
        _ = crate::http::serve(http_listener, state.clone()) => {}
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    store
        .flush()
        .await
        .context("writing the domain store on shutdown")?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
