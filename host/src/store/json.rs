//! The embedded JSON domain store: one `domains.json` file in P0rt's shape
//! (an object mapping key hash → record), held in memory with indexes both ways.
//!
//! Durability rules: a new name binding is written before [`claim`](DomainStore::claim)
//! returns; `last_seen`/`use_count` updates are batched and written every
//! [`TOUCH_FLUSH_INTERVAL`]. Every write is temp file + fsync + rename + fsync(dir), so a crash
//! leaves either the old or the new file. A file that cannot be read is never replaced.
//!
//! A large store does not rewrite all of `domains.json` for every claim: the records changed
//! since it was last written whole go to `domains.delta.json` beside it (written the same
//! way), which names the SHA-256 of the `domains.json` it extends. Opening the store, and
//! [`read_records`], apply the delta only to that exact file; a delta left over from before
//! a later whole write names another hash and is ignored. `domains.json` is written whole
//! again once the delta holds [`1/DELTA_MAX_SHARE`](DELTA_MAX_SHARE) of the records, when a
//! record goes away, on [`flush`](DomainStore::flush) (so after a clean stop it alone is
//! complete, in P0rt's shape) and always while the store is under [`DELTA_MIN_RECORDS`].
//!
//! Requested names granted by the naming policy (p0rt's own, P0rt has none) live beside it in
//! `granted-names.json` (name → owner key hash and time), so `domains.json` stays exactly
//! P0rt's shape. That file is written only once a name has been granted.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::reservations::{JsonReservations, Reservations};
use super::{Claim, DAY_SECS, DomainRecord, DomainStats, DomainStore, Grant, Import, StoreError};

/// File name of the store inside the data directory (P0rt's name).
pub const DOMAINS_FILE_NAME: &str = "domains.json";
/// File of granted requested names, beside `domains.json`.
pub const GRANTED_FILE_NAME: &str = "granted-names.json";
/// File of the records changed since `domains.json` was last written whole, beside it.
pub const DELTA_FILE_NAME: &str = "domains.delta.json";
/// Below this many records every write is the whole `domains.json` (cheap at that size, and
/// the file alone is then always complete).
pub const DELTA_MIN_RECORDS: usize = 2048;
/// The delta file holds at most one record in this many before `domains.json` is written
/// whole: each claim's write is O(delta), the whole file's O(records) once per that many
/// changes (at 10 000 records a claim's write is ~30x smaller than the whole file).
pub const DELTA_MAX_SHARE: usize = 16;
/// Bytes handed to the kernel per write call when `domains.json` is written.
const WRITE_BUFFER: usize = 256 * 1024;
/// Lock file that keeps a second process off the same data directory.
pub const LOCK_FILE_NAME: &str = "p0rt.lock";
/// Least time from the start of one write to the start of the next. Only writes that would
/// follow each other back to back wait (an isolated claim is written at once); what arrives
/// meanwhile goes into the next write, so a burst of new keys takes fewer writes, each of
/// which costs two fsyncs and a rename whatever it holds.
const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(10);
/// How often batched `last_seen`/`use_count` updates reach the disk.
pub const TOUCH_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Indexes {
    by_key: HashMap<String, DomainRecord>,
    /// domain → key hash, for main names and granted names alike
    by_domain: HashMap<String, String>,
    /// granted name → its grant
    granted: BTreeMap<String, GrantedName>,
    /// Record changes not yet taken by a write, in order: key hash → its new file entry (see
    /// [`render_entry`]), or `None` when the record went away. Each record is formatted once,
    /// when it changes; the writer applies these to its own copy of the file ([`FileImage`]).
    pending: Vec<(String, Option<Vec<u8>>)>,
}

impl Indexes {
    /// Adds (or replaces) `record` in the key index, noting its new file entry.
    fn put(&mut self, record: DomainRecord) {
        let entry = render_entry(&record.ssh_key_hash, &record);
        self.pending
            .push((record.ssh_key_hash.clone(), Some(entry)));
        self.by_key.insert(record.ssh_key_hash.clone(), record);
    }

    /// Removes the key's record (not its domain binding), noting that it leaves the file.
    fn remove(&mut self, key: &str) {
        if self.by_key.remove(key).is_some() {
            self.pending.push((key.to_string(), None));
        }
    }

    /// Notes the key's file entry again after its record was updated in place.
    fn rerender(&mut self, key: &str) {
        if let Some(record) = self.by_key.get(key) {
            let entry = render_entry(key, record);
            self.pending.push((key.to_string(), Some(entry)));
        }
    }

    /// Every record's entry, for a writer starting from nothing; clears the change log.
    fn image(&mut self) -> FileImage {
        self.pending.clear();
        FileImage {
            entries: self
                .by_key
                .iter()
                .map(|(key, record)| (key.clone(), render_entry(key, record)))
                .collect(),
            ..FileImage::default()
        }
    }
}

/// The writer's copy of `domains.json`: every record's file entry, in key order. Only the
/// holder of the store's writer touches it, so a write neither clones nor formats records,
/// and the index lock is held only to take the change log.
#[derive(Default)]
struct FileImage {
    entries: BTreeMap<String, Vec<u8>>,
    /// SHA-256 of `domains.json` as this writer last wrote it whole; `None` until it has.
    base: Option<[u8; 32]>,
    /// The entries changed since then, in key order: what the delta file holds.
    delta: BTreeMap<String, Vec<u8>>,
    /// A record went away since then (the delta file cannot say so).
    removed: bool,
    /// When the last write started.
    started: Option<tokio::time::Instant>,
}

impl FileImage {
    fn apply(&mut self, changes: Vec<(String, Option<Vec<u8>>)>) {
        for (key, entry) in changes {
            match entry {
                Some(entry) => {
                    self.delta.insert(key.clone(), entry.clone());
                    self.entries.insert(key, entry);
                }
                None => {
                    self.removed |= self.entries.remove(&key).is_some();
                    self.delta.remove(&key);
                }
            };
        }
    }

    /// Whether this write must be the whole `domains.json` rather than the delta file.
    fn write_whole(&self, min_records: usize) -> bool {
        self.base.is_none()
            || self.removed
            || self.entries.len() < min_records
            || self.delta.len() > self.entries.len() / DELTA_MAX_SHARE
    }

    /// Writes the delta file: the base's hash and the changed records' entries, in key order.
    fn write_delta_to(&self, base: &[u8; 32], out: &mut impl Write) -> std::io::Result<()> {
        write!(
            out,
            "{{\n\"base_sha256\": \"{}\",\n\"records\": {{\n",
            hex::encode(base)
        )?;
        for (i, entry) in self.delta.values().enumerate() {
            if i > 0 {
                out.write_all(b",\n")?;
            }
            out.write_all(entry)?;
        }
        out.write_all(b"\n}\n}\n")
    }

    /// Writes the whole file from the entries, byte for byte what [`serialize_domains`]
    /// gives for the same records. The caller buffers it (vectored writes straight from the
    /// entries measured no cheaper per handshake, and need more code).
    fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        if self.entries.is_empty() {
            return out.write_all(b"{}\n");
        }
        out.write_all(b"{\n")?;
        for (i, entry) in self.entries.values().enumerate() {
            if i > 0 {
                out.write_all(b",\n")?;
            }
            out.write_all(entry)?;
        }
        out.write_all(b"\n}\n")
    }
}

/// One granted requested name, as in `granted-names.json`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GrantedName {
    ssh_key_hash: String,
    /// Unix seconds.
    granted_at: i64,
}

pub struct JsonStore {
    path: PathBuf,
    granted_path: PathBuf,
    delta_path: PathBuf,
    /// [`DELTA_MIN_RECORDS`]; smaller in tests.
    delta_min_records: usize,
    dir: PathBuf,
    /// Held for the life of the store; the OS releases the lock if the process dies.
    _lock: File,
    indexes: Mutex<Indexes>,
    /// Serializes file writes so a slow write never interleaves with the next; holds the
    /// writer's copy of the file (`None` until the first write, or after a write panicked).
    writer: tokio::sync::Mutex<Option<FileImage>>,
    dirty: AtomicBool,
    /// Counts changes to the indexes; a claim waits until a write covers its change.
    changes: AtomicU64,
    /// The change count included in the last successful write.
    written: AtomicU64,
    /// `reservations.json` beside it (read only; `p0rt reservation` writes it).
    reservations: JsonReservations,
}

/// A timestamp as found on disk: P0rt writes RFC 3339 strings; unix seconds are accepted too.
#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum RawTime {
    Unix(i64),
    Text(String),
}

#[derive(Deserialize)]
struct RawRecord {
    domain: String,
    #[serde(default)]
    ssh_key_hash: Option<String>,
    first_seen: RawTime,
    last_seen: RawTime,
    #[serde(default)]
    use_count: u64,
}

#[derive(Serialize)]
struct DiskRecord<'a> {
    domain: &'a str,
    ssh_key_hash: &'a str,
    first_seen: RawTime,
    last_seen: RawTime,
    use_count: u64,
}

/// A time as an RFC 3339 string, if it has one (years 0000 to 9999).
fn format_time(secs: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

/// Unix seconds outside RFC 3339's years 0000–9999 are refused, not kept: no clock p0rt or
/// P0rt ran on wrote them, so the record is damaged, and refusing means every time this store
/// writes is in P0rt's RFC 3339 shape, unchanged (before, they were rewritten to 1970).
fn parse_time(raw: RawTime, what: &str, key: &str) -> Result<i64, String> {
    match raw {
        RawTime::Unix(secs) => match format_time(secs) {
            Some(_) => Ok(secs),
            None => Err(format!(
                "record {key}: {what} {secs} lies outside the years 0000 to 9999"
            )),
        },
        RawTime::Text(text) => OffsetDateTime::parse(&text, &Rfc3339)
            .map(|t| t.unix_timestamp())
            .map_err(|e| format!("record {key}: {what} {text:?} is not an RFC 3339 time ({e})")),
    }
}

/// The time to write: RFC 3339, or the unix seconds as they are (only a clock outside the
/// years 0000–9999 gets there): never silently another time.
fn disk_time(secs: i64) -> RawTime {
    format_time(secs).map_or(RawTime::Unix(secs), RawTime::Text)
}

/// The reason `record` cannot be held in `domains.json`, if any (read or imported alike).
fn check_record(key: &str, record: RawRecord) -> Result<DomainRecord, String> {
    crate::names::check_dns_label(&record.domain)
        .map_err(|e| format!("record {key}: domain is not a DNS label ({e})"))?;
    Ok(DomainRecord {
        first_seen: parse_time(record.first_seen, "first_seen", key)?,
        last_seen: parse_time(record.last_seen, "last_seen", key)?,
        domain: record.domain,
        ssh_key_hash: key.to_string(),
        use_count: record.use_count,
    })
}

/// Reads the records of a `domains.json`, with the delta file beside it if that extends this
/// very file, without opening it as a store (no lock, no writes).
pub fn read_records(path: &Path) -> Result<Vec<DomainRecord>, StoreError> {
    let text = std::fs::read_to_string(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut indexes = parse_domains(&text).map_err(|detail| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    })?;
    apply_delta(&path.with_file_name(DELTA_FILE_NAME), &text, &mut indexes)?;
    Ok(indexes.by_key.into_values().collect())
}

/// The delta file as read: the hash of the `domains.json` it extends and the records changed
/// since, in P0rt's record shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeltaFile {
    base_sha256: String,
    records: BTreeMap<String, RawRecord>,
}

/// Applies the delta file at `path` to indexes read from `domains` (its text), if the delta
/// extends exactly that text; a delta for another `domains.json` (left over from before a
/// later whole write) is ignored. Returns whether it was applied.
fn apply_delta(path: &Path, domains: &str, indexes: &mut Indexes) -> Result<bool, StoreError> {
    let Some(text) = read_text(path)? else {
        return Ok(false);
    };
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let delta: DeltaFile = serde_json::from_str(&text).map_err(|e| {
        corrupt(format!(
            "not a JSON object of base_sha256 and key hash → domain record ({e})"
        ))
    })?;
    if delta.base_sha256 != hex::encode(Sha256::digest(domains.as_bytes())) {
        tracing::info!(
            "{} is older than {DOMAINS_FILE_NAME} (written whole since); ignoring it",
            path.display()
        );
        return Ok(false);
    }
    for (key, record) in delta.records {
        if let Some(inner) = &record.ssh_key_hash
            && inner != &key
        {
            return Err(corrupt(format!(
                "record {key} carries a different ssh_key_hash {inner}"
            )));
        }
        let record = check_record(&key, record).map_err(corrupt)?;
        match indexes.by_domain.get(&record.domain) {
            Some(other) if other != &key => {
                return Err(corrupt(format!(
                    "domain {} is bound to two keys ({other} and {key})",
                    record.domain
                )));
            }
            _ => {}
        }
        if let Some(old) = indexes.by_key.get(&key)
            && old.domain != record.domain
        {
            indexes.by_domain.remove(&old.domain);
        }
        indexes.by_domain.insert(record.domain.clone(), key.clone());
        indexes.by_key.insert(key, record);
    }
    Ok(true)
}

/// Takes the data directory lock, held as long as the returned file lives.
pub fn lock_data_dir(dir: &Path) -> Result<File, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let lock_path = dir.join(LOCK_FILE_NAME);
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|source| StoreError::Io {
            path: lock_path.clone(),
            source,
        })?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            dir: dir.to_path_buf(),
            lock: lock_path,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Io {
            path: lock_path,
            source,
        }),
    }
}

/// Parses `domains.json` text into indexes, rejecting anything that is not P0rt's shape
/// or that binds one name to two keys.
fn parse_domains(text: &str) -> Result<Indexes, String> {
    if text.trim().is_empty() {
        return Err("the file is empty (a truncated write?)".into());
    }
    let raw: BTreeMap<String, RawRecord> = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON object of key hash → domain record ({e})"))?;
    let mut indexes = Indexes::default();
    for (key, record) in raw {
        if let Some(inner) = &record.ssh_key_hash
            && inner != &key
        {
            return Err(format!(
                "record {key} carries a different ssh_key_hash {inner}"
            ));
        }
        let record = check_record(&key, record)?;
        if let Some(other) = indexes.by_domain.get(&record.domain) {
            return Err(format!(
                "domain {} is bound to two keys ({other} and {key})",
                record.domain
            ));
        }
        indexes.by_domain.insert(record.domain.clone(), key.clone());
        // Not noted as a change: the writer's copy starts from the records as read.
        indexes.by_key.insert(key, record);
    }
    Ok(indexes)
}

/// The file entry of one record, exactly as [`serialize_domains`] formats it inside the
/// top-level object: `  "key": {\n    "domain": …\n  }` (no separator, no newline around).
fn render_entry(key: &str, record: &DomainRecord) -> Vec<u8> {
    let mut one = serialize_domains(std::iter::once((key, record)));
    // `{\n` + entry + `\n}\n`
    one.truncate(one.len() - 3);
    one.drain(..2);
    one
}

fn serialize_domains<'a>(records: impl Iterator<Item = (&'a str, &'a DomainRecord)>) -> Vec<u8> {
    let sorted: BTreeMap<&str, DiskRecord<'_>> = records
        .map(|(key, r)| {
            (
                key,
                DiskRecord {
                    domain: &r.domain,
                    ssh_key_hash: &r.ssh_key_hash,
                    first_seen: disk_time(r.first_seen),
                    last_seen: disk_time(r.last_seen),
                    use_count: r.use_count,
                },
            )
        })
        .collect();
    let mut bytes = serde_json::to_vec_pretty(&sorted).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    bytes
}

/// Adds the grants of `granted-names.json` to indexes read from `domains.json`.
fn parse_granted(text: &str, indexes: &mut Indexes) -> Result<(), String> {
    let raw: BTreeMap<String, GrantedName> = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON object of name → {{ssh_key_hash, granted_at}} ({e})"))?;
    for (name, grant) in raw {
        crate::names::check_dns_label(&name)
            .map_err(|e| format!("granted name {name:?} is not a DNS label ({e})"))?;
        if let Some(other) = indexes.by_domain.get(&name) {
            return Err(format!(
                "{name} is granted to {} but already belongs to {other}",
                grant.ssh_key_hash
            ));
        }
        indexes
            .by_domain
            .insert(name.clone(), grant.ssh_key_hash.clone());
        indexes.granted.insert(name, grant);
    }
    Ok(())
}

fn serialize_granted(indexes: &Indexes) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(&indexes.granted).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    bytes
}

/// Reads a store file; a missing file is `None`, anything unreadable an error naming it.
fn read_text(path: &Path) -> Result<Option<String>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: "the file is not UTF-8 text".into(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// temp file + fsync + rename + fsync(dir): readers see the old file or the new one, never half.
pub(crate) fn write_atomically(path: &Path, dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_with(path, dir, |file| file.write_all(bytes))
}

/// [`write_atomically`], the content written by `fill`.
fn write_atomically_with(
    path: &Path,
    dir: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        fill(&mut file)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Passes writes on to `inner`, hashing what goes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `image` out: the whole `domains.json` (then the delta file is dropped), or, when
/// `whole` is false and the image allows it, only the delta file.
fn write_image(
    image: &mut FileImage,
    whole: bool,
    min_records: usize,
    path: &Path,
    delta_path: &Path,
    dir: &Path,
) -> std::io::Result<()> {
    if let (false, Some(base)) = (whole || image.write_whole(min_records), image.base) {
        return write_atomically_with(delta_path, dir, |file| {
            let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, file);
            image.write_delta_to(&base, &mut out)?;
            out.flush()
        });
    }
    let mut hash = None;
    write_atomically_with(path, dir, |file| {
        let mut out = Hashing {
            inner: std::io::BufWriter::with_capacity(WRITE_BUFFER, file),
            hash: Sha256::new(),
        };
        image.write_to(&mut out)?;
        out.flush()?;
        hash = Some(out.hash.finalize().into());
        Ok(())
    })?;
    image.base = hash;
    image.delta.clear();
    image.removed = false;
    // The delta now names a file that is gone, so it would be ignored; removed so that
    // `domains.json` is visibly complete. Not fsynced: a delta that survives a crash is
    // ignored all the same.
    match std::fs::remove_file(delta_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl JsonStore {
    /// Opens (or starts) the store in `dir`, taking the directory lock.
    /// A missing file is an empty store; an unreadable one is an error and is left as it is.
    pub fn open(dir: &Path) -> Result<Arc<JsonStore>, StoreError> {
        let lock = lock_data_dir(dir)?;
        let path = dir.join(DOMAINS_FILE_NAME);
        let delta_path = dir.join(DELTA_FILE_NAME);
        let (mut indexes, delta_applied) = match read_text(&path)? {
            Some(text) => {
                let mut indexes = parse_domains(&text).map_err(|detail| StoreError::Corrupt {
                    path: path.clone(),
                    detail,
                })?;
                // Applied: the next flush writes it into `domains.json` (the flusher's, within
                // TOUCH_FLUSH_INTERVAL, if no claim does first).
                let applied = apply_delta(&delta_path, &text, &mut indexes)?;
                (indexes, applied)
            }
            None => (Indexes::default(), false),
        };
        let granted_path = dir.join(GRANTED_FILE_NAME);
        if let Some(text) = read_text(&granted_path)? {
            parse_granted(&text, &mut indexes).map_err(|detail| StoreError::Corrupt {
                path: granted_path.clone(),
                detail,
            })?;
        }
        let reservations = JsonReservations::open(dir)?;
        Ok(Arc::new(JsonStore {
            reservations,
            path,
            granted_path,
            delta_path,
            delta_min_records: DELTA_MIN_RECORDS,
            dir: dir.to_path_buf(),
            _lock: lock,
            indexes: Mutex::new(indexes),
            writer: tokio::sync::Mutex::new(None),
            dirty: AtomicBool::new(delta_applied),
            changes: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }))
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the task that writes batched touches every [`TOUCH_FLUSH_INTERVAL`].
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TOUCH_FLUSH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { return };
                if store.dirty.load(Ordering::Acquire)
                    && let Err(e) = store.persist().await
                {
                    tracing::error!("writing {} failed, will retry: {e}", store.path.display());
                }
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Indexes> {
        // A panic while holding this lock cannot leave the maps half-updated (every update is
        // a single insert), so a poisoned lock is still safe to use.
        self.indexes.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn persist(&self) -> Result<(), StoreError> {
        self.persist_through(u64::MAX, false, |_| {}).await
    }

    /// Makes sure change number `change` is on disk. Group commit: whoever holds the writer
    /// writes everything changed so far, so claims queued behind it return without a write.
    /// If the write fails, `undo` runs before the writer is released, so no later write can
    /// put on disk what the failed one was for. `whole`: write all of `domains.json` and
    /// drop the delta file, even if nothing changed since the last write.
    async fn persist_through(
        &self,
        change: u64,
        whole: bool,
        undo: impl FnOnce(&mut Indexes),
    ) -> Result<(), StoreError> {
        let mut writing = self.writer.lock().await;
        if change != u64::MAX && self.written.load(Ordering::Acquire) >= change {
            return Ok(());
        }
        if whole
            && !self.dirty.load(Ordering::Acquire)
            && writing
                .as_ref()
                .is_none_or(|image| image.delta.is_empty() && !image.removed)
        {
            return Ok(());
        }
        // Writes back to back: the next one gathers what arrives meanwhile.
        if let Some(started) = writing.as_ref().and_then(|image| image.started) {
            tokio::time::sleep_until(started + MIN_WRITE_INTERVAL).await;
        }
        self.dirty.store(false, Ordering::Release);
        // Under the index lock a write only takes the change log (each changed record was
        // formatted when it changed); the writer's copy is brought up to date and written out
        // on a blocking thread, so neither the store's readers nor an async worker wait.
        let (mut image, changes, granted, included) = {
            let mut idx = self.lock();
            let (image, changes) = match writing.take() {
                Some(image) => (image, std::mem::take(&mut idx.pending)),
                None => (idx.image(), Vec::new()),
            };
            (
                image,
                changes,
                // Not written (not even created) until a name has been granted.
                (!idx.granted.is_empty()).then(|| serialize_granted(&idx)),
                self.changes.load(Ordering::Acquire),
            )
        };
        let (path, granted_path, delta_path, dir) = (
            self.path.clone(),
            self.granted_path.clone(),
            self.delta_path.clone(),
            self.dir.clone(),
        );
        let min_records = self.delta_min_records;
        image.started = Some(tokio::time::Instant::now());
        let result = tokio::task::spawn_blocking(move || {
            image.apply(changes);
            let written = write_image(&mut image, whole, min_records, &path, &delta_path, &dir)
                .and_then(|()| match granted {
                    Some(granted) => write_atomically(&granted_path, &dir, &granted),
                    None => Ok(()),
                });
            (image, written)
        })
        .await;
        // A panicked write loses the copy: the next write starts again from the indexes.
        let result = match result {
            Ok((image, written)) => {
                *writing = Some(image);
                written
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        match result {
            Ok(()) => {
                self.written.fetch_max(included, Ordering::AcqRel);
                Ok(())
            }
            Err(source) => {
                undo(&mut self.lock());
                self.dirty.store(true, Ordering::Release);
                Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }
}

#[async_trait]
impl DomainStore for JsonStore {
    async fn record_for_key(&self, ssh_key_hash: &str) -> Result<Option<DomainRecord>, StoreError> {
        Ok(self.lock().by_key.get(ssh_key_hash).cloned())
    }

    async fn owner_of(&self, domain: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().by_domain.get(domain).cloned())
    }

    async fn grant(&self, ssh_key_hash: &str, name: &str, now: i64) -> Result<Grant, StoreError> {
        let change = {
            let mut idx = self.lock();
            match idx.by_domain.get(name) {
                Some(owner) if owner == ssh_key_hash => return Ok(Grant::AlreadyOwned),
                Some(_) => return Ok(Grant::Taken),
                None => {}
            }
            idx.by_domain
                .insert(name.to_string(), ssh_key_hash.to_string());
            idx.granted.insert(
                name.to_string(),
                GrantedName {
                    ssh_key_hash: ssh_key_hash.to_string(),
                    granted_at: now,
                },
            );
            self.changes.fetch_add(1, Ordering::AcqRel) + 1
        };
        self.persist_through(change, false, |idx| {
            idx.by_domain.remove(name);
            idx.granted.remove(name);
        })
        .await?;
        Ok(Grant::Granted)
    }

    async fn names_of(&self, ssh_key_hash: &str) -> Result<Vec<String>, StoreError> {
        let idx = self.lock();
        let main = idx.by_key.get(ssh_key_hash).map(|r| r.domain.clone());
        let granted = idx
            .granted
            .iter()
            .filter(|(_, g)| g.ssh_key_hash == ssh_key_hash)
            .map(|(name, _)| name.clone());
        Ok(main.into_iter().chain(granted).collect())
    }

    async fn claim(&self, ssh_key_hash: &str, domain: &str, now: i64) -> Result<Claim, StoreError> {
        let record = {
            let mut idx = self.lock();
            if let Some(existing) = idx.by_key.get(ssh_key_hash) {
                return Ok(Claim::AlreadyOwned(existing.clone()));
            }
            if idx.by_domain.contains_key(domain) {
                return Ok(Claim::Taken);
            }
            let record = DomainRecord::claimed(ssh_key_hash, domain, now);
            idx.by_domain
                .insert(domain.to_string(), ssh_key_hash.to_string());
            idx.put(record.clone());
            // Numbered under the index lock, so a write that saw this number saw this record.
            let change = self.changes.fetch_add(1, Ordering::AcqRel) + 1;
            (record, change)
        };
        let (record, change) = record;
        // Not durable, so not granted: undone, so memory and disk agree.
        self.persist_through(change, false, |idx| {
            idx.remove(ssh_key_hash);
            idx.by_domain.remove(domain);
        })
        .await?;
        Ok(Claim::Claimed(record))
    }

    async fn touch(
        &self,
        ssh_key_hash: &str,
        now: i64,
    ) -> Result<Option<DomainRecord>, StoreError> {
        let mut idx = self.lock();
        let Some(record) = idx.by_key.get_mut(ssh_key_hash) else {
            return Ok(None);
        };
        record.last_seen = record.last_seen.max(now);
        record.use_count = record.use_count.saturating_add(1);
        let record = record.clone();
        idx.rerender(ssh_key_hash);
        self.dirty.store(true, Ordering::Release);
        Ok(Some(record))
    }

    async fn stats(&self, now: i64) -> Result<DomainStats, StoreError> {
        let idx = self.lock();
        let since = |secs: i64| {
            idx.by_key
                .values()
                .filter(|r| r.last_seen >= now - secs)
                .count() as u64
        };
        Ok(DomainStats {
            total_domains: idx.by_key.len() as u64,
            active_last_24h: since(DAY_SECS),
            active_last_7d: since(7 * DAY_SECS),
            storage_type: "json",
        })
    }

    async fn all_records(&self) -> Result<Vec<DomainRecord>, StoreError> {
        let mut records: Vec<DomainRecord> = self.lock().by_key.values().cloned().collect();
        records.sort_by(|a, b| a.ssh_key_hash.cmp(&b.ssh_key_hash));
        Ok(records)
    }

    async fn import(&self, record: &DomainRecord) -> Result<Import, StoreError> {
        let raw = RawRecord {
            domain: record.domain.clone(),
            ssh_key_hash: None,
            first_seen: RawTime::Unix(record.first_seen),
            last_seen: RawTime::Unix(record.last_seen),
            use_count: record.use_count,
        };
        if let Err(why) = check_record(&record.ssh_key_hash, raw) {
            return Ok(Import::Conflict(why));
        }
        {
            let mut idx = self.lock();
            if let Some(existing) = idx.by_key.get(&record.ssh_key_hash) {
                return Ok(Import::against_existing(existing, record));
            }
            if let Some(owner) = idx.by_domain.get(&record.domain) {
                return Ok(Import::Conflict(format!(
                    "{} belongs to key {owner} here",
                    record.domain
                )));
            }
            idx.by_domain
                .insert(record.domain.clone(), record.ssh_key_hash.clone());
            idx.put(record.clone());
        }
        self.dirty.store(true, Ordering::Release);
        Ok(Import::Imported)
    }

    /// Writes what is pending, and `domains.json` whole, so that it alone holds every record.
    async fn flush(&self) -> Result<(), StoreError> {
        self.persist_through(u64::MAX, true, |_| {}).await
    }

    fn kind(&self) -> &'static str {
        "json"
    }

    fn reservations(&self) -> &dyn Reservations {
        &self.reservations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0RT_FILE: &str = r#"{
  "abc123": {
    "domain": "whale-guitar-fox",
    "ssh_key_hash": "abc123",
    "first_seen": "2022-01-01T00:00:00Z",
    "last_seen": "2022-01-02T00:00:00Z",
    "use_count": 42
  }
}"#;

    #[tokio::test]
    async fn reads_p0rt_file_and_writes_rfc3339_back() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DOMAINS_FILE_NAME), P0RT_FILE).unwrap();
        let store = JsonStore::open(dir.path()).unwrap();
        let rec = store.record_for_key("abc123").await.unwrap().unwrap();
        assert_eq!(rec.first_seen, 1_640_995_200);
        assert_eq!(rec.use_count, 42);
        assert_eq!(
            store.owner_of("whale-guitar-fox").await.unwrap().as_deref(),
            Some("abc123")
        );
        store
            .claim("def456", "other-name-here", 1_700_000_000)
            .await
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        assert!(text.contains("\"2022-01-01T00:00:00Z\""), "{text}");
        assert!(text.contains("\"2023-11-14T22:13:20Z\""), "{text}");
    }

    #[tokio::test]
    async fn unix_second_timestamps_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(DOMAINS_FILE_NAME),
            r#"{"k":{"domain":"a-b-c","ssh_key_hash":"k","first_seen":1640995200,"last_seen":1641081600,"use_count":1}}"#,
        )
        .unwrap();
        let store = JsonStore::open(dir.path()).unwrap();
        assert_eq!(
            store.record_for_key("k").await.unwrap().unwrap().last_seen,
            1_641_081_600
        );
    }

    #[tokio::test]
    async fn claim_is_exclusive_per_name_and_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = JsonStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.claim("k1", "n1", 1).await.unwrap(),
            Claim::Claimed(_)
        ));
        assert_eq!(store.claim("k2", "n1", 2).await.unwrap(), Claim::Taken);
        assert!(
            matches!(store.claim("k1", "n2", 3).await.unwrap(), Claim::AlreadyOwned(r) if r.domain == "n1")
        );
    }

    #[tokio::test]
    async fn corrupt_files_are_refused_and_untouched() {
        for bad in [
            "",
            "{\"k\": {\"domain\": \"a\"",
            "[1,2,3]",
            "not json",
            "{\"k\":{\"domain\":\"a\",\"first_seen\":\"yesterday\",\"last_seen\":1}}",
            r#"{"k1":{"domain":"same","first_seen":1,"last_seen":1},"k2":{"domain":"same","first_seen":1,"last_seen":1}}"#,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(DOMAINS_FILE_NAME);
            std::fs::write(&path, bad).unwrap();
            let err = JsonStore::open(dir.path()).err().expect(bad);
            assert!(matches!(err, StoreError::Corrupt { .. }), "{bad}: {err}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
        }
    }

    #[tokio::test]
    async fn records_that_are_not_names_or_times_are_refused_at_load() {
        for (domain, time, needle) in [
            ("", "1", "domain is not a DNS label"),
            ("a.b", "1", "domain is not a DNS label"),
            ("Evil Name/../x", "1", "domain is not a DNS label"),
            ("ünï-cödé", "1", "domain is not a DNS label"),
            (
                "fine-name",
                "-99999999999",
                "outside the years 0000 to 9999",
            ),
            (
                "fine-name",
                "1000000000000000",
                "outside the years 0000 to 9999",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(DOMAINS_FILE_NAME);
            let text = format!(
                r#"{{"k":{{"domain":{domain:?},"first_seen":1,"last_seen":{time},"use_count":1}}}}"#
            );
            std::fs::write(&path, &text).unwrap();
            let err = JsonStore::open(dir.path()).err().expect(&text).to_string();
            assert!(
                err.contains("record k: ") && err.contains(needle),
                "{text}: {err}"
            );
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                text,
                "left untouched"
            );
        }
    }

    #[tokio::test]
    async fn records_that_cannot_be_written_back_are_not_imported() {
        let dir = tempfile::tempdir().unwrap();
        let store = JsonStore::open(dir.path()).unwrap();
        for record in [
            DomainRecord::claimed("k1", "a.b", 1),
            DomainRecord::claimed("k2", "fine-name", 1_000_000_000_000_000),
        ] {
            assert!(
                matches!(store.import(&record).await.unwrap(), Import::Conflict(_)),
                "{record:?}"
            );
        }
        assert!(store.is_empty());
    }

    /// A claim whose write fails is undone before the writer is released, so a write queued
    /// behind it can never put the refused record on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_claim_is_undone_before_the_next_write_starts() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let store = JsonStore::open(dir.path()).unwrap();
        // Enough records that a write outgrows a pipe's buffer and waits for its reader.
        for i in 0..2000 {
            let record = DomainRecord::claimed(&format!("key{i}"), &format!("name{i}"), 1);
            store.import(&record).await.unwrap();
        }
        // A FIFO where the temp file goes: a write blocks until the test reads it, then
        // fails (fsync of a FIFO is EINVAL).
        let fifo = store.path.with_extension("json.tmp");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo");

        let refused = tokio::spawn({
            let store = store.clone();
            async move { store.claim("refused", "refused-name", 1).await }
        });
        let started = std::time::Instant::now();
        while store.writer.try_lock().is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "claim never wrote"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The next writer says, the moment it holds the writer, whether the record is gone.
        let (report, reports) = std::sync::mpsc::channel();
        // A thread of its own, so its wake-up cannot wait behind the claim's task.
        let next = std::thread::spawn({
            let store = store.clone();
            move || {
                let _writing = store.writer.blocking_lock();
                let seen = match store.indexes.try_lock() {
                    Ok(idx) => Ok(idx.by_key.contains_key("refused")
                        || !idx
                            .pending
                            .iter()
                            .any(|(k, e)| k == "refused" && e.is_none())),
                    Err(_) => Err("got the writer before the failed claim was undone"),
                };
                report.send(seen).unwrap();
            }
        });
        let seen = tokio::task::spawn_blocking({
            let store = store.clone();
            move || {
                let mut pipe = File::open(&fifo).unwrap();
                // Held while the write fails, so the claim cannot undo before we let go.
                let held = store.lock();
                let mut attempted = String::new();
                pipe.read_to_string(&mut attempted).unwrap();
                assert!(
                    attempted.contains("refused-name"),
                    "the write was for the claim"
                );
                // A writer released before the undo shows itself now; a correct store keeps
                // the next writer waiting, which this bounded wait cannot tell from slowness.
                let early = reports.recv_timeout(Duration::from_millis(500));
                drop(held);
                early.or_else(|_| reports.recv()).unwrap()
            }
        })
        .await
        .unwrap();
        assert!(matches!(refused.await.unwrap(), Err(StoreError::Io { .. })));
        next.join().unwrap();
        assert_eq!(
            seen,
            Ok(false),
            "the next write would have stored the refused record"
        );
        // The next write leaves it out, and is what a full rewrite gives.
        std::fs::remove_file(store.path.with_extension("json.tmp")).unwrap();
        store.claim("later", "later-name", 2).await.unwrap();
        let text = std::fs::read_to_string(&store.path).unwrap();
        assert!(!text.contains("refused-name") && text.contains("later-name"));
        let full = {
            let idx = store.lock();
            serialize_domains(idx.by_key.iter().map(|(k, r)| (k.as_str(), r)))
        };
        assert_eq!(text.as_bytes(), full);
    }

    #[tokio::test]
    async fn second_open_of_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = JsonStore::open(dir.path()).unwrap();
        let err = JsonStore::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = JsonStore::open(dir.path()).unwrap();
            let claims: Vec<_> = (0..200)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(
                        async move { store.claim(&format!("k{i}"), &format!("n{i}"), i).await },
                    )
                })
                .collect();
            for claim in claims {
                assert!(matches!(claim.await.unwrap().unwrap(), Claim::Claimed(_)));
            }
            // No flush: every claim must already be on disk when it returns.
            std::mem::forget(store);
        }
        let text = std::fs::read_to_string(dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        let on_disk = parse_domains(&text).unwrap();
        assert_eq!(on_disk.by_key.len(), 200);
    }

    /// The file a write joins from the per-record entries is byte for byte the file a full
    /// sort-and-format of every record gives, after claims, touches, imports and a failed
    /// (undone) claim, and the empty store's file too.
    #[tokio::test]
    async fn written_file_equals_a_full_rewrite() {
        let full = |store: &JsonStore| {
            let idx = store.lock();
            serialize_domains(idx.by_key.iter().map(|(k, r)| (k.as_str(), r)))
        };
        let mut empty = Vec::new();
        FileImage::default().write_to(&mut empty).unwrap();
        assert_eq!(empty, serialize_domains(std::iter::empty()));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DOMAINS_FILE_NAME), P0RT_FILE).unwrap();
        let store = JsonStore::open(dir.path()).unwrap();
        // Keys claimed out of order, so entries land before, between and after others.
        for i in [7u32, 3, 9, 0, 5, 1, 8, 2, 6, 4] {
            let key = format!("{:064x}", u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let claim = store
                .claim(&key, &format!("name-{i}"), 1_700_000_000 + i64::from(i))
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Claimed(_)));
        }
        let text = std::fs::read(dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            String::from_utf8(full(&store)).unwrap()
        );

        store.touch("abc123", 1_800_000_000).await.unwrap();
        store
            .import(&DomainRecord::claimed("0000", "imported-name", 5))
            .await
            .unwrap();
        store.flush().await.unwrap();
        let text = std::fs::read_to_string(dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        assert_eq!(text, String::from_utf8(full(&store)).unwrap());
        assert!(text.contains("\"use_count\": 43"), "{text}");
        assert!(text.contains("\"2027-01-15T08:00:00Z\""), "{text}");
        let reread = parse_domains(&text).unwrap();
        assert_eq!(reread.by_key.len(), 12);
        assert_eq!(reread.by_key, store.lock().by_key);
    }

    /// A store in `dir` with `n` records written whole, writing deltas from 8 records on.
    async fn store_with_deltas(dir: &Path, n: usize) -> Arc<JsonStore> {
        let mut store = JsonStore::open(dir).unwrap();
        Arc::get_mut(&mut store).unwrap().delta_min_records = 8;
        for i in 0..n {
            let record = DomainRecord::claimed(&format!("key{i:03}"), &format!("name{i}"), 1);
            store.import(&record).await.unwrap();
        }
        store.flush().await.unwrap();
        store
    }

    fn delta_path(dir: &Path) -> PathBuf {
        dir.join(DELTA_FILE_NAME)
    }

    /// A claim in a large store is durable in the delta file alone: a host that stops without
    /// a flush finds it on the next start, and so does `read_records`; the next flush writes
    /// `domains.json` whole (byte for byte a full rewrite) and drops the delta.
    #[tokio::test]
    async fn a_claim_in_the_delta_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_deltas(dir.path(), 64).await;
        assert!(!delta_path(dir.path()).exists());
        store.claim("new-key", "new-name", 5).await.unwrap();
        store.touch("key007", 9).await.unwrap();
        store.persist().await.unwrap();
        let domains = std::fs::read_to_string(dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        assert!(!domains.contains("new-name"), "written whole");
        let delta = std::fs::read_to_string(delta_path(dir.path())).unwrap();
        assert!(
            delta.contains("new-name") && delta.contains("key007"),
            "{delta}"
        );
        assert!(!delta.contains("key008"), "only changed records: {delta}");
        drop(store); // no flush: as a crash leaves it

        let records = read_records(&dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        assert_eq!(records.len(), 65);
        let store = JsonStore::open(dir.path()).unwrap();
        let rec = store.record_for_key("new-key").await.unwrap().unwrap();
        assert_eq!((rec.domain.as_str(), rec.first_seen), ("new-name", 5));
        let touched = store.record_for_key("key007").await.unwrap().unwrap();
        assert_eq!((touched.last_seen, touched.use_count), (9, 2));
        assert_eq!(
            store.owner_of("new-name").await.unwrap().as_deref(),
            Some("new-key")
        );
        assert!(matches!(
            store.claim("other-key", "new-name", 6).await.unwrap(),
            Claim::Taken
        ));

        store.flush().await.unwrap();
        assert!(!delta_path(dir.path()).exists());
        let text = std::fs::read(dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        let idx = store.lock();
        assert_eq!(
            text,
            serialize_domains(idx.by_key.iter().map(|(k, r)| (k.as_str(), r)))
        );
    }

    /// Once the delta would hold more than one record in [`DELTA_MAX_SHARE`], the write is
    /// `domains.json` whole, and the delta goes.
    #[tokio::test]
    async fn a_large_delta_is_folded_into_a_whole_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_deltas(dir.path(), 32).await;
        let share = 32 / DELTA_MAX_SHARE;
        for i in 0..share {
            store
                .claim(&format!("new{i}"), &format!("new-name{i}"), 5)
                .await
                .unwrap();
            assert!(delta_path(dir.path()).exists());
        }
        store.claim("last", "last-name", 5).await.unwrap();
        assert!(!delta_path(dir.path()).exists());
        let domains = std::fs::read_to_string(dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        assert!(domains.contains("new-name0") && domains.contains("last-name"));
    }

    /// A delta is applied only to the `domains.json` whose hash it names; one left over from
    /// before a later whole write is ignored. A delta that cannot be read, or that binds a
    /// name to two keys, stops the store from opening, and nothing is rewritten.
    #[tokio::test]
    async fn a_delta_applies_only_to_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        drop(store_with_deltas(dir.path(), 16).await);
        let domains = std::fs::read(dir.path().join(DOMAINS_FILE_NAME)).unwrap();
        let base = hex::encode(Sha256::digest(&domains));
        let delta = |base: &str, key: &str, domain: &str| {
            format!(
                r#"{{"base_sha256":"{base}","records":{{"{key}":{{"domain":"{domain}","ssh_key_hash":"{key}","first_seen":"2024-01-01T00:00:00Z","last_seen":"2024-01-01T00:00:00Z","use_count":1}}}}}}"#
            )
        };

        // The store as it opens with `text` in the delta file.
        let open_with_delta = |text: String| {
            std::fs::write(delta_path(dir.path()), text).unwrap();
            JsonStore::open(dir.path()).unwrap()
        };

        let store = open_with_delta(delta(&"0".repeat(64), "ghost", "ghost-name"));
        assert!(
            store.record_for_key("ghost").await.unwrap().is_none(),
            "stale delta ignored"
        );
        drop(store);

        let store = open_with_delta(delta(&base, "ghost", "ghost-name"));
        assert!(
            store.record_for_key("ghost").await.unwrap().is_some(),
            "own delta applied"
        );
        drop(store);

        // key003 renamed by the delta: its old name is free again, the new one is its own.
        let store = open_with_delta(delta(&base, "key003", "renamed"));
        assert_eq!(
            store.owner_of("renamed").await.unwrap().as_deref(),
            Some("key003")
        );
        assert!(store.owner_of("name3").await.unwrap().is_none());
        drop(store);

        for bad in [
            delta(&base, "key004", "name5"), // name5 belongs to key005
            "{not json".to_string(),
            r#"{"base_sha256":"00","records":{},"extra":1}"#.to_string(),
        ] {
            std::fs::write(delta_path(dir.path()), &bad).unwrap();
            let err = JsonStore::open(dir.path()).err().unwrap();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{bad}: {err}");
            assert!(read_records(&dir.path().join(DOMAINS_FILE_NAME)).is_err());
            assert_eq!(
                std::fs::read_to_string(delta_path(dir.path())).unwrap(),
                bad
            );
            assert_eq!(
                std::fs::read(dir.path().join(DOMAINS_FILE_NAME)).unwrap(),
                domains
            );
        }
    }

    #[tokio::test]
    async fn touches_are_flushed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = JsonStore::open(dir.path()).unwrap();
            store.claim("k", "n", 100).await.unwrap();
            store.touch("k", 200).await.unwrap();
            store.flush().await.unwrap();
        }
        let store = JsonStore::open(dir.path()).unwrap();
        let rec = store.record_for_key("k").await.unwrap().unwrap();
        assert_eq!((rec.last_seen, rec.use_count), (200, 2));
    }
}
