//! Which public keys may connect: any (open access), or those in an OpenSSH
//! `authorized_keys` file. The file is parsed once and re-read only when it changes (size,
//! modification time or inode), off the async runtime, so a login costs one `stat`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use russh::keys::PublicKey;
use russh::keys::ssh_key::public::KeyData;

/// What identifies one version of the file.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Version {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

/// The parsed file, as of `version`; `None` when it could not be read.
struct Loaded {
    version: Version,
    keys: Option<Arc<Vec<KeyData>>>,
}

/// The key access rule of the SSH edge.
pub struct KeyAccess {
    file: Option<PathBuf>,
    loaded: Mutex<Option<Loaded>>,
    last_problem: Mutex<Option<String>>,
}

impl KeyAccess {
    /// `None`: any key may connect.
    pub fn new(file: Option<PathBuf>) -> KeyAccess {
        KeyAccess {
            file,
            loaded: Mutex::new(None),
            last_problem: Mutex::new(None),
        }
    }

    /// True if `key` may connect. An unreadable file refuses every key until it is fixed.
    pub async fn allows(&self, key: &PublicKey) -> bool {
        match self.current_keys().await {
            Ok(None) => true,
            Ok(Some(keys)) => keys.iter().any(|k| k == key.key_data()),
            Err(()) => false,
        }
    }

    /// The allowed keys (`None`: open access); re-read when the file changed.
    async fn current_keys(&self) -> Result<Option<Arc<Vec<KeyData>>>, ()> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let version = match tokio::fs::metadata(path).await {
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                Version {
                    len: meta.len(),
                    modified: meta.modified().ok(),
                    inode: meta.ino(),
                }
            }
            Err(e) => {
                self.report_once(format!(
                    "cannot read authorized keys file {}: {e}",
                    path.display()
                ));
                return Err(());
            }
        };
        if let Some(loaded) = &*self.lock()
            && loaded.version == version
        {
            return loaded.keys.clone().map(Some).ok_or(());
        }
        let file = path.clone();
        let parsed = tokio::task::spawn_blocking(move || {
            russh::keys::ssh_key::AuthorizedKeys::read_file(&file).map(|entries| {
                entries
                    .iter()
                    .map(|e| e.public_key().key_data().clone())
                    .collect()
            })
        })
        .await;
        let keys = match parsed {
            Ok(Ok(keys)) => {
                *self.last_problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(
                    "authorized keys: {} keys from {}",
                    Vec::len(&keys),
                    path.display()
                );
                Some(Arc::new(keys))
            }
            Ok(Err(e)) => {
                self.report_once(format!(
                    "cannot read authorized keys file {}: {e}",
                    path.display()
                ));
                None
            }
            Err(e) => {
                tracing::error!("reading authorized keys failed: {e}");
                None
            }
        };
        *self.lock() = Some(Loaded {
            version,
            keys: keys.clone(),
        });
        keys.map(Some).ok_or(())
    }

    /// Logs a problem with the file once until it changes, not once per login.
    fn report_once(&self, problem: String) {
        let mut last = self.last_problem.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() != Some(problem.as_str()) {
            tracing::error!("{problem}; refusing all keys until it is fixed");
            *last = Some(problem);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Loaded>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use russh::keys::PrivateKey;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    use super::*;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn line(key: &PrivateKey) -> String {
        format!("{}\n", key.public_key().to_openssh().unwrap())
    }

    #[tokio::test]
    async fn open_access_allows_any_key() {
        assert!(KeyAccess::new(None).allows(key(1).public_key()).await);
    }

    #[tokio::test]
    async fn the_file_is_reread_when_it_changes_and_a_broken_file_refuses_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        let (alice, bob) = (key(1), key(2));
        std::fs::write(&path, line(&alice)).unwrap();
        let access = KeyAccess::new(Some(path.clone()));
        assert!(access.allows(alice.public_key()).await);
        assert!(!access.allows(bob.public_key()).await);

        // An edit (here: a longer file) is seen at the next login, without a restart.
        std::fs::write(&path, line(&alice) + &line(&bob)).unwrap();
        assert!(access.allows(bob.public_key()).await);

        // A file that does not parse refuses everyone, including keys allowed before.
        std::fs::write(&path, "this is not a key line at all\n").unwrap();
        assert!(!access.allows(alice.public_key()).await);
        // A missing file too.
        std::fs::remove_file(&path).unwrap();
        assert!(!access.allows(alice.public_key()).await);
        std::fs::write(&path, line(&alice)).unwrap();
        assert!(access.allows(alice.public_key()).await);
    }
}
