//! The plugin set: the active plugin of each role (a bundled one, or a file from the plugins
//! directory), reload and the directory watcher, and the status report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::files::{self, FileStamp};
use super::roles::{Naming, RateLimit, RequestPolicy, ScanAdmission};
use super::runtime::{AnyPlugin, Origin, Plugin, PluginInfo, PluginSpec, Runtime};
use super::{PluginError, Role};
use crate::cache::{Cache, MemoryCache};
use crate::store::DomainStore;

/// Quiet period after the last change in the plugins directory before reloading.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(300);

/// The plugin serving each role; `None` only with plugins disabled.
#[derive(Clone, Default)]
pub(super) struct Active {
    pub naming: Option<Arc<Plugin<Naming>>>,
    pub rate_limit: Option<Arc<Plugin<RateLimit>>>,
    pub request_policy: Option<Arc<Plugin<RequestPolicy>>>,
    pub scan_admission: Option<Arc<Plugin<ScanAdmission>>>,
}

impl Active {
    fn put(&mut self, plugin: AnyPlugin) {
        match plugin {
            AnyPlugin::Naming(p) => self.naming = Some(p),
            AnyPlugin::RateLimit(p) => self.rate_limit = Some(p),
            AnyPlugin::RequestPolicy(p) => self.request_policy = Some(p),
            AnyPlugin::ScanAdmission(p) => self.scan_admission = Some(p),
        }
    }

    fn all(&self) -> Vec<(&PluginInfo, Option<String>)> {
        let mut out = Vec::new();
        if let Some(p) = &self.naming {
            out.push((&p.info, p.benched()));
        }
        if let Some(p) = &self.rate_limit {
            out.push((&p.info, p.benched()));
        }
        if let Some(p) = &self.request_policy {
            out.push((&p.info, p.benched()));
        }
        if let Some(p) = &self.scan_admission {
            out.push((&p.info, p.benched()));
        }
        out
    }
}

/// What the set knows of one file in the plugins directory.
#[derive(Default)]
struct FileState {
    /// The file as last looked at; an unchanged file is not read again.
    stamp: FileStamp,
    /// sha256 of bytes, config and role of the content last loaded or refused.
    fingerprint: Option<String>,
    /// The last version that loaded (it keeps serving while newer content fails).
    plugin: Option<AnyPlugin>,
    error: Option<String>,
}

/// One line of `p0rt plugin list` / `/status/plugins`.
#[derive(Clone, Debug, Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub role: Option<Role>,
    pub sha256: Option<String>,
    pub wit_version: Option<String>,
    pub origin: String,
    pub active: bool,
    pub error: Option<String>,
    /// When the active version loaded, Unix seconds.
    pub loaded_at: Option<i64>,
    /// Answers the host used since it loaded.
    pub decisions: Option<u64>,
    /// Calls it failed since it loaded.
    pub failures: Option<u64>,
}

/// Options for [`PolicyPlugins::start`].
pub struct PluginOptions {
    /// Directory of `*.wasm` overrides (and sidecars); watched for changes.
    pub dir: Option<PathBuf>,
    /// Where compiled components are cached.
    pub compile_cache: Option<PathBuf>,
    /// `false`: no plugins at all (built-in namer, no rate limiting, scans denied).
    pub enabled: bool,
}

/// The active plugins and the fallbacks behind them (see `fallback.rs`).
pub struct PolicyPlugins {
    runtime: Option<Arc<Runtime>>,
    cache: Cache,
    domains: Option<Arc<dyn DomainStore>>,
    dir: Option<PathBuf>,
    active: RwLock<Active>,
    bundled: Active,
    /// Held for a whole reload, so reloads never interleave.
    files: tokio::sync::Mutex<BTreeMap<PathBuf, FileState>>,
    /// Files whose latest content failed to load, for [`PolicyPlugins::status`].
    errors: Mutex<BTreeMap<PathBuf, String>>,
    pub(super) fallback_limiter: MemoryCache,
}

fn fingerprint(spec: &PluginSpec) -> String {
    let mut hasher = Sha256::new();
    hasher.update(spec.bytes.as_slice());
    hasher.update([0]);
    hasher.update(spec.config.as_bytes());
    hasher.update([0]);
    hasher.update(format!("{:?}", spec.role).as_bytes());
    hex::encode(hasher.finalize())
}

impl PolicyPlugins {
    /// Loads the bundled plugins, then the directory's overrides.
    pub async fn start(
        options: PluginOptions,
        cache: Cache,
        domains: Option<Arc<dyn DomainStore>>,
    ) -> Result<Arc<PolicyPlugins>, PluginError> {
        let mut plugins = PolicyPlugins {
            runtime: None,
            cache,
            domains,
            dir: options.dir,
            active: RwLock::default(),
            bundled: Active::default(),
            files: tokio::sync::Mutex::default(),
            errors: Mutex::default(),
            fallback_limiter: MemoryCache::default(),
        };
        if !options.enabled {
            tracing::warn!("plugins disabled: built-in namer, no rate limiting, scan jobs denied");
            return Ok(Arc::new(plugins));
        }
        let runtime = Runtime::new(options.compile_cache)?;
        for (name, bytes) in files::bundled() {
            let spec = PluginSpec {
                name: name.to_string(),
                bytes: Arc::new(bytes.to_vec()),
                origin: Origin::Bundled,
                role: None,
                config: "{}".into(),
            };
            let plugin = runtime
                .load(spec, plugins.cache.clone(), plugins.domains.clone())
                .await?;
            plugins.bundled.put(plugin);
        }
        plugins.runtime = Some(runtime);
        *plugins.active.get_mut().unwrap_or_else(|p| p.into_inner()) = plugins.bundled.clone();
        let plugins = Arc::new(plugins);
        plugins.reload().await;
        Ok(plugins)
    }

    /// The plugins serving each role now.
    pub(super) fn active(&self) -> Active {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn enabled(&self) -> bool {
        self.runtime.is_some()
    }

    /// Rescans the directory, loads what changed, and swaps the result in at once. Files
    /// are read (and compiled) off the async runtime; a file that has not changed since the
    /// last look is neither read nor reported again.
    pub async fn reload(&self) {
        let Some(runtime) = &self.runtime else { return };
        let mut files = self.files.lock().await;
        let known: BTreeMap<PathBuf, FileStamp> = files
            .iter()
            .map(|(path, file)| (path.clone(), file.stamp.clone()))
            .collect();
        let dir = self.dir.clone();
        let scanned = tokio::task::spawn_blocking(move || files::scan(dir.as_deref(), &known))
            .await
            .unwrap_or_default();
        files.retain(|path, _| scanned.iter().any(|(p, ..)| p == path));
        for (path, stamp, read) in scanned {
            let Some(read) = read else { continue };
            let file = files.entry(path.clone()).or_default();
            file.stamp = stamp;
            let loaded = match read {
                Ok(spec) => {
                    let fingerprint = fingerprint(&spec);
                    if file.fingerprint.as_ref() == Some(&fingerprint) {
                        continue;
                    }
                    // Remembered also when it fails, so bad content is not retried until it changes.
                    file.fingerprint = Some(fingerprint);
                    runtime
                        .load(spec, self.cache.clone(), self.domains.clone())
                        .await
                }
                Err(e) => {
                    file.fingerprint = None;
                    Err(e)
                }
            };
            match loaded {
                Ok(plugin) => {
                    let info = plugin.info();
                    tracing::info!(
                        "plugin {} loaded from {} as {} (p0rt:policy@{})",
                        info.id(),
                        path.display(),
                        info.role,
                        info.wit_version.as_deref().unwrap_or("?")
                    );
                    file.plugin = Some(plugin);
                    file.error = None;
                }
                Err(e) => {
                    match &file.plugin {
                        Some(old) => tracing::error!(
                            "plugin {} failed to load: {e}; the previous version {} keeps serving",
                            path.display(),
                            old.info().id()
                        ),
                        None => tracing::error!("plugin {} failed to load: {e}", path.display()),
                    }
                    file.error = Some(e.to_string());
                }
            }
        }
        let mut next = self.bundled.clone();
        let mut taken: BTreeMap<Role, &Path> = BTreeMap::new();
        for (path, file) in files.iter() {
            let Some(plugin) = &file.plugin else { continue };
            let role = plugin.info().role;
            if let Some(owner) = taken.get(&role) {
                tracing::warn!(
                    "{} also implements {role}; {} keeps the role (files are taken in name order)",
                    path.display(),
                    owner.display()
                );
                continue;
            }
            taken.insert(role, path);
            next.put(plugin.clone());
        }
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()) = files
            .iter()
            .filter_map(|(path, file)| Some((path.clone(), file.error.clone()?)))
            .collect();
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    /// The state of every plugin: active ones, and directory files that failed to load.
    pub fn status(&self) -> Vec<PluginStatus> {
        let active = self.active();
        let mut out: Vec<PluginStatus> = active
            .all()
            .into_iter()
            .map(|(info, benched)| PluginStatus {
                name: info.name.to_string(),
                role: Some(info.role),
                sha256: Some(info.sha256.clone()),
                wit_version: info.wit_version.clone(),
                origin: info.origin.describe(),
                active: true,
                error: benched,
                loaded_at: Some(info.loaded_at),
                decisions: Some(info.counts.decisions.load(Relaxed)),
                failures: Some(info.counts.failures.load(Relaxed)),
            })
            .collect();
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(errors.iter().map(|(path, error)| {
            PluginStatus {
                name: path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                role: None,
                sha256: None,
                wit_version: None,
                origin: path.display().to_string(),
                active: false,
                error: Some(error.clone()),
                loaded_at: None,
                decisions: None,
                failures: None,
            }
        }));
        out
    }

    /// Logs which plugin serves each role, and which files failed to load.
    pub fn log_status(&self) {
        for status in self.status() {
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
    }

    /// Watches the plugins directory and reloads after changes settle.
    pub fn spawn_watcher(self: &Arc<Self>) {
        use notify::Watcher;
        let Some(dir) = self.dir.clone() else { return };
        if self.runtime.is_none() {
            return;
        }
        if !dir.is_dir() {
            tracing::info!(
                "plugins directory {} does not exist; serving the bundled plugins (create it and restart to add plugins)",
                dir.display()
            );
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading files (the reload itself does) is no change; reacting to it would
            // reload forever.
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        });
        let watching = watcher.and_then(|mut w| {
            w.watch(&dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        let watcher = match watching {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(
                    "cannot watch plugins directory {}: {e}; hot reload is off",
                    dir.display()
                );
                return;
            }
        };
        tracing::info!("watching {} for plugin changes", dir.display());
        let plugins = Arc::downgrade(self);
        tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                // Debounce: wait until the directory has been quiet for a moment.
                loop {
                    match tokio::time::timeout(RELOAD_DEBOUNCE, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let Some(plugins) = plugins.upgrade() else {
                    return;
                };
                plugins.reload().await;
            }
        });
    }
}
