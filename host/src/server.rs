//! Wires configuration, store, SSH edge and HTTP edge together and runs them.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Config, StorageKind};
use crate::store::DomainStore;
use crate::store::json::JsonStore;
use crate::tunnels::Registry;

/// Everything the edges share.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn DomainStore>,
    pub registry: Registry,
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
