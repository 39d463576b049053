//! What a plugin can reach: its own cache namespace, read-only domain lookups, a log and a
//! clock. WASI is linked with a context that grants nothing (no files, sockets, environment,
//! arguments); stdout and stderr become host log lines tagged with the plugin's name.
//!
//! Host operations that may wait (the cache, the domain store) are timed on the call's
//! [`CallClock`], and a store failure is recorded as a host fault there, so the invoke path
//! can tell the host's trouble from the plugin's own misbehaviour.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::host::p0rt::policy::{cache, clock, domains, log};
use crate::cache::Cache;
use crate::store::DomainStore;

/// Longest cache key a plugin may use (before the host's namespace prefix).
pub const MAX_CACHE_KEY_BYTES: usize = 512;
/// Largest cache value a plugin may store.
pub const MAX_CACHE_VALUE_BYTES: usize = 1024 * 1024;
/// Longest log line kept from a plugin; the rest is cut.
pub const MAX_LOG_LINE_BYTES: usize = 2048;
/// Linear memory one plugin instance may grow to.
pub const MAX_MEMORY_BYTES: usize = 64 * 1024 * 1024;
/// Table elements one plugin instance may have.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Core instances, memories and tables per plugin instance (a component holds several).
pub const MAX_INSTANCES: usize = 32;
pub const MAX_MEMORIES: usize = 8;
pub const MAX_TABLES: usize = 16;

/// Where the time of one call goes, and whether the host failed it.
#[derive(Debug, Default)]
pub struct CallClock {
    started: Option<Instant>,
    /// The plugin's own time allowed for this call.
    deadline: Duration,
    /// Time spent in finished host operations.
    in_host: Duration,
    /// Start of the host operation under way, if any.
    host_since: Option<Instant>,
    /// Set when a host operation failed for reasons of the host's own (store, Redis).
    pub fault: Option<String>,
    /// Keeps the epoch clock ticking from the call's start until it is settled (or its
    /// store dropped).
    pub(super) running: Option<super::runtime::epoch::Running>,
}

impl CallClock {
    /// Starts timing a new call (instantiation, `init` or a decision) that may run for
    /// `deadline` of its own time.
    pub fn start(&mut self, deadline: Duration) {
        *self = CallClock {
            started: Some(Instant::now()),
            deadline,
            running: Some(super::runtime::epoch::running()),
            ..CallClock::default()
        };
    }

    /// The plugin's own time allowed for the call under way.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Time spent in host operations so far, including one under way.
    pub fn host_time(&self) -> Duration {
        self.in_host + self.host_since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// The plugin's own share of the call so far: wall time minus host operations.
    pub fn own_time(&self) -> Duration {
        self.started
            .map_or(Duration::ZERO, |s| s.elapsed())
            .saturating_sub(self.host_time())
    }

    /// Records a host fault; the returned error ends the call (it is not the plugin's).
    fn fault(&mut self, what: String) -> wasmtime::Error {
        let error = wasmtime::Error::msg(what.clone());
        self.fault = Some(what);
        error
    }
}

/// Runs a host operation with its time kept off the plugin's clock.
async fn timed<T>(clock: &mut CallClock, op: impl Future<Output = T>) -> T {
    let since = Instant::now();
    clock.host_since = Some(since);
    let out = op.await;
    clock.host_since = None;
    clock.in_host += since.elapsed();
    out
}

/// Per-store state: everything a plugin's imports can touch.
pub struct PluginState {
    plugin: Arc<str>,
    /// `plugin:<name>:`, prepended to every cache key.
    namespace: String,
    cache: Cache,
    domains: Option<Arc<dyn DomainStore>>,
    pub(super) limits: StoreLimits,
    pub(super) clock: CallClock,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl PluginState {
    pub fn new(plugin: Arc<str>, cache: Cache, domains: Option<Arc<dyn DomainStore>>) -> Self {
        let wasi = WasiCtxBuilder::new()
            .stdout(PluginOutput {
                plugin: plugin.clone(),
                stream: "stdout",
            })
            .stderr(PluginOutput {
                plugin: plugin.clone(),
                stream: "stderr",
            })
            .build();
        PluginState {
            namespace: format!("plugin:{plugin}:"),
            plugin,
            cache,
            domains,
            limits: StoreLimitsBuilder::new()
                .memory_size(MAX_MEMORY_BYTES)
                .table_elements(MAX_TABLE_ELEMENTS)
                .instances(MAX_INSTANCES)
                .memories(MAX_MEMORIES)
                .tables(MAX_TABLES)
                .build(),
            clock: CallClock::default(),
            wasi,
            table: ResourceTable::new(),
        }
    }

    fn key(&self, key: &str) -> wasmtime::Result<String> {
        if key.len() > MAX_CACHE_KEY_BYTES {
            wasmtime::bail!(
                "cache key of {} bytes is over the {MAX_CACHE_KEY_BYTES}-byte limit",
                key.len()
            );
        }
        Ok(format!("{}{key}", self.namespace))
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn ttl(seconds: Option<u32>) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs(u64::from(s)))
}

impl cache::Host for PluginState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let key = self.key(&key)?;
        let value = timed(&mut self.clock, self.cache.get(&key)).await;
        Ok(value.map(|b| b.to_vec()))
    }

    async fn get_string(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        let key = self.key(&key)?;
        let value = timed(&mut self.clock, self.cache.get(&key)).await;
        Ok(value.and_then(|b| String::from_utf8(b.to_vec()).ok()))
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_seconds: Option<u32>,
    ) -> wasmtime::Result<()> {
        if value.len() > MAX_CACHE_VALUE_BYTES {
            wasmtime::bail!(
                "cache value of {} bytes is over the {MAX_CACHE_VALUE_BYTES}-byte limit",
                value.len()
            );
        }
        let key = self.key(&key)?;
        let op = self.cache.set(&key, Bytes::from(value), ttl(ttl_seconds));
        timed(&mut self.clock, op).await;
        Ok(())
    }

    async fn set_string(
        &mut self,
        key: String,
        value: String,
        ttl_seconds: Option<u32>,
    ) -> wasmtime::Result<()> {
        self.set(key, value.into_bytes(), ttl_seconds).await
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<bool> {
        let key = self.key(&key)?;
        Ok(timed(&mut self.clock, self.cache.delete(&key)).await)
    }

    async fn exists(&mut self, key: String) -> wasmtime::Result<bool> {
        let key = self.key(&key)?;
        Ok(timed(&mut self.clock, self.cache.exists(&key)).await)
    }

    async fn increment(
        &mut self,
        key: String,
        amount: i64,
        ttl_seconds: Option<u32>,
    ) -> wasmtime::Result<i64> {
        let key = self.key(&key)?;
        let op = self.cache.increment(&key, amount, ttl(ttl_seconds));
        // A counter that is not an integer (or overflows) is the plugin's own data.
        Ok(timed(&mut self.clock, op).await?)
    }

    async fn expire(&mut self, key: String, ttl_seconds: u32) -> wasmtime::Result<bool> {
        let key = self.key(&key)?;
        let op = self
            .cache
            .expire(&key, Duration::from_secs(u64::from(ttl_seconds)));
        Ok(timed(&mut self.clock, op).await)
    }
}

impl domains::Host for PluginState {
    async fn owner_of(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        let Some(store) = &self.domains else {
            return Ok(None);
        };
        timed(&mut self.clock, store.owner_of(&name))
            .await
            .map_err(|e| self.clock.fault(format!("domain store: {e}")))
    }

    async fn record_for_key(
        &mut self,
        ssh_key_hash: String,
    ) -> wasmtime::Result<Option<domains::DomainRecord>> {
        let Some(store) = &self.domains else {
            return Ok(None);
        };
        let record = timed(&mut self.clock, store.record_for_key(&ssh_key_hash))
            .await
            .map_err(|e| self.clock.fault(format!("domain store: {e}")))?;
        Ok(record.map(|r| domains::DomainRecord {
            domain: r.domain,
            ssh_key_hash: r.ssh_key_hash,
            first_seen: r.first_seen,
            last_seen: r.last_seen,
            use_count: r.use_count,
        }))
    }

    async fn is_reserved(&mut self, name: String) -> wasmtime::Result<bool> {
        Ok(crate::names::is_reserved(&name))
    }
}

/// Control characters from a plugin never reach the log verbatim.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

fn clip(message: &str) -> &str {
    if message.len() <= MAX_LOG_LINE_BYTES {
        return message;
    }
    let mut end = MAX_LOG_LINE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

impl log::Host for PluginState {
    async fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let plugin = &*self.plugin;
        let message = printable(clip(&message));
        match level {
            log::Level::Debug => tracing::debug!(plugin, "{message}"),
            log::Level::Info => tracing::info!(plugin, "{message}"),
            log::Level::Warn => tracing::warn!(plugin, "{message}"),
            log::Level::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }
}

impl clock::Host for PluginState {
    async fn now_unix_seconds(&mut self) -> wasmtime::Result<i64> {
        Ok(crate::unix_now())
    }

    async fn now_unix_millis(&mut self) -> wasmtime::Result<u64> {
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0))
    }
}

/// A plugin's stdout or stderr: each complete line becomes a host log line.
#[derive(Clone)]
struct PluginOutput {
    plugin: Arc<str>,
    stream: &'static str,
}

impl wasmtime_wasi::cli::IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for PluginOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            plugin: self.plugin.clone(),
            stream: self.stream,
            pending: Vec::new(),
        })
    }
}

struct LineLogger {
    plugin: Arc<str>,
    stream: &'static str,
    pending: Vec<u8>,
}

impl LineLogger {
    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        tracing::info!(
            plugin = &*self.plugin,
            "{}: {}",
            self.stream,
            printable(clip(text.trim_end()))
        );
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        this.pending.extend_from_slice(buf);
        while let Some(end) = this.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = this.pending.drain(..=end).collect();
            this.emit(&line);
        }
        if this.pending.len() > MAX_LOG_LINE_BYTES {
            let line = std::mem::take(&mut this.pending);
            this.emit(&line);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Most operations in one `cache.increment-many` call (0.2).
pub const MAX_BATCH_OPS: usize = 16;
/// Most names `domains.names-of-key` returns (0.2).
pub const MAX_NAMES_OF_KEY: usize = 64;

/// The 0.2 imports: the 0.1 ones (same behaviour, converted types) plus the batch and the
/// names-of-key lookup.
mod v2 {
    use super::super::bindings::host::p0rt::policy as v1;
    use super::super::bindings::host_v2::p0rt::policy::{cache, clock, domains, log};
    use super::{MAX_BATCH_OPS, MAX_NAMES_OF_KEY, PluginState, timed, ttl};

    impl cache::Host for PluginState {
        async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
            <Self as v1::cache::Host>::get(self, key).await
        }
        async fn get_string(&mut self, key: String) -> wasmtime::Result<Option<String>> {
            <Self as v1::cache::Host>::get_string(self, key).await
        }
        async fn set(
            &mut self,
            key: String,
            value: Vec<u8>,
            ttl_seconds: Option<u32>,
        ) -> wasmtime::Result<()> {
            <Self as v1::cache::Host>::set(self, key, value, ttl_seconds).await
        }
        async fn set_string(
            &mut self,
            key: String,
            value: String,
            ttl_seconds: Option<u32>,
        ) -> wasmtime::Result<()> {
            <Self as v1::cache::Host>::set_string(self, key, value, ttl_seconds).await
        }
        async fn delete(&mut self, key: String) -> wasmtime::Result<bool> {
            <Self as v1::cache::Host>::delete(self, key).await
        }
        async fn exists(&mut self, key: String) -> wasmtime::Result<bool> {
            <Self as v1::cache::Host>::exists(self, key).await
        }
        async fn increment(
            &mut self,
            key: String,
            amount: i64,
            ttl_seconds: Option<u32>,
        ) -> wasmtime::Result<i64> {
            <Self as v1::cache::Host>::increment(self, key, amount, ttl_seconds).await
        }
        async fn expire(&mut self, key: String, ttl_seconds: u32) -> wasmtime::Result<bool> {
            <Self as v1::cache::Host>::expire(self, key, ttl_seconds).await
        }
        async fn increment_many(
            &mut self,
            ops: Vec<cache::IncrementOp>,
        ) -> wasmtime::Result<Vec<i64>> {
            if ops.len() > MAX_BATCH_OPS {
                wasmtime::bail!(
                    "increment-many got {} operations; at most {MAX_BATCH_OPS} per call",
                    ops.len()
                );
            }
            let mut batch = Vec::with_capacity(ops.len());
            for op in ops {
                batch.push((self.key(&op.key)?, op.amount, ttl(op.ttl_seconds)));
            }
            let results = timed(&mut self.clock, self.cache.increment_many(&batch)).await;
            // A counter that is not an integer (or overflows) is the plugin's own data.
            Ok(results.into_iter().collect::<Result<Vec<_>, _>>()?)
        }
    }

    impl domains::Host for PluginState {
        async fn owner_of(&mut self, name: String) -> wasmtime::Result<Option<String>> {
            <Self as v1::domains::Host>::owner_of(self, name).await
        }
        async fn record_for_key(
            &mut self,
            ssh_key_hash: String,
        ) -> wasmtime::Result<Option<domains::DomainRecord>> {
            let record = <Self as v1::domains::Host>::record_for_key(self, ssh_key_hash).await?;
            Ok(record.map(|r| domains::DomainRecord {
                domain: r.domain,
                ssh_key_hash: r.ssh_key_hash,
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                use_count: r.use_count,
            }))
        }
        async fn is_reserved(&mut self, name: String) -> wasmtime::Result<bool> {
            <Self as v1::domains::Host>::is_reserved(self, name).await
        }
        async fn names_of_key(&mut self, ssh_key_hash: String) -> wasmtime::Result<Vec<String>> {
            let Some(store) = &self.domains else {
                return Ok(Vec::new());
            };
            let mut names = timed(&mut self.clock, store.names_of(&ssh_key_hash))
                .await
                .map_err(|e| self.clock.fault(format!("domain store: {e}")))?;
            names.truncate(MAX_NAMES_OF_KEY);
            Ok(names)
        }
    }

    impl log::Host for PluginState {
        async fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
            let level = match level {
                log::Level::Debug => v1::log::Level::Debug,
                log::Level::Info => v1::log::Level::Info,
                log::Level::Warn => v1::log::Level::Warn,
                log::Level::Error => v1::log::Level::Error,
            };
            <Self as v1::log::Host>::log(self, level, message).await
        }
    }

    impl clock::Host for PluginState {
        async fn now_unix_seconds(&mut self) -> wasmtime::Result<i64> {
            <Self as v1::clock::Host>::now_unix_seconds(self).await
        }
        async fn now_unix_millis(&mut self) -> wasmtime::Result<u64> {
            <Self as v1::clock::Host>::now_unix_millis(self).await
        }
    }
}
