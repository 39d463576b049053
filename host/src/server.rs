//! Wires configuration, store, cache, plugins, the tunnel service and the two edges
//! together, runs them, and shuts them down in order.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::config::{CertSetting, Config, SettingsError, StorageKind};
use crate::http::HttpEdge;
use crate::http::upstream::{UPSTREAM_IDLE_TIMEOUT, UpstreamPool};
use crate::listen::listen;
use crate::plugins::{PluginOptions, PolicyPlugins};
use crate::scan::queue::{JobBackend, MemoryJobs};
use crate::scan::redis_queue::RedisJobs;
use crate::scan::{EdgeAddress, ScanService};
use crate::ssh::{KeyAccess, SshEdge};
use crate::store::open::{connect_redis, open_store};
use crate::tokens::TokenStore;
use crate::tunnels::TunnelService;

/// Subdirectory of the data directory holding compiled plugins.
pub const PLUGIN_COMPILE_CACHE_DIR: &str = "plugin-cache";

/// Where the bound ports are announced once the host serves (`--ready-file`).
#[derive(serde::Serialize)]
struct Ready {
    ssh_port: u16,
    http_port: u16,
    /// Present when HTTPS is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    https_port: Option<u16>,
    pid: u32,
}

/// Descriptors kept beside the two edges' connection caps: plugin files, the store, Redis
/// links, watchers and logs.
const SPARE_FILE_DESCRIPTORS: u64 = 1024;
/// Below this open-files limit the host warns: a few thousand idle sockets would make
/// `accept` fail for everyone.
const LOW_OPEN_FILES_LIMIT: u64 = 8192;

/// Raises the soft open-files limit toward the hard one: each connection is a descriptor,
/// and the usual soft default (1024) is far below the edges' connection caps.
fn raise_open_files_limit(config: &Config) {
    let wanted = (config.ssh_limits.max_connections + config.http_limits.max_connections) as u64
        + SPARE_FILE_DESCRIPTORS;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < LOW_OPEN_FILES_LIMIT => tracing::warn!(
            "open files limit is {got}: connections beyond it are refused at accept; raise the \
             hard limit (ulimit -n, systemd LimitNOFILE) to {wanted}, what the connection caps \
             allow"
        ),
        Ok(got) if got < wanted => tracing::info!(
            "open files limit {got} (the connection caps allow {wanted}; raise the hard limit \
             or lower ssh.limits.max_connections and http.limits.max_connections to match)"
        ),
        Ok(got) => tracing::debug!("open files limit {got}"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
}

/// Runs the host until SIGINT/SIGTERM or a fatal error. `ready_file`: written (as JSON:
/// `ssh_port`, `http_port`, `https_port` when HTTPS is on, `pid`) once both edges listen.
pub async fn run(config: Config, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    // rustls (Redis over TLS) needs a process-wide crypto provider; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_open_files_limit(&config);
    if let Some(file) = &config.config_file {
        tracing::info!("config: read {}", file.display());
    }
    if config.storage_follows_redis_url {
        tracing::info!(
            "storage: redis, because a Redis URL is set and STORAGE_TYPE is not (as P0rt does); \
             set STORAGE_TYPE=json to keep the domain store in the data directory"
        );
    }
    let link = match config.redis_url_in_use() {
        Some(url) => Some(connect_redis(&config, &url).await?),
        None => None,
    };
    let (store, _lock) = open_store(&config, link.as_ref()).await?;
    let cache = match (&link, config.enable_redis) {
        (Some(link), true) => {
            tracing::info!("cache: redis at {} with in-memory fallback", link.display);
            Cache::with_redis(link.clone(), &config.redis_prefix)
        }
        _ => Cache::in_memory(),
    };
    let host_keys = crate::ssh::load_host_keys(&config.host_key, &config.data_dir)
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
    plugins.log_status();
    plugins.spawn_watcher();

    let ssh_listener = listen((config.ssh_bind, config.ssh_port).into()).with_context(|| {
        format!(
            "cannot listen for SSH on {}:{} (ssh.port / SSH_SERVER_PORT)",
            config.ssh_bind, config.ssh_port
        )
    })?;
    let http_listener = listen((config.http_bind, config.http_port).into()).with_context(|| {
        format!(
            "cannot listen for HTTP on {}:{} (http.port / HTTP_PORT)",
            config.http_bind, config.http_port
        )
    })?;
    let https = https_listener(&config, &store, link.as_ref()).await?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen for metrics on {addr} (metrics.listen / METRICS_LISTEN)")
            })?;
            tracing::info!("metrics listening on {}", listener.local_addr()?);
            Some(listener)
        }
        None => None,
    };
    let ssh_port = ssh_listener.local_addr()?.port();
    let http_port = http_listener.local_addr()?.port();
    let https_port = match &https {
        Some(https) => Some(https.listener.local_addr()?.port()),
        None => None,
    };
    let mut https = https;
    let urls = config.public_urls_with_https(http_port, https_port);
    if let (Some(https), Some(port)) = (&mut https, https_port) {
        let port = config.public_port.unwrap_or(port);
        https.policy.public_port = (port != 443).then_some(port);
    }
    tracing::info!("ssh edge listening on {}", ssh_listener.local_addr()?);
    tracing::info!("http edge listening on {}", http_listener.local_addr()?);
    if let Some(https) = &https {
        tracing::info!("https edge listening on {}", https.listener.local_addr()?);
    }
    tracing::info!("tunnels will be served as {}", urls.of("<name>"));

    let tunnels = Arc::new(
        TunnelService::new(store.clone(), plugins.clone())
            .with_max_tunnels_per_key(config.ssh_limits.max_tunnels_per_key),
    );
    let prefix = &config.redis_prefix;
    let cluster = crate::cluster::start(&config.cluster, link.as_ref(), prefix, &tunnels)
        .await
        .map_err(|e| SettingsError(e.to_string()))?;
    let (scans, tokens) = scan_service(&config, link.as_ref(), &tunnels, &plugins, &http_listener)?;
    let policy = crate::bans::BanPolicy::from_config(&config);
    tracing::info!("{}", policy.describe());
    let bans = Arc::new(match &link {
        Some(link) => crate::bans::BanList::redis(link.clone(), &config.redis_prefix, policy),
        None => crate::bans::BanList::open_file(&config.data_dir, policy)
            .map_err(|e| SettingsError(e.to_string()))?,
    });
    if let Err(e) = bans.refresh().await {
        tracing::warn!("cannot read the name and key bans yet ({e}); retrying in the background");
    }
    let access = KeyAccess::from_config(&config, link.as_ref())
        .await
        .map_err(SettingsError)?;
    let admin = Arc::new(crate::admin::AdminState {
        bans: bans.clone(),
        plugins: plugins.clone(),
        started: std::time::Instant::now(),
        console: crate::admin::console::ConsoleState::new(
            &config.admin_path,
            config.public_scheme == crate::config::PublicScheme::Https,
        ),
    });
    let ssh = Arc::new(SshEdge {
        limits: config.ssh_limits,
        bans,
        tunnels: tunnels.clone(),
        access,
        urls,
        ssh_port,
        domain: config.domain.clone(),
        scans: scans.clone(),
        tokens: tokens.clone(),
        sessions: Default::default(),
    });
    let http = Arc::new(HttpEdge {
        tunnels,
        requests: plugins.clone(),
        // As many as the tunnel may have in flight, so a busy tunnel reuses every channel.
        upstreams: UpstreamPool::with_max_per_tunnel(
            UPSTREAM_IDLE_TIMEOUT,
            config.http_limits.max_in_flight_per_tunnel,
        ),
        store: store.clone(),
        cache,
        domain: config.domain.clone(),
        admin_token: config.admin_token.clone(),
        ssh_port,
        plugin_status: {
            let plugins = plugins.clone();
            Arc::new(move || serde_json::to_value(plugins.status()).unwrap_or_default())
        },
        scans: scans.clone(),
        tokens,
        trusted_proxies: crate::http::TrustedProxies(config.trusted_proxies.clone()),
        limits: config.http_limits,
        cluster: cluster.as_ref().map(|c| c.cluster.clone()),
        admin: Some(admin),
    });

    let (stop_tx, stop) = crate::shutdown::channel();
    let (disconnect_tx, disconnect) = crate::shutdown::channel();
    let ssh_edge = ssh.clone();
    let mut ssh_task = tokio::spawn(crate::ssh::serve(
        ssh_listener,
        ssh,
        host_keys,
        stop.clone(),
        disconnect,
    ));
    scans.spawn_workers(stop.clone());
    crate::ssh::banned::spawn_enforcer(ssh_edge, stop.clone());
    let listeners = crate::http::Listeners {
        http: http_listener,
        https,
    };
    let cluster_task = cluster.map(|started| {
        started.cluster.spawn(stop.clone());
        let task = crate::http::peer::serve_internal(started.listener, http.clone(), stop.clone());
        (started.cluster, tokio::spawn(task))
    });
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve_listener(
            listener,
            http.clone(),
            stop.clone(),
        ));
    }
    let mut http_task = tokio::spawn(crate::http::serve_edge(listeners, http, stop));
    if let Some(path) = &ready_file {
        let ready = Ready {
            ssh_port,
            http_port,
            https_port,
            pid: std::process::id(),
        };
        write_ready_file(path, &ready)
            .with_context(|| format!("cannot write --ready-file {}", path.display()))?;
    }
    tokio::select! {
        _ = &mut ssh_task => tracing::error!("the ssh edge stopped"),
        _ = &mut http_task => tracing::error!("the http edge stopped"),
        _ = shutdown_signal() => tracing::info!("shutting down: no new connections, finishing requests"),
    }
    // Stop accepting on both edges; let HTTP requests in flight finish (they run through the
    // SSH sessions, so those stay up meanwhile); then tell SSH clients the host is going away.
    stop_tx.stop();
    let _ = http_task.await;
    if let Some((cluster, task)) = cluster_task {
        let _ = task.await;
        cluster.leave().await;
    }
    disconnect_tx.stop();
    let _ = ssh_task.await;
    store
        .flush()
        .await
        .context("writing the domain store on shutdown")?;
    tracing::info!("stopped");
    Ok(())
}

/// The HTTPS listener and its certificates, when `https.port` is set. Unusable certificate
/// files (or ACME settings) stop the host with a settings error naming the file.
async fn https_listener(
    config: &Config,
    store: &Arc<dyn crate::store::DomainStore>,
    link: Option<&Arc<crate::redis_link::RedisLink>>,
) -> anyhow::Result<Option<crate::http::HttpsListener>> {
    let (Some(port), Some(setting)) = (config.https.port, config.https.certificates()) else {
        return Ok(None);
    };
    let certs: Arc<dyn crate::http::CertSource> = match setting {
        CertSetting::Files { cert, key } => {
            let certs = crate::http::tls::FileCerts::load(cert, key)
                .map_err(|e| SettingsError(e.to_string()))?;
            tracing::info!(
                "https: certificate from {} and {} (reloaded when they change)",
                cert.display(),
                key.display()
            );
            certs.spawn_reloader();
            certs
        }
        CertSetting::Acme { directory_url } => {
            use crate::http::acme::{ACME_DIR, AcmeCerts, AcmeSettings, Vault};
            // Shared by every host when the domain store is Redis.
            let vault = match link {
                Some(link) if config.storage == StorageKind::Redis => Vault::Redis {
                    link: link.clone(),
                    prefix: config.redis_prefix.clone(),
                },
                _ => Vault::Files(config.data_dir.join(ACME_DIR)),
            };
            let settings = AcmeSettings {
                directory_url: directory_url.to_string(),
                email: config.https.acme_email.clone(),
                ca_cert: config.https.acme_ca_cert.clone(),
                domain: config.domain.clone(),
            };
            let certs = AcmeCerts::new(settings, store.clone(), vault).map_err(SettingsError)?;
            certs.spawn_renewals();
            Arc::new(certs)
        }
    };
    let bind = config.https.bind.unwrap_or(config.http_bind);
    let listener = listen((bind, port).into()).with_context(|| {
        format!("cannot listen for HTTPS on {bind}:{port} (https.port / HTTPS_PORT)")
    })?;
    Ok(Some(crate::http::HttpsListener {
        listener,
        certs,
        policy: crate::http::HttpsPolicy {
            redirect: config.https.redirect,
            hsts_max_age: config.https.hsts_max_age,
            public_port: None,
        },
    }))
}

/// The scan service (its queue in Redis when the host uses Redis, else in memory) and the
/// API token store (Redis, else a file in the data directory).
fn scan_service(
    config: &Config,
    link: Option<&Arc<crate::redis_link::RedisLink>>,
    tunnels: &Arc<TunnelService>,
    plugins: &Arc<PolicyPlugins>,
    http_listener: &TcpListener,
) -> anyhow::Result<(Arc<ScanService>, Arc<TokenStore>)> {
    let (backend, tokens): (Arc<dyn JobBackend>, TokenStore) = match link {
        Some(link) => (
            Arc::new(RedisJobs::new(
                link.clone(),
                &config.redis_prefix,
                config.scan.record_ttl,
            )),
            TokenStore::redis(link.clone(), &config.redis_prefix),
        ),
        None => (
            Arc::new(MemoryJobs::new(config.scan.record_ttl)),
            TokenStore::open_file(&config.data_dir).map_err(|e| SettingsError(e.to_string()))?,
        ),
    };
    // Scans reach tunnels through this host's own edge, like any visitor.
    let mut addr = http_listener.local_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    if !config.scan.allowed_targets.is_empty() {
        tracing::info!(
            "scans may contact the raw targets in scan.allowed_targets (TCP ports only)"
        );
    }
    let scans = ScanService::new(
        backend,
        plugins.clone(),
        tunnels.clone(),
        config.scan.clone(),
        EdgeAddress {
            addr,
            domain: config.domain.clone(),
        },
    );
    Ok((scans, Arc::new(tokens)))
}

/// Writes the file whole or not at all (temp file + rename), so a reader never sees half.
fn write_ready_file(path: &std::path::Path, ready: &Ready) -> std::io::Result<()> {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, serde_json::to_vec(ready)?)?;
    std::fs::rename(&temp, path)
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
