//! The wasmtime side: one engine for all plugins, compiled components cached on disk by
//! content hash and engine, per-call limits (fuel, epoch deadline, timeout, memory and table
//! caps), a small pool of warm instances per plugin, and benching of plugins that keep failing.
//!
//! One invoke-and-validate path ([`Plugin::decide`]) serves every role. It tells the plugin's
//! own misbehaviour (trap, fuel, its own deadline, bad output), which counts toward benching,
//! from host faults (a store error in a host import, host waits that use up the call's time),
//! which never do.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::time::timeout;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{Engine, Store, UpdateDeadline};

use super::bindings::{host, host_v2, init, init_v2};
use super::host_api::{MAX_MEMORY_BYTES, MAX_TABLE_ELEMENTS, PluginState};
use super::roles::{Naming, RateLimit, RequestPolicy, RoleBinding, ScanAdmission, Versioned};
use super::{PluginError, Role};
use crate::cache::Cache;
use crate::store::DomainStore;

/// Largest plugin file accepted.
pub const MAX_PLUGIN_BYTES: usize = 16 * 1024 * 1024;
/// Fuel (roughly, wasm instructions) one call may burn before it is stopped.
pub const FUEL_PER_CALL: u64 = 20_000_000;
/// Period of the epoch clock behind the plugin's deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// How long the epoch clock keeps ticking after the last plugin call ended (see [`epoch`]).
pub const EPOCH_LINGER: Duration = Duration::from_millis(250);
/// The plugin's own running time per call (wall time minus host operations): a backstop
/// for fuel. Time spent waiting in host imports does not count.
pub const PLUGIN_DEADLINE: Duration = Duration::from_millis(100);
/// Longest the host waits for one call, host operations included. When it runs out while
/// the plugin's own time is under [`PLUGIN_DEADLINE`], the host was slow: a host fault.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// The plugin's own running time for the instantiation and `init` that load it (at start-up
/// and on hot reload), in place of [`PLUGIN_DEADLINE`]. Loading is on no request's path, and
/// the deadline is wall time: on a starved machine (seen at load average 14) a good plugin
/// passed 100 ms and the host refused it. Fuel still bounds the plugin's work.
pub const PLUGIN_LOAD_DEADLINE: Duration = Duration::from_secs(1);
/// Longest the host waits for the instantiation or `init` that loads a plugin, host
/// operations included (in place of [`CALL_TIMEOUT`]).
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Wasm stack a plugin may use; deeper recursion traps.
pub const MAX_WASM_STACK: usize = 512 * 1024;
/// Warm instances kept per plugin for reuse.
pub const WARM_INSTANCES_PER_PLUGIN: usize = 8;
/// Calls after which a warm instance is retired (bounds slow leaks inside a plugin).
pub const CALLS_PER_WARM_INSTANCE: u32 = 10_000;
/// Component instances the pooling allocator reserves room for.
pub const POOLED_COMPONENT_INSTANCES: u32 = 256;
/// Memory of a pooled instance slot kept resident between uses.
pub const KEEP_RESIDENT_BYTES: usize = 1024 * 1024;
/// Consecutive failures after which a plugin is benched.
pub const BENCH_AFTER_FAILURES: u32 = 3;
/// First bench period; doubles each time the plugin is benched again, up to [`BENCH_MAX`].
pub const BENCH_BASE: Duration = Duration::from_secs(1);
pub const BENCH_MAX: Duration = Duration::from_secs(300);

fn engine_config(pooling: bool) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(true);
    config.epoch_interruption(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    if pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(POOLED_COMPONENT_INSTANCES)
            .total_core_instances(POOLED_COMPONENT_INSTANCES * 4)
            .total_memories(POOLED_COMPONENT_INSTANCES * 2)
            .total_tables(POOLED_COMPONENT_INSTANCES * 4)
            .total_stacks(POOLED_COMPONENT_INSTANCES)
            .max_memory_size(MAX_MEMORY_BYTES)
            .table_elements(MAX_TABLE_ELEMENTS)
            // Reset small plugin memories with memset instead of madvise, so a fresh
            // instance does not page-fault its way back in.
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_BYTES / 16);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// The epoch clock behind every engine's plugin deadlines. One thread advances the epoch of
/// each live engine every [`EPOCH_TICK`] while a plugin call runs, and for [`EPOCH_LINGER`]
/// after the last one ended (a busy host keeps it running, and a call does no system call
/// to wake it); then it parks, so an idle host has no wake-ups for it. A call that starts
/// while it is parked wakes it before the plugin runs ([`running`]), so every call's
/// deadline is enforced as before: it is counted in ticks from the call's start.
pub(super) mod epoch {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::{Mutex, OnceLock};
    use std::thread::Thread;

    use wasmtime::{Engine, EngineWeak};

    use super::{EPOCH_LINGER, EPOCH_TICK};

    struct Clock {
        engines: Mutex<Vec<EngineWeak>>,
        /// Plugin calls under way.
        running: AtomicUsize,
        /// Set by the ticker just before it parks.
        parked: AtomicBool,
        thread: OnceLock<Thread>,
    }

    static CLOCK: Clock = Clock {
        engines: Mutex::new(Vec::new()),
        running: AtomicUsize::new(0),
        parked: AtomicBool::new(false),
        thread: OnceLock::new(),
    };

    /// Ticks `engine`'s epoch from now on (while calls run); starts the ticker thread once.
    pub fn register(engine: &Engine) -> std::io::Result<()> {
        CLOCK
            .engines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(engine.weak());
        if CLOCK.thread.get().is_none() {
            static START: Mutex<()> = Mutex::new(());
            let _once = START.lock().unwrap_or_else(|p| p.into_inner());
            if CLOCK.thread.get().is_none() {
                let handle = std::thread::Builder::new()
                    .name("p0rt-plugin-epoch".into())
                    .spawn(tick)?;
                let _ = CLOCK.thread.set(handle.thread().clone());
            }
        }
        Ok(())
    }

    /// Held while a plugin call runs: the epoch advances until every one is dropped.
    #[derive(Debug)]
    pub struct Running(());

    /// Marks a plugin call as running, waking the ticker if it parked.
    pub fn running() -> Running {
        CLOCK.running.fetch_add(1, SeqCst);
        // Paired with the ticker's store of `parked` then load of `running` (all SeqCst):
        // either it sees this call and stays awake, or this sees it parked and wakes it.
        if CLOCK.parked.load(SeqCst)
            && let Some(thread) = CLOCK.thread.get()
        {
            thread.unpark();
        }
        Running(())
    }

    impl Drop for Running {
        fn drop(&mut self) {
            CLOCK.running.fetch_sub(1, SeqCst);
        }
    }

    /// Plugin calls under way (tests).
    #[cfg(test)]
    pub fn calls_running() -> usize {
        CLOCK.running.load(SeqCst)
    }

    fn tick() {
        let linger = (EPOCH_LINGER.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u32;
        let mut quiet = 0u32;
        loop {
            if CLOCK.running.load(SeqCst) == 0 {
                quiet += 1;
            } else {
                quiet = 0;
            }
            if quiet > linger {
                CLOCK.parked.store(true, SeqCst);
                if CLOCK.running.load(SeqCst) == 0 {
                    std::thread::park();
                }
                CLOCK.parked.store(false, SeqCst);
                quiet = 0;
            }
            CLOCK
                .engines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|weak| match weak.upgrade() {
                    Some(engine) => {
                        engine.increment_epoch();
                        true
                    }
                    None => false,
                });
            std::thread::sleep(EPOCH_TICK);
        }
    }
}

/// One engine and linker shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache_dir: Option<PathBuf>,
}

fn wasm_error(e: wasmtime::Error) -> String {
    format!("{e:#}")
}

impl Runtime {
    /// Builds the engine (pooling allocator, or on-demand allocation when the address space
    /// cannot be reserved) and starts its epoch clock. Compiled plugins are cached in
    /// `cache_dir` when given.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Arc<Runtime>, PluginError> {
        let engine = match Engine::new(&engine_config(true)) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::warn!(
                    "pooling allocator unavailable ({e:#}); plugins use on-demand allocation"
                );
                Engine::new(&engine_config(false))
                    .map_err(|e| PluginError::Engine(wasm_error(e)))?
            }
        };
        let mut linker: Linker<PluginState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(wasm_error(e)))?;
        host::Host_::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(wasm_error(e)))?;
        host_v2::Host_::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(wasm_error(e)))?;
        epoch::register(&engine).map_err(|e| PluginError::Engine(e.to_string()))?;
        if let Some(dir) = &cache_dir
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!("plugin compile cache {} unusable: {e}", dir.display());
        }
        Ok(Arc::new(Runtime {
            engine,
            linker,
            cache_dir,
        }))
    }

    fn engine_hash(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        hasher.finish()
    }

    /// Compiles a component, or loads it from the compile cache.
    fn compile(&self, bytes: &[u8], sha256: &str) -> Result<Component, PluginError> {
        let cached = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{sha256}-{:016x}.cwasm", self.engine_hash())));
        if let Some(path) = &cached
            && path.exists()
        {
            // SAFETY: the cache directory is written only by this host, from components it
            // compiled itself with an engine of the same compatibility hash (in the name).
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!(
                    "ignoring unusable compile cache entry {}: {e:#}",
                    path.display()
                ),
            }
        }
        let component =
            Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile(wasm_error(e)))?;
        if let Some(path) = cached
            && let Ok(serialized) = component.serialize()
        {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, serialized)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .is_err()
            {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Ok(component)
    }

    /// Validates and prepares a plugin: size cap, compile (off the async runtime), link
    /// against what the host provides, role from the world it implements (or `spec.role`),
    /// then one test instantiation (which runs `init`), so a plugin that cannot serve is
    /// refused at load.
    pub async fn load(
        self: &Arc<Self>,
        spec: PluginSpec,
        cache: Cache,
        domains: Option<Arc<dyn DomainStore>>,
    ) -> Result<AnyPlugin, PluginError> {
        if spec.bytes.len() > MAX_PLUGIN_BYTES {
            return Err(PluginError::TooLarge {
                size: spec.bytes.len(),
            });
        }
        let sha256 = hex::encode(Sha256::digest(spec.bytes.as_slice()));
        let component = {
            let runtime = self.clone();
            let (bytes, sha) = (spec.bytes.clone(), sha256.clone());
            tokio::task::spawn_blocking(move || runtime.compile(&bytes, &sha))
                .await
                .map_err(|e| PluginError::Compile(e.to_string()))??
        };
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Link(wasm_error(e)))?;

        let found: Vec<Role> = [
            (Role::Naming, Naming::indices(&pre).is_ok()),
            (Role::RateLimit, RateLimit::indices(&pre).is_ok()),
            (Role::RequestPolicy, RequestPolicy::indices(&pre).is_ok()),
            (Role::ScanAdmission, ScanAdmission::indices(&pre).is_ok()),
        ]
        .into_iter()
        .filter_map(|(role, ok)| ok.then_some(role))
        .collect();
        let role = match (spec.role, found.as_slice()) {
            (Some(role), found) if found.contains(&role) => role,
            (None, [role]) => *role,
            (None, []) | (Some(_), _) => {
                return Err(PluginError::WrongWorld {
                    expected: spec.role,
                    exports,
                });
            }
            (None, _) => return Err(PluginError::Ambiguous { roles: found }),
        };
        let init = if exports
            .iter()
            .any(|e| e.starts_with("p0rt:policy/init@0.2."))
        {
            let indices = init_v2::InitIndices::new(&pre);
            Some(Versioned::V2(
                indices.map_err(|e| PluginError::Link(wasm_error(e)))?,
            ))
        } else if exports.iter().any(|e| e.starts_with("p0rt:policy/init@")) {
            let indices = init::InitIndices::new(&pre);
            Some(Versioned::V1(
                indices.map_err(|e| PluginError::Link(wasm_error(e)))?,
            ))
        } else {
            None
        };
        let interface = format!("p0rt:policy/{}@", role.interface());
        let label = crate::metrics::plugin_label(&spec.name);
        let info = PluginInfo {
            loaded_at: crate::unix_now(),
            counts: Arc::default(),
            decisions: crate::metrics::DecisionCounters::new(role.interface(), label.clone()),
            label,
            name: spec.name.into(),
            sha256,
            role,
            wit_version: exports
                .iter()
                .find_map(|e| e.strip_prefix(&interface).map(str::to_string)),
            imports,
            origin: spec.origin,
        };
        let parts = Parts {
            info,
            config: spec.config,
            pre,
            init,
            cache,
            domains,
        };
        Ok(match role {
            Role::Naming => AnyPlugin::Naming(parts.prepare().await?),
            Role::RateLimit => AnyPlugin::RateLimit(parts.prepare().await?),
            Role::RequestPolicy => AnyPlugin::RequestPolicy(parts.prepare().await?),
            Role::ScanAdmission => AnyPlugin::ScanAdmission(parts.prepare().await?),
        })
    }
}

/// A linked component whose role is known, before it is typed by that role.
struct Parts {
    info: PluginInfo,
    config: String,
    pre: InstancePre<PluginState>,
    init: Option<InitIndices>,
    cache: Cache,
    domains: Option<Arc<dyn DomainStore>>,
}

/// The optional `init` export, of either version.
type InitIndices = Versioned<init::InitIndices, init_v2::InitIndices>;

impl Parts {
    async fn prepare<B: RoleBinding>(self) -> Result<Arc<Plugin<B>>, PluginError> {
        let indices = B::indices(&self.pre).map_err(|e| PluginError::Link(wasm_error(e)))?;
        let plugin = Arc::new(Plugin {
            info: self.info,
            config: self.config,
            pre: self.pre,
            indices,
            init: self.init,
            cache: self.cache,
            domains: self.domains,
            warm: Mutex::new(Vec::new()),
            health: Mutex::new(Health::default()),
            memo: std::sync::OnceLock::new(),
            leases: super::leases::Leases::default(),
        });
        let warm = plugin.instantiate(CallLimits::LOAD).await?;
        plugin.return_warm(warm);
        Ok(plugin)
    }
}

/// What to load: the bytes and where they came from.
pub struct PluginSpec {
    pub name: String,
    pub bytes: Arc<Vec<u8>>,
    pub origin: Origin,
    /// Role asked for by the sidecar; `None`: from the world the plugin implements.
    pub role: Option<Role>,
    /// JSON handed to `init`.
    pub config: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Built into the binary.
    Bundled,
    /// A file in the plugins directory.
    File(PathBuf),
}

impl Origin {
    pub fn describe(&self) -> String {
        match self {
            Origin::Bundled => "bundled".into(),
            Origin::File(path) => path.display().to_string(),
        }
    }
}

/// Answers and failures of one loaded plugin since it loaded (for `GET plugins`).
#[derive(Debug, Default)]
pub struct PluginCounts {
    /// Answers it gave that the host used (rate-limit answers reused from a lease included).
    pub decisions: std::sync::atomic::AtomicU64,
    /// Calls it failed (host faults included, as in the metrics).
    pub failures: std::sync::atomic::AtomicU64,
}

/// What identifies a loaded plugin, whatever its role.
pub struct PluginInfo {
    /// When it loaded, Unix seconds.
    pub loaded_at: i64,
    pub counts: Arc<PluginCounts>,
    pub name: Arc<str>,
    /// The name as a metrics label value (bounded, see [`crate::metrics::plugin_label`]).
    pub label: Arc<str>,
    /// Its answers in the metrics, by verdict.
    pub decisions: crate::metrics::DecisionCounters,
    pub sha256: String,
    pub role: Role,
    /// Version of `p0rt:policy` the plugin was built against, from its export name.
    pub wit_version: Option<String>,
    pub imports: Vec<String>,
    pub origin: Origin,
}

impl PluginInfo {
    /// Short id for logs: name and the first 12 hex digits of the sha256.
    pub fn id(&self) -> String {
        format!("{} ({})", self.name, &self.sha256[..12])
    }
}

/// A loaded plugin of any role (what a file in the plugins directory turns out to be).
#[derive(Clone)]
pub enum AnyPlugin {
    Naming(Arc<Plugin<Naming>>),
    RateLimit(Arc<Plugin<RateLimit>>),
    RequestPolicy(Arc<Plugin<RequestPolicy>>),
    ScanAdmission(Arc<Plugin<ScanAdmission>>),
}

impl AnyPlugin {
    pub fn info(&self) -> &PluginInfo {
        match self {
            AnyPlugin::Naming(p) => &p.info,
            AnyPlugin::RateLimit(p) => &p.info,
            AnyPlugin::RequestPolicy(p) => &p.info,
            AnyPlugin::ScanAdmission(p) => &p.info,
        }
    }
}

struct Warm<B: RoleBinding> {
    store: Store<PluginState>,
    exports: B::Exports,
    calls: u32,
}

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    times_benched: u32,
    benched_until: Option<Instant>,
    last_error: Option<String>,
    /// A host fault was reported since the last good call (reported once per episode).
    host_faulted: bool,
}

/// A loaded plugin of role `B`, ready to be called.
pub struct Plugin<B: RoleBinding> {
    pub info: PluginInfo,
    config: String,
    pre: InstancePre<PluginState>,
    indices: B::Indices,
    init: Option<InitIndices>,
    cache: Cache,
    domains: Option<Arc<dyn DomainStore>>,
    warm: Mutex<Vec<Warm<B>>>,
    health: Mutex<Health>,
    /// A role's answer that holds for the plugin's lifetime, once known (request policy:
    /// whether tunnels without options need `check`).
    pub(super) memo: std::sync::OnceLock<bool>,
    /// Rate-limit answers reused without a call (rate-limit role only).
    pub(super) leases: super::leases::Leases,
}

/// A boxed future borrowing the instance and store for one call.
pub type CallFuture<'a, R> = Pin<Box<dyn Future<Output = wasmtime::Result<R>> + Send + 'a>>;

fn describe_trap(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        let what = match trap {
            wasmtime::Trap::OutOfFuel => "ran out of fuel (too much work for one decision)",
            wasmtime::Trap::Interrupt => "passed its deadline",
            wasmtime::Trap::StackOverflow => "overflowed its stack",
            wasmtime::Trap::UnreachableCodeReached => "trapped (panic or abort)",
            wasmtime::Trap::MemoryOutOfBounds => "accessed memory out of bounds",
            _ => "trapped",
        };
        return format!("{what}: {trap}");
    }
    let text = format!("{e:#}");
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(500)
        .collect()
}

/// Epoch ticks covering `left` (at least one).
fn ticks(left: Duration) -> u64 {
    (left.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64
}

/// A store for one instance: the plugin's resource limits, and its deadline counted in the
/// plugin's own time against the limits [`arm`] sets for each call.
fn new_store(engine: &Engine, state: PluginState) -> Store<PluginState> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    // At the deadline, extend it by what the plugin has left of its own time: waits in
    // host imports are the host's, not the plugin's.
    store.epoch_deadline_callback(|ctx| {
        let clock = &ctx.data().clock;
        Ok(match clock.deadline().checked_sub(clock.own_time()) {
            Some(left) if !left.is_zero() => UpdateDeadline::Continue(ticks(left)),
            _ => UpdateDeadline::Interrupt,
        })
    });
    store
}

/// The time limits of one call: the plugin's own time and the host's whole wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// The plugin's own running time (wall time minus host operations).
    pub deadline: Duration,
    /// The whole call, host operations included.
    pub timeout: Duration,
}

impl CallLimits {
    /// A decision on a request's or a connection's path, and any later instantiation.
    pub const CALL: CallLimits = CallLimits {
        deadline: PLUGIN_DEADLINE,
        timeout: CALL_TIMEOUT,
    };
    /// The instantiation and `init` that load a plugin.
    pub const LOAD: CallLimits = CallLimits {
        deadline: PLUGIN_LOAD_DEADLINE,
        timeout: LOAD_TIMEOUT,
    };
}

/// Arms the store for one call: fresh fuel, deadline and clock.
fn arm(store: &mut Store<PluginState>, limits: CallLimits) -> Result<(), PluginError> {
    store.data_mut().clock.start(limits.deadline);
    store
        .set_fuel(FUEL_PER_CALL)
        .map_err(|e| PluginError::Instantiate(wasm_error(e)))?;
    store.set_epoch_deadline(ticks(limits.deadline));
    Ok(())
}

/// The outcome of one armed call, bounded by its [`CallLimits::timeout`].
type Outcome<R> = Result<wasmtime::Result<R>, tokio::time::error::Elapsed>;

/// Says whose fault a failed call is. `plugin_error` describes a failure of the plugin's own.
fn settle<R>(
    outcome: Outcome<R>,
    store: &mut Store<PluginState>,
    limits: CallLimits,
    plugin_error: fn(String) -> PluginError,
) -> Result<R, PluginError> {
    let clock = &mut store.data_mut().clock;
    clock.running = None;
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) if clock.fault.is_some() => Err(PluginError::HostFault(
            clock.fault.take().unwrap_or_default(),
        )),
        Ok(Err(e)) => Err(plugin_error(describe_trap(&e))),
        Err(_) if clock.own_time() < limits.deadline => Err(PluginError::HostFault(format!(
            "host operations took {} ms of the call's {} ms",
            clock.host_time().as_millis(),
            limits.timeout.as_millis()
        ))),
        Err(_) => Err(PluginError::Timeout(limits.timeout)),
    }
}

impl<B: RoleBinding> Plugin<B> {
    pub fn id(&self) -> String {
        self.info.id()
    }

    /// Why the plugin is benched, if it is.
    pub fn benched(&self) -> Option<String> {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match health.benched_until {
            Some(until) if until > Instant::now() => Some(format!(
                "benched for {}s after repeated failures (last: {})",
                until.saturating_duration_since(Instant::now()).as_secs() + 1,
                health.last_error.as_deref().unwrap_or("unknown")
            )),
            _ => None,
        }
    }

    fn record_success(&self) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.consecutive_failures = 0;
        health.times_benched = 0;
        health.host_faulted = false;
    }

    /// Counts a failure toward benching, unless the host caused it.
    fn record_failure(&self, error: &PluginError) {
        self.info
            .counts
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::plugin_failure(self.info.role.interface(), &self.info.label, error.word());
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if let PluginError::HostFault(_) = error {
            if !std::mem::replace(&mut health.host_faulted, true) {
                tracing::warn!(
                    "plugin {}: {error}; its fallback answers until the host recovers",
                    self.id()
                );
            }
            return;
        }
        health.consecutive_failures += 1;
        health.last_error = Some(error.to_string());
        if health.consecutive_failures >= BENCH_AFTER_FAILURES {
            let factor = 1u32 << health.times_benched.min(16);
            let period = (BENCH_BASE * factor).min(BENCH_MAX);
            health.benched_until = Some(Instant::now() + period);
            health.times_benched += 1;
            health.consecutive_failures = 0;
            tracing::error!(
                "plugin {} benched for {}s after {BENCH_AFTER_FAILURES} failures in a row (last: {error})",
                self.id(),
                period.as_secs()
            );
        } else {
            tracing::warn!("plugin {} failed: {error}", self.id());
        }
    }

    /// A new instance, `init` called, under `limits` ([`CallLimits::LOAD`] for the one that
    /// loads the plugin).
    async fn instantiate(&self, limits: CallLimits) -> Result<Warm<B>, PluginError> {
        let state = PluginState::new(
            self.info.name.clone(),
            self.cache.clone(),
            self.domains.clone(),
        );
        let mut store = new_store(self.pre.engine(), state);
        arm(&mut store, limits)?;
        let outcome = timeout(limits.timeout, self.pre.instantiate_async(&mut store)).await;
        let instance = settle(outcome, &mut store, limits, PluginError::Instantiate)?;
        let exports = B::load(&self.indices, &mut store, &instance)
            .map_err(|e| PluginError::Instantiate(wasm_error(e)))?;
        if let Some(init) = &self.init {
            // The same call through either version's bindings (their types differ).
            macro_rules! call_init {
                ($indices:expr) => {{
                    let init = $indices
                        .load(&mut store, &instance)
                        .map_err(|e| PluginError::Instantiate(wasm_error(e)))?;
                    arm(&mut store, limits)?;
                    let call = init.p0rt_policy_init().call_init(&mut store, &self.config);
                    timeout(limits.timeout, call).await
                }};
            }
            let outcome = match init {
                Versioned::V1(indices) => call_init!(indices),
                Versioned::V2(indices) => call_init!(indices),
            };
            let result = settle(outcome, &mut store, limits, PluginError::Trap)?;
            result.map_err(PluginError::InitRefused)?;
        }
        Ok(Warm {
            store,
            exports,
            calls: 0,
        })
    }

    fn take_warm(&self) -> Option<Warm<B>> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn return_warm(&self, warm: Warm<B>) {
        if warm.calls >= CALLS_PER_WARM_INSTANCE {
            return;
        }
        let mut pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < WARM_INSTANCES_PER_PLUGIN {
            pool.push(warm);
        }
    }

    /// Asks the plugin one question under the per-call limits and validates its answer.
    /// `validate` turns the answer into the host's decision or says why it is invalid (the
    /// plugin's bad output). Every failure of the plugin's own counts toward benching; host
    /// faults do not. `fresh` forces a new instance (and does not keep it), which is what
    /// the benchmark compares against warm reuse.
    pub async fn decide<D>(
        &self,
        request: B::Request,
        fresh: bool,
        validate: impl FnOnce(B::Answer) -> Result<D, String>,
    ) -> Result<D, PluginError> {
        if let Some(reason) = self.benched() {
            return Err(PluginError::Benched(reason));
        }
        let outcome = self
            .call(&request, fresh)
            .await
            .and_then(|answer| validate(answer).map_err(PluginError::BadOutput));
        match &outcome {
            Ok(_) => self.record_success(),
            Err(e) => self.record_failure(e),
        }
        outcome
    }

    async fn call(&self, request: &B::Request, fresh: bool) -> Result<B::Answer, PluginError> {
        let warm = if fresh { None } else { self.take_warm() };
        let mut warm = match warm {
            Some(warm) => warm,
            None => self.instantiate(CallLimits::CALL).await?,
        };
        let limits = CallLimits::CALL;
        arm(&mut warm.store, limits)?;
        let outcome = timeout(
            limits.timeout,
            B::call(&warm.exports, &mut warm.store, request),
        )
        .await;
        // A failed instance is never reused.
        let answer = settle(outcome, &mut warm.store, limits, PluginError::Trap)?;
        warm.calls += 1;
        if !fresh {
            self.return_warm(warm);
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deadline a store enforces is the one its call was armed with: a plugin that
    /// keeps running is stopped once it has used its own time under [`CallLimits::CALL`],
    /// and runs on for the longer [`CallLimits::LOAD`] (what loading a plugin gets, so a
    /// starved machine does not refuse a good plugin). Fuel is lifted so only time stops it.
    #[test]
    fn a_call_runs_until_the_deadline_it_was_armed_with() {
        let engine = Engine::new(&engine_config(false)).unwrap();
        epoch::register(&engine).unwrap();
        let module = wasmtime::Module::new(
            &engine,
            r#"(module (func (export "spin") (loop $l (br $l))))"#,
        )
        .unwrap();
        let run = |limits: CallLimits| {
            let state = PluginState::new("spin".into(), crate::cache::Cache::in_memory(), None);
            let mut store = new_store(&engine, state);
            arm(&mut store, limits).unwrap();
            store.set_fuel(u64::MAX).unwrap();
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            let spin = instance
                .get_typed_func::<(), ()>(&mut store, "spin")
                .unwrap();
            let started = Instant::now();
            let trap = spin.call(&mut store, ()).unwrap_err();
            assert_eq!(
                trap.downcast_ref::<wasmtime::Trap>(),
                Some(&wasmtime::Trap::Interrupt),
                "{trap:#}"
            );
            started.elapsed()
        };
        let call = run(CallLimits::CALL);
        assert!(
            call >= PLUGIN_DEADLINE - EPOCH_TICK,
            "stopped after {call:?}"
        );
        let load = run(CallLimits::LOAD);
        assert!(
            load >= PLUGIN_LOAD_DEADLINE - EPOCH_TICK,
            "a loading call stopped after {load:?}, before its own deadline"
        );
    }

    /// After the epoch clock parked (no call for longer than [`EPOCH_LINGER`]), a call that
    /// starts wakes it: a plugin stuck in a loop still meets its epoch deadline.
    #[test]
    fn a_call_after_the_clock_parked_still_meets_its_deadline() {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).unwrap();
        epoch::register(&engine).unwrap();
        let module = wasmtime::Module::new(
            &engine,
            r#"(module (func (export "spin") (loop $l (br $l))))"#,
        )
        .unwrap();
        // Long enough for the clock to park when no other test runs a call.
        std::thread::sleep(EPOCH_LINGER * 2);
        let mut store = Store::new(&engine, ());
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let spin = instance
            .get_typed_func::<(), ()>(&mut store, "spin")
            .unwrap();
        let running = epoch::running();
        assert!(epoch::calls_running() >= 1);
        store.set_epoch_deadline(2);
        let trap = spin.call(&mut store, ()).unwrap_err();
        drop(running);
        assert_eq!(
            trap.downcast_ref::<wasmtime::Trap>(),
            Some(&wasmtime::Trap::Interrupt),
            "{trap:#}"
        );
    }
}
