//! `reservations.json` in the data directory, exactly P0rt's file: a JSON array of
//! `{domain, fingerprint, created_at, updated_at, comment}` (times RFC 3339, `comment` left
//! out when empty), written with two-space indents.
//!
//! The host only reads it, and re-reads it as soon as it changes (each lookup compares the
//! file's identity, a `stat`), so `p0rt reservation add|remove`, or an operator's edit, take
//! effect without a restart. A change that cannot be read is logged and the reservations
//! read before stay in force; at startup an unreadable file stops the host, naming it.
//!
//! Changes (the CLI) take `reservations.lock` beside it, read the file afresh, refuse to touch
//! one they cannot read, and write temp file + fsync + rename + fsync(dir). Records are
//! written back as they were read (unknown fields, time strings and order kept), unlike
//! P0rt, which loses comments and times on every save.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{Added, Holder, Reservation, ReservationError, Reservations};
use crate::names::TunnelName;
use crate::store::Import;

/// File name in the data directory (P0rt's).
pub const RESERVATIONS_FILE_NAME: &str = "reservations.json";
/// Lock file taken by writers (never by the host, which only reads).
pub const RESERVATIONS_LOCK_NAME: &str = "reservations.lock";

/// The file parsed, with indexes both ways (names lowercase).
#[derive(Default)]
struct Index {
    records: Vec<Reservation>,
    by_name: HashMap<String, String>,
    by_fingerprint: HashMap<String, TunnelName>,
}

/// What identifies one version of the file: a rename gives a new inode, an edit in place a
/// new mtime or size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

struct State {
    index: Index,
    /// The version `index` was read from (`None`: no file).
    seen: Option<FileId>,
    /// The last version that could not be read (logged once).
    refused: Option<FileId>,
}

pub struct JsonReservations {
    path: PathBuf,
    dir: PathBuf,
    state: Mutex<State>,
    handover: AtomicBool,
}

fn file_id(path: &Path) -> std::io::Result<Option<FileId>> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&meta);
            #[cfg(not(unix))]
            let inode = 0;
            Ok(Some(FileId {
                inode,
                len: meta.len(),
                modified: meta.modified().ok(),
            }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses the file's text, rejecting anything that is not P0rt's shape or that would make a
/// name's holder ambiguous.
fn parse(text: &str) -> Result<Index, String> {
    if text.trim().is_empty() {
        return Err("the file is empty (a truncated write?)".into());
    }
    // `null` is what Go reads as no reservations.
    let records: Option<Vec<Reservation>> = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON array of reservations ({e})"))?;
    let mut index = Index::default();
    for (i, record) in records.unwrap_or_default().into_iter().enumerate() {
        let name = record
            .name()
            .map_err(|e| format!("reservation {}: {e}", i + 1))?;
        if let Some(holder) = index.by_name.get(name.as_str()) {
            if holder != &record.fingerprint {
                return Err(format!(
                    "{name} is reserved twice, for {holder} and for {}",
                    record.fingerprint
                ));
            }
        } else if let Some(other) = index.by_fingerprint.get(&record.fingerprint) {
            return Err(format!(
                "key {} holds two reservations ({other} and {name}); a key holds one",
                record.fingerprint
            ));
        }
        index
            .by_name
            .insert(name.to_string(), record.fingerprint.clone());
        index
            .by_fingerprint
            .insert(record.fingerprint.clone(), name);
        index.records.push(record);
    }
    Ok(index)
}

/// The file as P0rt writes it (`json.MarshalIndent(…, "", "  ")`).
fn serialize(records: &[Reservation]) -> Vec<u8> {
    serde_json::to_vec_pretty(records).unwrap_or_else(|_| b"[]".to_vec())
}

/// Reads and parses the file; a missing file is no reservations.
fn read(path: &Path) -> Result<(Index, Option<FileId>), ReservationError> {
    let io = |source| ReservationError::Io {
        path: path.to_path_buf(),
        source,
    };
    let id = file_id(path).map_err(io)?;
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Index::default(), None));
        }
        Err(e) => return Err(io(e)),
    };
    let corrupt = |detail| ReservationError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let text =
        String::from_utf8(bytes).map_err(|_| corrupt("the file is not UTF-8 text".into()))?;
    Ok((parse(&text).map_err(corrupt)?, id))
}

impl JsonReservations {
    /// Reads `<dir>/reservations.json` (none yet is fine); an unreadable file is an error
    /// naming it, and is left as it is.
    pub fn open(dir: &Path) -> Result<JsonReservations, ReservationError> {
        let path = dir.join(RESERVATIONS_FILE_NAME);
        let (index, seen) = read(&path)?;
        Ok(JsonReservations {
            path,
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                index,
                seen,
                refused: None,
            }),
            handover: AtomicBool::new(true),
        })
    }

    /// Number of reservations held.
    pub fn len(&self) -> usize {
        self.lock().index.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update replaces the whole index at once, so a poisoned lock is still whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, re-read first if the file changed since it was read.
    fn current(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        let id = match file_id(&self.path) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("cannot check {}: {e}", self.path.display());
                return state;
            }
        };
        if id == state.seen || (id.is_some() && id == state.refused) {
            return state;
        }
        match read(&self.path) {
            Ok((index, seen)) => {
                tracing::info!(
                    "{} changed: {} reservations",
                    self.path.display(),
                    index.records.len()
                );
                state.index = index;
                state.seen = seen;
                state.refused = None;
            }
            Err(e) => {
                tracing::error!(
                    "{e}. The {} reservations read before stay in force",
                    state.index.records.len()
                );
                state.refused = id;
            }
        }
        state
    }

    /// Runs a change under the writers' lock, on the file as it is now; writes the records
    /// `change` returns, if any.
    fn change<T>(
        &self,
        change: impl FnOnce(&Index) -> Result<(T, Option<Vec<Reservation>>), ReservationError>,
    ) -> Result<T, ReservationError> {
        let lock_path = self.dir.join(RESERVATIONS_LOCK_NAME);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReservationError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        // Always from disk: other writers, or an operator's editor, may have changed it.
        let (index, _) = read(&self.path)?;
        let (answer, records) = change(&index)?;
        if let Some(records) = records {
            let bytes = serialize(&records);
            crate::store::json::write_atomically(&self.path, &self.dir, &bytes)
                .map_err(io(&self.path))?;
            let (index, seen) = read(&self.path)?;
            let mut state = self.lock();
            state.index = index;
            state.seen = seen;
            state.refused = None;
        }
        drop(lock);
        Ok(answer)
    }
}

#[async_trait]
impl Reservations for JsonReservations {
    async fn name_for(&self, fingerprint: &str) -> Result<Option<TunnelName>, ReservationError> {
        if !self.handover.load(Ordering::Relaxed) {
            return Ok(None);
        }
        Ok(self
            .current()
            .index
            .by_fingerprint
            .get(fingerprint)
            .cloned())
    }

    async fn holder_of(&self, name: &str) -> Result<Option<Holder>, ReservationError> {
        Ok(self
            .current()
            .index
            .by_name
            .get(name)
            .map(|f| Holder::Fingerprint(f.clone())))
    }

    async fn list(&self) -> Result<Vec<Reservation>, ReservationError> {
        Ok(self.current().index.records.clone())
    }

    async fn add(
        &self,
        name: &TunnelName,
        fingerprint: &str,
        comment: Option<&str>,
    ) -> Result<Added, ReservationError> {
        self.change(|index| {
            if let Some(holder) = index.by_name.get(name.as_str()) {
                if holder != fingerprint {
                    return Err(ReservationError::Conflict(format!(
                        "{name} is already reserved for another key ({holder}); remove that \
                         reservation first"
                    )));
                }
                let mut records = index.records.clone();
                let mut renewed = None;
                for record in records.iter_mut() {
                    if record.domain.eq_ignore_ascii_case(name.as_str()) {
                        *record = record.renewed(comment);
                        renewed.get_or_insert_with(|| record.clone());
                    }
                }
                let renewed =
                    renewed.unwrap_or_else(|| Reservation::new(name, fingerprint, comment));
                return Ok((Added::Renewed(renewed), Some(records)));
            }
            if let Some(other) = index.by_fingerprint.get(fingerprint) {
                return Err(ReservationError::Conflict(format!(
                    "key {fingerprint} already holds the reservation {other}; a key holds one \
                     reserved name: remove {other} first"
                )));
            }
            let record = Reservation::new(name, fingerprint, comment);
            let mut records = index.records.clone();
            records.push(record.clone());
            Ok((Added::Created(record), Some(records)))
        })
    }

    async fn import(&self, record: &Reservation) -> Result<Import, ReservationError> {
        let (name, copy) = match super::importable(record) {
            Ok(ready) => ready,
            Err(refused) => return Ok(refused),
        };
        self.change(|index| {
            let fingerprint = &copy.fingerprint;
            match index.by_name.get(name.as_str()) {
                Some(holder) if holder == fingerprint => return Ok((Import::AlreadyPresent, None)),
                Some(holder) => {
                    return Ok((
                        Import::Conflict(format!(
                            "{name} is reserved for {holder} here and for {fingerprint} in the \
                             source; nothing changed"
                        )),
                        None,
                    ));
                }
                None => {}
            }
            if let Some(other) = index.by_fingerprint.get(fingerprint) {
                return Ok((
                    Import::Conflict(format!(
                        "key {fingerprint} holds the reservation {other} here and {name} in the \
                         source; nothing changed"
                    )),
                    None,
                ));
            }
            let mut records = index.records.clone();
            records.push(copy.clone());
            Ok((Import::Imported, Some(records)))
        })
    }

    async fn remove(&self, name: &TunnelName) -> Result<Option<Reservation>, ReservationError> {
        self.change(|index| {
            let (removed, kept): (Vec<Reservation>, Vec<Reservation>) = index
                .records
                .iter()
                .cloned()
                .partition(|r| r.domain.eq_ignore_ascii_case(name.as_str()));
            match removed.into_iter().next() {
                Some(first) => Ok((Some(first), Some(kept))),
                None => Ok((None, None)),
            }
        })
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn set_handover(&self, on: bool) {
        self.handover.store(on, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_text(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    const FP_A: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
    const FP_B: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

    /// What P0rt's `save` writes (`json.MarshalIndent(reservations, "", "  ")` of its
    /// `Reservation` struct: Go times in RFC 3339 with nanoseconds and the local offset,
    /// `comment` omitted when empty), plus a record with a comment as its API writes it.
    fn p0rt_file() -> String {
        format!(
            r#"[
  {{
    "domain": "happy-cat-jump",
    "fingerprint": "{FP_A}",
    "created_at": "2025-01-15T10:30:00.123456789+01:00",
    "updated_at": "2025-01-15T10:30:00.123456789+01:00"
  }},
  {{
    "domain": "blue-fox-run",
    "fingerprint": "{FP_B}",
    "created_at": "2025-02-01T08:00:00Z",
    "updated_at": "2025-02-01T08:00:00Z",
    "comment": "Bob's demo"
  }}
]"#
        )
    }

    fn name(n: &str) -> TunnelName {
        TunnelName::parse(n).unwrap()
    }

    #[tokio::test]
    async fn reads_p0rt_file_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESERVATIONS_FILE_NAME), p0rt_file()).unwrap();
        let r = JsonReservations::open(dir.path()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.name_for(FP_A).await.unwrap(),
            Some(name("happy-cat-jump"))
        );
        assert_eq!(
            r.holder_of("blue-fox-run").await.unwrap(),
            Some(Holder::Fingerprint(FP_B.into()))
        );
        assert_eq!(r.holder_of("other-name").await.unwrap(), None);
        assert_eq!(r.name_for("SHA256:nobody").await.unwrap(), None);
        let list = r.list().await.unwrap();
        assert_eq!(list[1].comment.as_deref(), Some("Bob's demo"));
    }

    #[tokio::test]
    async fn writes_back_p0rt_shape_keeping_what_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESERVATIONS_FILE_NAME);
        std::fs::write(&path, p0rt_file()).unwrap();
        let r = JsonReservations::open(dir.path()).unwrap();
        // Adding and removing a third name leaves the file byte for byte as P0rt wrote it.
        let fp_c = "SHA256:2tFIlTIa4oMrs3BKDY7QEaRb1rN3G5TztBR9KQ0Q1aU";
        assert!(matches!(
            r.add(&name("new-name-here"), fp_c, Some("c"))
                .await
                .unwrap(),
            Added::Created(_)
        ));
        assert!(r.remove(&name("new-name-here")).await.unwrap().is_some());
        assert_eq!(read_text(&path), p0rt_file());

        // What is written parses as P0rt's struct: the same fields, in Go's order.
        r.add(&name("new-name-here"), fp_c, None).await.unwrap();
        let text = read_text(&path);
        let values: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let last = values[2].as_object().unwrap();
        let keys: Vec<&str> = last.keys().map(String::as_str).collect();
        let mut sorted = vec!["created_at", "domain", "fingerprint", "updated_at"];
        sorted.sort();
        assert_eq!(keys, sorted, "no comment field when there is none: {text}");
        let created = last["created_at"].as_str().unwrap();
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
            .unwrap();
        assert!(
            text.contains("\n  {\n    \"domain\": \"new-name-here\",\n    \"fingerprint\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn p0rt_rules_for_adding() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESERVATIONS_FILE_NAME), p0rt_file()).unwrap();
        let r = JsonReservations::open(dir.path()).unwrap();
        let e = r
            .add(&name("happy-cat-jump"), FP_B, None)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("already reserved for another key"),
            "{e}"
        );
        let e = r.add(&name("other-name"), FP_A, None).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("already holds the reservation happy-cat-jump"),
            "{e}"
        );
        // The same key again: renewed, creation time and comment kept.
        let Added::Renewed(renewed) = r.add(&name("blue-fox-run"), FP_B, None).await.unwrap()
        else {
            panic!("not a renewal")
        };
        assert_eq!(renewed.created_at.as_deref(), Some("2025-02-01T08:00:00Z"));
        assert_eq!(renewed.comment.as_deref(), Some("Bob's demo"));
        assert_ne!(renewed.updated_at.as_deref(), Some("2025-02-01T08:00:00Z"));
        assert_eq!(r.remove(&name("not-reserved")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn changes_by_another_writer_are_seen_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let host = JsonReservations::open(dir.path()).unwrap();
        let cli = JsonReservations::open(dir.path()).unwrap();
        assert_eq!(host.holder_of("happy-cat-jump").await.unwrap(), None);
        cli.add(&name("happy-cat-jump"), FP_A, None).await.unwrap();
        assert_eq!(
            host.name_for(FP_A).await.unwrap(),
            Some(name("happy-cat-jump"))
        );
        cli.remove(&name("happy-cat-jump")).await.unwrap();
        assert_eq!(host.name_for(FP_A).await.unwrap(), None);
    }

    #[tokio::test]
    async fn with_handover_off_names_are_kept_from_every_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESERVATIONS_FILE_NAME), p0rt_file()).unwrap();
        let r = JsonReservations::open(dir.path()).unwrap();
        r.set_handover(false);
        assert_eq!(r.name_for(FP_A).await.unwrap(), None);
        assert_eq!(
            r.holder_of("happy-cat-jump").await.unwrap(),
            Some(Holder::Fingerprint(FP_A.into()))
        );
    }

    #[tokio::test]
    async fn unknown_fields_and_capitals_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESERVATIONS_FILE_NAME);
        let text = format!(
            r#"[{{"domain":"Happy-Cat-Jump","fingerprint":"{FP_A}","created_at":"0001-01-01T00:00:00Z","updated_at":"0001-01-01T00:00:00Z","tier":"gold"}}]"#
        );
        std::fs::write(&path, &text).unwrap();
        let r = JsonReservations::open(dir.path()).unwrap();
        assert_eq!(
            r.holder_of("happy-cat-jump").await.unwrap(),
            Some(Holder::Fingerprint(FP_A.into()))
        );
        r.add(&name("blue-fox-run"), FP_B, None).await.unwrap();
        let written: Vec<serde_json::Value> = serde_json::from_str(&read_text(&path)).unwrap();
        assert_eq!(written[0]["domain"], "Happy-Cat-Jump");
        assert_eq!(written[0]["tier"], "gold");
        assert_eq!(written[0]["created_at"], "0001-01-01T00:00:00Z");
    }

    #[tokio::test]
    async fn corrupt_files_are_refused_and_untouched() {
        let dup = format!(
            r#"[{{"domain":"a-b-c","fingerprint":"{FP_A}"}},{{"domain":"a-b-c","fingerprint":"{FP_B}"}}]"#
        );
        let two = format!(
            r#"[{{"domain":"a-b-c","fingerprint":"{FP_A}"}},{{"domain":"d-e-f","fingerprint":"{FP_A}"}}]"#
        );
        for (bad, needle) in [
            ("", "empty"),
            ("[{\"domain\": \"a-b-c\"", "not a JSON array"),
            ("{\"a-b-c\": \"SHA256:x\"}", "not a JSON array"),
            (
                "[{\"domain\": 7, \"fingerprint\": \"x\"}]",
                "not a JSON array",
            ),
            (
                "[{\"domain\": \"a.b\", \"fingerprint\": \"x\"}]",
                "not a DNS label",
            ),
            (
                "[{\"domain\": \"a-b-c\", \"fingerprint\": \"x\", \"created_at\": \"soon\"}]",
                "RFC 3339",
            ),
            (&dup, "reserved twice"),
            (&two, "holds two reservations"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(RESERVATIONS_FILE_NAME);
            std::fs::write(&path, bad).unwrap();
            let err = JsonReservations::open(dir.path())
                .err()
                .expect(bad)
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{bad}: {err}");
            assert!(err.contains(needle), "{bad}: {err}");
            assert_eq!(read_text(&path), bad, "left untouched");
        }
    }

    #[tokio::test]
    async fn a_bad_edit_keeps_the_last_good_reservations_and_refuses_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESERVATIONS_FILE_NAME);
        std::fs::write(&path, p0rt_file()).unwrap();
        let r = JsonReservations::open(dir.path()).unwrap();
        std::fs::write(&path, "[{\"domain\": ").unwrap();
        assert_eq!(
            r.name_for(FP_A).await.unwrap(),
            Some(name("happy-cat-jump"))
        );
        let e = r
            .remove(&name("happy-cat-jump"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("left untouched"), "{e}");
        assert_eq!(read_text(&path), "[{\"domain\": ");
        // `null` is Go's empty list.
        std::fs::write(&path, "null").unwrap();
        assert_eq!(r.name_for(FP_A).await.unwrap(), None);
    }

    #[tokio::test]
    async fn import_copies_as_is_and_never_overwrites() {
        let from = tempfile::tempdir().unwrap();
        std::fs::write(from.path().join(RESERVATIONS_FILE_NAME), p0rt_file()).unwrap();
        let source = JsonReservations::open(from.path()).unwrap();
        let records = source.list().await.unwrap();

        let to = tempfile::tempdir().unwrap();
        let dest = JsonReservations::open(to.path()).unwrap();
        for record in &records {
            assert_eq!(dest.import(record).await.unwrap(), Import::Imported);
        }
        // Times, comment and unknown fields come across unchanged; a second run is a no-op.
        assert_eq!(dest.list().await.unwrap(), records);
        for record in &records {
            assert_eq!(dest.import(record).await.unwrap(), Import::AlreadyPresent);
        }

        // The name bound to another key, or the key to another name: reported, not written.
        let fp_c = "SHA256:2tFIlTIa4oMrs3BKDY7QEaRb1rN3G5TztBR9KQ0Q1aU";
        let other_key = Reservation::new(&name("happy-cat-jump"), fp_c, None);
        assert!(matches!(
            dest.import(&other_key).await.unwrap(),
            Import::Conflict(why) if why.contains("happy-cat-jump")
        ));
        let other_name = Reservation::new(&name("third-name-here"), FP_A, None);
        assert!(matches!(
            dest.import(&other_name).await.unwrap(),
            Import::Conflict(why) if why.contains(FP_A)
        ));
        let mut bad = other_key.clone();
        bad.domain = "not a label".into();
        assert!(matches!(
            dest.import(&bad).await.unwrap(),
            Import::Conflict(_)
        ));
        assert_eq!(dest.list().await.unwrap(), records);
    }
}
