//! Plugin files: the bundled reference plugins, `*.wasm` files in the plugins directory and
//! their `.json` sidecars. Everything here does blocking file I/O: call it off the async
//! runtime (`spawn_blocking`), as the plugin set does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;

use super::runtime::{self, Origin, PluginSpec};
use super::{PluginError, Role};

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
pub fn bundled() -> [(&'static str, &'static [u8]); 4] {
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
            "access",
            include_bytes!(concat!(env!("P0RT_BUNDLED_PLUGINS"), "/access.wasm")),
        ),
        (
            "scan-guard",
            include_bytes!(concat!(env!("P0RT_BUNDLED_PLUGINS"), "/scan_guard.wasm")),
        ),
    ]
}

/// The bundled plugin of this name, if any.
fn bundled_bytes(name: &str) -> Option<&'static [u8]> {
    bundled()
        .into_iter()
        .find_map(|(bundled, bytes)| (bundled == name).then_some(bytes))
}

/// True for `<dir>/<bundled name>.wasm` when only its sidecar exists: the operator
/// configures a bundled plugin with `<name>.json` alone (no copy of the wasm needed).
fn configures_bundled(path: &Path) -> bool {
    let bundled = path
        .file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|stem| bundled_bytes(stem).is_some());
    bundled && !path.exists() && path.with_extension("json").is_file()
}

/// Reads `<dir>/<stem>.wasm` and its optional sidecar into a load spec. A sidecar named
/// like a bundled plugin without a `.wasm` beside it configures that bundled plugin.
pub fn read_plugin_file(path: &Path) -> Result<PluginSpec, PluginError> {
    let read_err = |detail: String| PluginError::Read {
        path: path.to_path_buf(),
        detail,
    };
    let sidecar_path = path.with_extension("json");
    let (bytes, origin) = if configures_bundled(path) {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let bytes = bundled_bytes(stem).unwrap_or_default().to_vec();
        (bytes, Origin::File(sidecar_path.clone()))
    } else {
        let size = std::fs::metadata(path)
            .map_err(|e| read_err(e.to_string()))?
            .len();
        if size > runtime::MAX_PLUGIN_BYTES as u64 {
            return Err(PluginError::TooLarge {
                size: size as usize,
            });
        }
        let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
        (bytes, Origin::File(path.to_path_buf()))
    };
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
        origin,
        role: sidecar.role,
        config: sidecar
            .config
            .map(|c| c.to_string())
            .unwrap_or_else(|| "{}".to_string()),
    })
}

/// The `*.wasm` files directly inside `dir`, sorted, and `<bundled name>.wasm` for each
/// sidecar that configures a bundled plugin (see [`read_plugin_file`]).
pub fn plugin_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
        .collect();
    files.extend(
        bundled()
            .into_iter()
            .map(|(name, _)| dir.join(format!("{name}.wasm")))
            .filter(|p| configures_bundled(p)),
    );
    files.sort();
    files
}

/// A file's state on disk (size, mtime, inode), of the plugin and of its sidecar: a file
/// whose stamp has not changed is not read (nor reported) again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileStamp {
    wasm: Option<(u64, Option<SystemTime>, u64)>,
    sidecar: Option<(u64, Option<SystemTime>, u64)>,
}

impl FileStamp {
    fn of(path: &Path) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        let stat = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().ok(), m.ino()))
        };
        FileStamp {
            wasm: stat(path),
            sidecar: stat(&path.with_extension("json")),
        }
    }
}

/// One plugin file found by [`scan`]: its stamp and, if it changed since `known`, what
/// reading it gave.
pub type Scanned = (PathBuf, FileStamp, Option<Result<PluginSpec, PluginError>>);

/// The plugin files in `dir`; files whose stamp matches `known` are not read.
pub fn scan(dir: Option<&Path>, known: &BTreeMap<PathBuf, FileStamp>) -> Vec<Scanned> {
    let paths = dir.map(plugin_files).unwrap_or_default();
    paths
        .into_iter()
        .map(|path| {
            let stamp = FileStamp::of(&path);
            let read = (known.get(&path) != Some(&stamp)).then(|| read_plugin_file(&path));
            (path, stamp, read)
        })
        .collect()
}
