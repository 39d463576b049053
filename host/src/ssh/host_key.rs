//! The SSH host key: loaded from a file or the environment, generated once if missing.

use std::path::Path;

use russh::keys::PrivateKey;

use crate::config::HostKeySource;

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error(
        "cannot load SSH host key {path}: {detail}. Fix or remove the file \
         (a new key is generated only when none exists)"
    )]
    Load { path: String, detail: String },
    #[error("cannot write new SSH host key {path}: {detail}")]
    Write { path: String, detail: String },
    #[error("SSH_HOST_KEY holds key text that cannot be parsed: {0}")]
    Inline(String),
}

/// Loads the host key, generating an ed25519 key once if the file does not exist.
/// An existing file that cannot be read is an error, never silently replaced.
pub fn load_or_create_host_key(source: &HostKeySource) -> Result<PrivateKey, HostKeyError> {
    match source {
        HostKeySource::Inline(text) => {
            PrivateKey::from_openssh(text.expose()).map_err(|e| HostKeyError::Inline(e.to_string()))
        }
        HostKeySource::File(path) if path.exists() => {
            let key = russh::keys::load_secret_key(path, None).map_err(|e| HostKeyError::Load {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
            tracing::info!(
                "loaded SSH host key {} ({})",
                path.display(),
                key.public_key().fingerprint(russh::keys::HashAlg::Sha256)
            );
            Ok(key)
        }
        HostKeySource::File(path) => generate_host_key(path),
    }
}

fn generate_host_key(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let err = |detail: String| HostKeyError::Write {
        path: path.display().to_string(),
        detail,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let seed: [u8; 32] = rand::random();
    let keypair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(keypair);
    key.write_openssh_file(path, russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| err(e.to_string()))?;
    tracing::info!(
        "generated SSH host key {} ({}); it is reused on every start",
        path.display(),
        key.public_key().fingerprint(russh::keys::HashAlg::Sha256)
    );
    Ok(key)
}
