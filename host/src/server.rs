//! Wires configuration, store, SSH edge and HTTP edge together and runs them.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::config::{Config, StorageKind};
use crate::plugins::{PluginOptions, PolicyPlugins};
use crate::store::DomainStore;
use crate::store::json::JsonStore;
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

/// Runs the host until SIGINT/SIGTERM or a fatal error.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let store: Arc<dyn DomainStore> = match config.storage {
        StorageKind::Json => {
            let store = JsonStore::open(&config.data_dir)?;
            tracing::info!(
                "domain store: {} ({} records)",
                config.data_dir.join(crate::store::json::DOMAINS_FILE_NAME).display(),
                store.len()
            );
            store.spawn_flusher();
            store
        }
        StorageKind::Redis => anyhow::bail!(
            "STORAGE_TYPE=redis is not available in this build yet; use STORAGE_TYPE=json"
        ),
    };
    let host_key = crate::ssh::load_or_create_host_key(&config.host_key)?;
    let cache = Cache::in_memory();
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
            (_, Some(error)) => tracing::warn!("plugin {} ({}) not active: {error}", status.name, status.origin),
            _ => {}
        }
    }
    plugins.spawn_watcher();

    let ssh_listener = TcpListener::bind((config.ssh_bind, config.ssh_port))
        .await
        .with_context(|| format!("cannot listen for SSH on {}:{} (ssh.port / SSH_SERVER_PORT)", config.ssh_bind, config.ssh_port))?;
    let http_listener = TcpListener::bind((config.http_bind, config.http_port))
        .await
        .with_context(|| format!("cannot listen for HTTP on {}:{} (http.port / HTTP_PORT)", config.http_bind, config.http_port))?;
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
    store.flush().await.context("writing the domain store on shutdown")?;
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
