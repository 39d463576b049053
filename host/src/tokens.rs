//! Per-key API tokens: `ssh … token` prints a new one (replacing the key's previous token),
//! `ssh … token --revoke` removes it. Only the SHA-256 of a token is stored, so a leaked
//! store file or Redis dump grants nothing. Stored in Redis when the host uses Redis (every
//! host then accepts it), else in `api-tokens.json` in the data directory.
//!
//! Redis keys, under the configured prefix: `token:{sha256}` → key hash, and
//! `token:key:{key hash}` → sha256 (to find the token to replace or revoke).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::Secret;
use crate::names::KeyHash;
use crate::redis_link::RedisLink;

/// Name of the token file in the data directory (JSON store).
pub const TOKEN_FILE_NAME: &str = "api-tokens.json";
/// What every token starts with, so it is recognisable in a secrets scanner.
pub const TOKEN_PREFIX: &str = "p0rt_";
/// Time budget of each token command in Redis.
pub const TOKEN_OP_TIMEOUT: Duration = Duration::from_millis(1000);
/// Longest `Authorization` token looked at (a real one is 69 characters).
pub const MAX_TOKEN_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token store {path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("token store unavailable: {0}; try again shortly")]
    Unavailable(String),
}

enum Backend {
    File {
        path: PathBuf,
        /// sha256 hex → key hash.
        tokens: tokio::sync::Mutex<HashMap<String, String>>,
    },
    Redis {
        link: Arc<RedisLink>,
        prefix: String,
    },
}

pub struct TokenStore {
    backend: Backend,
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl TokenStore {
    /// The file store in `data_dir`; an unreadable file is an error (never overwritten).
    pub fn open_file(data_dir: &std::path::Path) -> Result<TokenStore, TokenError> {
        let path = data_dir.join(TOKEN_FILE_NAME);
        let tokens = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TokenError::File {
                path: path.clone(),
                detail: format!(
                    "{e}; the file was left untouched: repair or delete it (tokens are then \
                     issued again with `ssh … token`)"
                ),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                return Err(TokenError::File {
                    path,
                    detail: e.to_string(),
                });
            }
        };
        Ok(TokenStore {
            backend: Backend::File {
                path,
                tokens: tokio::sync::Mutex::new(tokens),
            },
        })
    }

    pub fn redis(link: Arc<RedisLink>, prefix: &str) -> TokenStore {
        TokenStore {
            backend: Backend::Redis {
                link,
                prefix: prefix.to_string(),
            },
        }
    }

    /// A new token for `key`; the key's previous token stops working.
    pub async fn issue(&self, key: &KeyHash) -> Result<Secret, TokenError> {
        let bytes: [u8; 32] = rand::random();
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
        let hash = digest(&token);
        match &self.backend {
            Backend::File { path, tokens } => {
                let mut tokens = tokens.lock().await;
                let mut next = tokens.clone();
                next.retain(|_, owner| owner != key.as_str());
                next.insert(hash, key.to_string());
                write_file(path, &next).await?;
                *tokens = next;
            }
            Backend::Redis { link, prefix } => {
                self.revoke_redis(link, prefix, key).await?;
                let by_key = format!("{prefix}token:key:{key}");
                let by_hash = format!("{prefix}token:{hash}");
                query::<()>(link, redis::cmd("SET").arg(&by_hash).arg(key.as_str())).await?;
                query::<()>(link, redis::cmd("SET").arg(&by_key).arg(&hash)).await?;
            }
        }
        Ok(Secret::new(token))
    }

    /// Removes the key's token; `false` if it had none.
    pub async fn revoke(&self, key: &KeyHash) -> Result<bool, TokenError> {
        match &self.backend {
            Backend::File { path, tokens } => {
                let mut tokens = tokens.lock().await;
                let mut next = tokens.clone();
                next.retain(|_, owner| owner != key.as_str());
                if next.len() == tokens.len() {
                    return Ok(false);
                }
                write_file(path, &next).await?;
                *tokens = next;
                Ok(true)
            }
            Backend::Redis { link, prefix } => self.revoke_redis(link, prefix, key).await,
        }
    }

    async fn revoke_redis(
        &self,
        link: &Arc<RedisLink>,
        prefix: &str,
        key: &KeyHash,
    ) -> Result<bool, TokenError> {
        let by_key = format!("{prefix}token:key:{key}");
        let old: Option<String> = query(link, redis::cmd("GET").arg(&by_key)).await?;
        let Some(old) = old else {
            return Ok(false);
        };
        query::<()>(link, redis::cmd("DEL").arg(format!("{prefix}token:{old}"))).await?;
        query::<()>(link, redis::cmd("DEL").arg(&by_key)).await?;
        Ok(true)
    }

    /// The key a presented token belongs to.
    pub async fn key_for(&self, token: &str) -> Result<Option<KeyHash>, TokenError> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() > MAX_TOKEN_LEN {
            return Ok(None);
        }
        let hash = digest(token);
        match &self.backend {
            Backend::File { tokens, .. } => Ok(tokens
                .lock()
                .await
                .get(&hash)
                .cloned()
                .map(KeyHash::from_stored)),
            Backend::Redis { link, prefix } => {
                let owner: Option<String> =
                    query(link, redis::cmd("GET").arg(format!("{prefix}token:{hash}"))).await?;
                Ok(owner.map(KeyHash::from_stored))
            }
        }
    }
}

async fn query<T: redis::FromRedisValue>(
    link: &Arc<RedisLink>,
    cmd: &redis::Cmd,
) -> Result<T, TokenError> {
    link.query(cmd, TOKEN_OP_TIMEOUT)
        .await
        .map_err(|e| TokenError::Unavailable(e.to_string()))
}

/// Temp file + fsync + rename, so the file is whole or as before.
async fn write_file(
    path: &std::path::Path,
    tokens: &HashMap<String, String>,
) -> Result<(), TokenError> {
    let fail = |e: std::io::Error| TokenError::File {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let text = serde_json::to_vec_pretty(tokens).unwrap_or_default();
    let temp = path.with_extension("json.tmp");
    let (temp2, path2) = (temp.clone(), path.to_path_buf());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Only hashes are stored, but nobody else needs to read them either.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp2)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&temp2, &path2)
    })
    .await
    .map_err(|e| fail(std::io::Error::other(e)))?
    .map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_token_replaces_the_old_and_revoke_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open_file(dir.path()).unwrap();
        let key = KeyHash::from_stored("a".repeat(64));
        let first = store.issue(&key).await.unwrap();
        assert_eq!(
            store.key_for(first.expose()).await.unwrap(),
            Some(key.clone())
        );
        let second = store.issue(&key).await.unwrap();
        assert_eq!(store.key_for(first.expose()).await.unwrap(), None);
        // Survives a restart; only the hash is on disk.
        let text = std::fs::read_to_string(dir.path().join(TOKEN_FILE_NAME)).unwrap();
        assert!(!text.contains(second.expose()));
        let reopened = TokenStore::open_file(dir.path()).unwrap();
        assert_eq!(
            reopened.key_for(second.expose()).await.unwrap(),
            Some(key.clone())
        );
        assert!(reopened.revoke(&key).await.unwrap());
        assert!(!reopened.revoke(&key).await.unwrap());
        assert_eq!(reopened.key_for(second.expose()).await.unwrap(), None);
        assert_eq!(reopened.key_for("p0rt_nonsense").await.unwrap(), None);
    }

    #[test]
    fn a_corrupt_token_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE_NAME), b"{not json").unwrap();
        assert!(TokenStore::open_file(dir.path()).is_err());
        assert_eq!(
            std::fs::read(dir.path().join(TOKEN_FILE_NAME)).unwrap(),
            b"{not json"
        );
    }
}
