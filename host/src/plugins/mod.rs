//! Policy plugins: WebAssembly components that decide names, rate limits and scan admission.
//!
//! [`PolicyPlugins`] holds one plugin per role: the bundled reference plugin, or a file from
//! the plugins directory that implements the same world. Every decision is validated here,
//! and every failure has a defined outcome (the brief's contract):
//!
//! - naming → the host's built-in namer (still stable per key);
//! - rate limiting → a built-in conservative limiter (fail open, never unlimited);
//! - scan admission → deny (fail closed).
//!
//! The directory is watched: changes are debounced, loaded off to the side and swapped in
//! atomically; a plugin that fails to load leaves the previous one serving.

pub mod bindings;
pub mod host_api;
pub mod runtime;
pub mod tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use self::bindings::{
    naming as naming_world, rate_limit as rate_world, scan_admission as scan_world,
};
pub use self::runtime::{Origin, Plugin, PluginSpec, Runtime};
use crate::cache::{Cache, MemoryCache};
use crate::store::DomainStore;

/// Quiet period after the last change in the plugins directory before reloading.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(300);
/// Requests per minute per client IP allowed by the built-in limiter that stands in for a
/// failed rate-limit plugin.
pub const FALLBACK_REQUESTS_PER_IP_PER_MINUTE: i64 = 600;
/// Longest message from a plugin shown to a user.
pub const MAX_PLUGIN_MESSAGE_CHARS: usize = 200;
/// Longest name a naming plugin may return (one DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// The three kinds of policy.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Naming,
    RateLimit,
    ScanAdmission,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Naming, Role::RateLimit, Role::ScanAdmission];

    /// The WIT interface the role's world exports.
    pub fn interface(self) -> &'static str {
        match self {
            Role::Naming => "naming",
            Role::RateLimit => "rate-limit",
            Role::ScanAdmission => "scan-admission",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.interface())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    #[error(
        "file is {size} bytes, over the {} byte limit for plugins",
        runtime::MAX_PLUGIN_BYTES
    )]
    TooLarge { size: usize },
    #[error("cannot be compiled (not a valid component, or over the host's limits): {0}")]
    Compile(String),
    #[error(
        "needs imports the host does not provide (plugins get only p0rt:policy and an empty WASI): {0}"
    )]
    Link(String),
    #[error(
        "implements no p0rt:policy world{} (its exports: {})",
        expected.map(|r| format!(" for role {r}")).unwrap_or_default(),
        if exports.is_empty() { "none".to_string() } else { exports.join(", ") }
    )]
    WrongWorld {
        expected: Option<Role>,
        exports: Vec<String>,
    },
    #[error("implements several roles ({roles:?}); set \"role\" in its sidecar .json file")]
    Ambiguous { roles: Vec<Role> },
    #[error("failed to instantiate: {0}")]
    Instantiate(String),
    #[error("init refused its configuration: {0}")]
    InitRefused(String),
    #[error("{0}")]
    Trap(String),
    #[error("did not finish within {} ms", runtime::CALL_TIMEOUT.as_millis())]
    Timeout,
    #[error("returned an invalid decision: {0}")]
    BadOutput(String),
    #[error("{0}")]
    Benched(String),
    #[error("cannot read {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("sidecar {path}: {detail}")]
    Sidecar { path: PathBuf, detail: String },
}

/// Sidecar file `<plugin>.json` next to `<plugin>.wasm`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// Role to fill, for components that implement several worlds.
    pub role: Option<Role>,
    /// Handed to the plugin's `init` as JSON text.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// The reference plugins, built from `plugins/` and embedded at build time.
pub fn bundled() -> [(&'static str, &'static [u8]); 3] {
    [
        (
            "words",
            include_bytes!(concat!(env!("P0RT_BUNDLED_PLUGINS"), "/words.wasm")),
        ),
        (
            "ratelimit",
            include_bytes!(concat!(env!("P0RT_BUNDLED_PLUGINS"), "/ratelimit.wasm")),
        ),
        (
            "scan-guard",
            include_bytes!(concat!(env!("P0RT_BUNDLED_PLUGINS"), "/scan_guard.wasm")),
        ),
    ]
}

/// Reads `<dir>/<stem>.wasm` and its optional sidecar into a load spec.
pub fn read_plugin_file(path: &Path) -> Result<PluginSpec, PluginError> {
    let read_err = |detail: String| PluginError::Read {
        path: path.to_path_buf(),
        detail,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| read_err(e.to_string()))?
        .len();
    if size > runtime::MAX_PLUGIN_BYTES as u64 {
        return Err(PluginError::TooLarge {
            size: size as usize,
        });
    }
    let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
    let sidecar_path = path.with_extension("json");
    let sidecar = match std::fs::read_to_string(&sidecar_path) {
        Ok(text) => serde_json::from_str::<Sidecar>(&text).map_err(|e| PluginError::Sidecar {
            path: sidecar_path.clone(),
            detail: format!("{e} (expected {{\"role\": ..., \"config\": {{...}}}})"),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Sidecar::default(),
        Err(e) => {
            return Err(PluginError::Sidecar {
                path: sidecar_path,
                detail: e.to_string(),
            });
        }
    };
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    Ok(PluginSpec {
        name,
        bytes: Arc::new(bytes),
        origin: Origin::File(path.to_path_buf()),
        role: sidecar.role,
        config: sidecar
            .config
            .map(|c| c.to_string())
            .unwrap_or_else(|| "{}".to_string()),
    })
}

/// The `*.wasm` files directly inside `dir`, sorted.
pub fn plugin_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
        .collect();
    files.sort();
    files
}

// ---- decisions -------------------------------------------------------------------------

pub use crate::policy::{
    LabelApproval, NameChoice, NamingInput, RateDecision, RequestFacts, ScanDecision, ScanJob,
};

/// Makes a plugin-supplied message safe to show: printable, bounded.
fn clean_message(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_PLUGIN_MESSAGE_CHARS)
        .collect()
}

/// Checks a name returned by a naming plugin: one DNS label, not reserved.
pub fn validate_plugin_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name of {} bytes is longer than {MAX_NAME_LEN}",
            name.len()
        ));
    }
    crate::names::check_dns_label(name)?;
    if crate::names::is_reserved(name) {
        return Err(format!("{name:?} is reserved"));
    }
    Ok(())
}

/// Calls the plugin for one naming decision and validates the output. Never fails:
/// problems become [`NameChoice::Fallback`] with the reason.
pub async fn decide_name(plugin: &Plugin, input: &NamingInput, fresh: bool) -> NameChoice {
    use naming_world::exports::p0rt::policy::naming::{NamingDecision, NamingRequest};
    let request = NamingRequest {
        ssh_key_hash: input.ssh_key_hash.clone(),
        fingerprint: input.fingerprint.clone(),
        requested_label: input.requested_label.clone(),
        attempt: input.attempt,
    };
    let result = plugin
        .invoke(fresh, move |instance, store| {
            Box::pin(async move {
                match instance {
                    runtime::RoleInstance::Naming(n) => {
                        n.p0rt_policy_naming()
                            .call_choose_name(store, &request)
                            .await
                    }
                    _ => Err(wasmtime::Error::msg("plugin does not implement naming")),
                }
            })
        })
        .await;
    match result {
        Ok(NamingDecision::Name(name)) => match validate_plugin_name(&name) {
            Ok(()) => NameChoice::Name(name),
            Err(problem) => {
                let error = plugin.report_bad_output(problem);
                NameChoice::Fallback(format!("plugin {}: {error}", plugin.id()))
            }
        },
        Ok(NamingDecision::Refuse(reason)) => NameChoice::Refused(clean_message(&reason)),
        Err(e) => NameChoice::Fallback(format!("plugin {}: {e}", plugin.id())),
    }
}

/// Calls the plugin for one rate-limit decision. `Err` means: use the fallback limiter.
pub async fn decide_rate(
    plugin: &Plugin,
    facts: RequestFacts,
    fresh: bool,
) -> Result<RateDecision, PluginError> {
    use rate_world::exports::p0rt::policy::rate_limit::{Decision, RequestInfo};
    let RequestFacts {
        client_ip,
        host,
        name,
        owner_key_hash,
        method,
        path,
        headers,
    } = facts;
    let request = RequestInfo {
        client_ip,
        host,
        name,
        owner_key_hash,
        method,
        path,
        headers,
    };
    let decision = plugin
        .invoke(fresh, move |instance, store| {
            Box::pin(async move {
                match instance {
                    runtime::RoleInstance::RateLimit(r) => {
                        r.p0rt_policy_rate_limit().call_check(store, &request).await
                    }
                    _ => Err(wasmtime::Error::msg("plugin does not implement rate-limit")),
                }
            })
        })
        .await?;
    match decision {
        Decision::Allow => Ok(RateDecision::Allow),
        Decision::Deny(denial) => {
            if !(400..=599).contains(&denial.status) {
                return Err(plugin.report_bad_output(format!(
                    "deny status {} is not a 4xx or 5xx code",
                    denial.status
                )));
            }
            Ok(RateDecision::Deny {
                status: denial.status,
                retry_after_seconds: denial.retry_after_seconds,
                message: clean_message(&denial.message),
            })
        }
    }
}

/// Calls the plugin for one scan decision; any failure or invalid output rejects.
pub async fn decide_scan(plugin: &Plugin, job: &ScanJob, fresh: bool) -> ScanDecision {
    use scan_world::exports::p0rt::policy::scan_admission::{Decision, ScanJob as WitJob};
    let request = WitJob {
        requester_key_hash: job.requester_key_hash.clone(),
        target: job.target.clone(),
        ports: job.ports.clone(),
        checks: job.checks.clone(),
        owned_names: job.owned_names.clone(),
        target_is_own_tunnel: job.target_is_own_tunnel,
    };
    let result = plugin
        .invoke(fresh, move |instance, store| {
            Box::pin(async move {
                match instance {
                    runtime::RoleInstance::ScanAdmission(s) => {
                        s.p0rt_policy_scan_admission()
                            .call_admit(store, &request)
                            .await
                    }
                    _ => Err(wasmtime::Error::msg(
                        "plugin does not implement scan-admission",
                    )),
                }
            })
        })
        .await;
    match result {
        Ok(Decision::Accept(admission)) => {
            if admission.priority > 9 {
                let e = plugin
                    .report_bad_output(format!("priority {} is outside 0-9", admission.priority));
                return ScanDecision::Reject {
                    reason: format!("scan policy failed ({e}); job denied"),
                };
            }
            if let Some(extra) = admission
                .allowed_checks
                .iter()
                .find(|c| !job.checks.contains(c))
            {
                let e = plugin
                    .report_bad_output(format!("allowed check {extra:?} was never requested"));
                return ScanDecision::Reject {
                    reason: format!("scan policy failed ({e}); job denied"),
                };
            }
            ScanDecision::Accept {
                priority: admission.priority,
                allowed_checks: admission.allowed_checks,
            }
        }
        Ok(Decision::Reject(reason)) => ScanDecision::Reject {
            reason: clean_message(&reason),
        },
        Err(e) => ScanDecision::Reject {
            reason: format!("scan policy unavailable ({e}); job denied"),
        },
    }
}

// ---- the set of active plugins -----------------------------------------------------------

#[derive(Clone, Default)]
struct Slots {
    by_role: BTreeMap<Role, Arc<Plugin>>,
}

/// A loaded file and what identifies its content (sha256 of bytes and config).
struct LoadedFile {
    fingerprint: String,
    plugin: Option<Arc<Plugin>>,
}

/// One line of `p0rt plugin list` / the load report.
#[derive(Clone, Debug, Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub role: Option<Role>,
    pub sha256: Option<String>,
    pub wit_version: Option<String>,
    pub origin: String,
    pub active: bool,
    pub error: Option<String>,
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

/// The active plugins and the fallbacks behind them.
pub struct PolicyPlugins {
    runtime: Option<Arc<Runtime>>,
    cache: Cache,
    domains: Option<Arc<dyn DomainStore>>,
    dir: Option<PathBuf>,
    slots: RwLock<Slots>,
    bundled: Slots,
    files: tokio::sync::Mutex<BTreeMap<PathBuf, LoadedFile>>,
    last_errors: Mutex<BTreeMap<PathBuf, String>>,
    fallback_limiter: MemoryCache,
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
            cache: cache.clone(),
            domains: domains.clone(),
            dir: options.dir.clone(),
            slots: RwLock::new(Slots::default()),
            bundled: Slots::default(),
            files: tokio::sync::Mutex::new(BTreeMap::new()),
            last_errors: Mutex::new(BTreeMap::new()),
            fallback_limiter: MemoryCache::default(),
        };
        if !options.enabled {
            tracing::warn!("plugins disabled: built-in namer, no rate limiting, scan jobs denied");
            return Ok(Arc::new(plugins));
        }
        let runtime = Runtime::new(options.compile_cache)?;
        for (name, bytes) in bundled() {
            let spec = PluginSpec {
                name: name.to_string(),
                bytes: Arc::new(bytes.to_vec()),
                origin: Origin::Bundled,
                role: None,
                config: "{}".into(),
            };
            let plugin = runtime.load(spec, cache.clone(), domains.clone()).await?;
            plugins.bundled.by_role.insert(plugin.role, plugin);
        }
        plugins.runtime = Some(runtime);
        *plugins.slots.get_mut().unwrap_or_else(|p| p.into_inner()) = plugins.bundled.clone();
        let plugins = Arc::new(plugins);
        plugins.reload().await;
        Ok(plugins)
    }

    /// The plugin serving `role`, if any.
    pub fn active(&self, role: Role) -> Option<Arc<Plugin>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_role
            .get(&role)
            .cloned()
    }

    pub fn enabled(&self) -> bool {
        self.runtime.is_some()
    }

    /// Rescans the directory, loads what changed, and swaps the result in at once.
    pub async fn reload(&self) {
        let Some(runtime) = &self.runtime else { return };
        let mut files = self.files.lock().await;
        let paths = self.dir.as_deref().map(plugin_files).unwrap_or_default();
        files.retain(|path, _| paths.contains(path));
        self.last_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|path, _| paths.contains(path));
        for path in &paths {
            let spec = match read_plugin_file(path) {
                Ok(spec) => spec,
                Err(e) => {
                    self.note_error(
                        path,
                        e.to_string(),
                        files.get(path).and_then(|f| f.plugin.as_ref()),
                    );
                    continue;
                }
            };
            let fingerprint = fingerprint(&spec);
            if files
                .get(path)
                .is_some_and(|f| f.fingerprint == fingerprint)
            {
                continue;
            }
            match runtime
                .load(spec, self.cache.clone(), self.domains.clone())
                .await
            {
                Ok(plugin) => {
                    tracing::info!(
                        "plugin {} loaded from {} as {} (p0rt:policy@{})",
                        plugin.id(),
                        path.display(),
                        plugin.role,
                        plugin.wit_version.as_deref().unwrap_or("?")
                    );
                    self.last_errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(path);
                    files.insert(
                        path.clone(),
                        LoadedFile {
                            fingerprint,
                            plugin: Some(plugin),
                        },
                    );
                }
                Err(e) => {
                    let previous = files.get(path).and_then(|f| f.plugin.clone());
                    self.note_error(path, e.to_string(), previous.as_ref());
                    // Remember the bad content so it is not retried until it changes again.
                    files.insert(
                        path.clone(),
                        LoadedFile {
                            fingerprint,
                            plugin: previous,
                        },
                    );
                }
            }
        }
        let mut next = self.bundled.clone();
        for (path, file) in files.iter() {
            let Some(plugin) = &file.plugin else { continue };
            if let Some(existing) = next.by_role.get(&plugin.role)
                && existing.origin != Origin::Bundled
            {
                tracing::warn!(
                    "{} also implements {}; {} keeps the role (files are taken in name order)",
                    path.display(),
                    plugin.role,
                    existing.origin.describe()
                );
                continue;
            }
            next.by_role.insert(plugin.role, plugin.clone());
        }
        *self.slots.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    fn note_error(&self, path: &Path, error: String, previous: Option<&Arc<Plugin>>) {
        match previous {
            Some(old) => tracing::error!(
                "plugin {} failed to load: {error}; the previous version {} keeps serving",
                path.display(),
                old.id()
            ),
            None => tracing::error!("plugin {} failed to load: {error}", path.display()),
        }
        self.last_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), error);
    }

    /// The state of every plugin: active ones, and directory files that failed to load.
    pub fn status(&self) -> Vec<PluginStatus> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out: Vec<PluginStatus> = slots
            .by_role
            .values()
            .map(|p| PluginStatus {
                name: p.name.to_string(),
                role: Some(p.role),
                sha256: Some(p.sha256.clone()),
                wit_version: p.wit_version.clone(),
                origin: p.origin.describe(),
                active: true,
                error: p.benched(),
            })
            .collect();
        for (path, error) in self
            .last_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            out.push(PluginStatus {
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
            });
        }
        out
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
            if event.is_ok() {
                let _ = tx.send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(
                    "cannot watch plugins directory {}: {e}; hot reload is off",
                    dir.display()
                );
                return;
            }
        };
        if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::error!(
                "cannot watch plugins directory {}: {e}; hot reload is off",
                dir.display()
            );
            return;
        }
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

    /// The name policy's choice for a key (main name, or approval of a sub-name label).
    pub async fn choose_name(&self, input: &NamingInput) -> NameChoice {
        match self.active(Role::Naming) {
            Some(plugin) => {
                let choice = decide_name(&plugin, input, false).await;
                if let NameChoice::Fallback(reason) = &choice {
                    // A benched plugin was reported when it was benched; don't repeat it per call.
                    if plugin.benched().is_some() {
                        tracing::debug!("naming falls back to the built-in namer: {reason}");
                    } else {
                        tracing::warn!("naming falls back to the built-in namer: {reason}");
                    }
                }
                choice
            }
            None => NameChoice::Fallback("no naming plugin".into()),
        }
    }

    /// Whether an HTTP request may enter its tunnel.
    pub async fn check_request(&self, facts: RequestFacts) -> RateDecision {
        if !self.enabled() {
            return RateDecision::Allow;
        }
        // Kept for the fallback; the facts themselves move into the plugin call.
        let client_ip = facts.client_ip.clone();
        if let Some(plugin) = self.active(Role::RateLimit) {
            match decide_rate(&plugin, facts, false).await {
                Ok(decision) => return decision,
                Err(e @ PluginError::Benched(_)) => {
                    tracing::debug!(
                        "rate limiting falls back to the built-in limiter: plugin {}: {e}",
                        plugin.id()
                    )
                }
                Err(e) => tracing::warn!(
                    "rate limiting falls back to the built-in limiter: plugin {}: {e}",
                    plugin.id()
                ),
            }
        }
        self.fallback_rate(&client_ip)
    }

    /// Conservative stand-in: a fixed per-IP budget per minute.
    fn fallback_rate(&self, client_ip: &str) -> RateDecision {
        let now = crate::unix_now();
        let window = now.div_euclid(60);
        let key = format!("ip:{client_ip}:{window}");
        match self
            .fallback_limiter
            .increment(&key, 1, Some(Duration::from_secs(61)))
        {
            Ok(n) if n <= FALLBACK_REQUESTS_PER_IP_PER_MINUTE => RateDecision::Allow,
            _ => RateDecision::Deny {
                status: 429,
                retry_after_seconds: Some(((window + 1) * 60 - now).max(1) as u32),
                message: "too many requests".into(),
            },
        }
    }

    /// Whether a scan job may run. Fails closed.
    pub async fn admit_scan(&self, job: &ScanJob) -> ScanDecision {
        match self.active(Role::ScanAdmission) {
            Some(plugin) => decide_scan(&plugin, job, false).await,
            None => ScanDecision::Reject {
                reason: "no scan admission policy is loaded; scans are denied".into(),
            },
        }
    }
}

impl PolicyPlugins {
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
}

#[async_trait::async_trait]
impl crate::policy::NamingPolicy for PolicyPlugins {
    async fn choose_name(&self, input: &NamingInput) -> NameChoice {
        if !self.enabled() {
            return NameChoice::Fallback("plugins are disabled".into());
        }
        PolicyPlugins::choose_name(self, input).await
    }

    /// A failed plugin allows the label (the built-in rule: any valid, unreserved label
    /// under the key's own name).
    async fn approve_label(&self, input: &NamingInput) -> LabelApproval {
        if !self.enabled() {
            return LabelApproval::Approved;
        }
        match PolicyPlugins::choose_name(self, input).await {
            NameChoice::Refused(reason) => LabelApproval::Refused(reason),
            NameChoice::Name(_) | NameChoice::Fallback(_) => LabelApproval::Approved,
        }
    }
}

#[async_trait::async_trait]
impl crate::policy::RequestPolicy for PolicyPlugins {
    async fn check_request(&self, facts: RequestFacts) -> RateDecision {
        PolicyPlugins::check_request(self, facts).await
    }
}

#[async_trait::async_trait]
impl crate::policy::ScanPolicy for PolicyPlugins {
    async fn admit_scan(&self, job: &ScanJob) -> ScanDecision {
        PolicyPlugins::admit_scan(self, job).await
    }
}
