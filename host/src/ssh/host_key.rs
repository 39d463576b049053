//! The SSH host keys: loaded from files or the environment, the ed25519 one generated once if
//! missing.
//!
//! A P0rt host has an RSA key (`./ssh_host_key`, PKCS#1 PEM, or the PEM text in
//! `SSH_HOST_KEY`); its users' `known_hosts` hold that key. p0rt serves such a key as
//! `rsa-sha2-512`/`rsa-sha2-256` (never SHA-1 `ssh-rsa`) and, beside it, the ed25519 key of
//! its data directory, so old clients keep matching and new ones get ed25519.

use std::io::Write;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKey};

use crate::config::{HOST_KEY_FILE_NAME, HostKeySource, P0RT_HOST_KEY_FILE};

/// Host key (and, in `server-sig-algs`, client signature) algorithms offered, most preferred
/// first: russh's defaults without `ssh-rsa`, whose signatures use SHA-1.
pub const KEY_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

/// Smallest RSA host key accepted, in bits (P0rt generates 2048-bit keys).
pub const MIN_RSA_BITS: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error(
        "cannot load SSH host key {path}: {detail}. Fix or remove the file \
         (a new key is generated only when none exists)"
    )]
    Load { path: String, detail: String },
    #[error("cannot write new SSH host key {path}: {detail}")]
    Write { path: String, detail: String },
    #[error("SSH_HOST_KEY (ssh.host_key) holds key text that cannot be used: {0}")]
    Inline(String),
}

/// Loads the host keys to serve, in order:
///
/// - the configured key (a file, loaded if present and generated as ed25519 if not; or the key
///   text itself), or, when none is configured, P0rt's `./ssh_host_key` if it exists;
/// - unless one of those is ed25519, `<data_dir>/ssh_host_ed25519_key`, generated once if
///   missing.
///
/// An existing file that cannot be read or parsed is an error, never silently replaced.
pub fn load_host_keys(
    source: &HostKeySource,
    data_dir: &Path,
) -> Result<Vec<PrivateKey>, HostKeyError> {
    load_host_keys_from(
        source,
        &data_dir.join(HOST_KEY_FILE_NAME),
        Path::new(P0RT_HOST_KEY_FILE),
    )
}

/// [`load_host_keys`] with the data directory's ed25519 key at `ed25519` and P0rt's key at
/// `p0rt_key`.
fn load_host_keys_from(
    source: &HostKeySource,
    ed25519: &Path,
    p0rt_key: &Path,
) -> Result<Vec<PrivateKey>, HostKeyError> {
    let mut keys = Vec::new();
    match source {
        HostKeySource::Inline(text) => {
            let key = russh::keys::decode_secret_key(text.expose().trim(), None)
                .map_err(|e| HostKeyError::Inline(describe(&e)))
                .and_then(|key| check(key).map_err(HostKeyError::Inline))?;
            log_served(
                "loaded SSH host key from SSH_HOST_KEY (ssh.host_key)",
                &key,
                "",
            );
            keys.push(key);
        }
        HostKeySource::File(path) => keys.push(load_or_generate(path)?),
        HostKeySource::Default => {
            if exists(p0rt_key)? {
                keys.push(load_file(p0rt_key)?);
            }
        }
    }
    let same_file = matches!(source, HostKeySource::File(path) if path == ed25519);
    if !same_file && !keys.iter().any(|k| k.algorithm() == Algorithm::Ed25519) {
        let key = load_or_generate(ed25519)?;
        if keys.iter().any(|k| served_as(k) == served_as(&key)) {
            tracing::warn!(
                "SSH host key {} is not served: it is not ed25519, and a {} key is served already",
                ed25519.display(),
                key.algorithm()
            );
        } else {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Whether a key file exists; a dangling symlink counts (it is never written through).
fn exists(path: &Path) -> Result<bool, HostKeyError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(HostKeyError::Load {
            path: path.display().to_string(),
            detail: e.to_string(),
        }),
    }
}

fn load_or_generate(path: &Path) -> Result<PrivateKey, HostKeyError> {
    if exists(path)? {
        load_file(path)
    } else {
        generate(path)
    }
}

/// Reads a key in OpenSSH, PKCS#1 (`BEGIN RSA PRIVATE KEY`), PKCS#8 (`BEGIN PRIVATE KEY`) or
/// SEC1 (`BEGIN EC PRIVATE KEY`) form.
fn load_file(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let err = |detail: String| HostKeyError::Load {
        path: path.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => {
            err("the file is not text (not a PEM or OpenSSH key)".into())
        }
        _ => err(e.to_string()),
    })?;
    let key = russh::keys::decode_secret_key(&text, None).map_err(|e| err(describe(&e)))?;
    let key = check(key).map_err(err)?;
    log_served(&format!("loaded SSH host key {}", path.display()), &key, "");
    Ok(key)
}

/// Refuses keys that cannot serve as a host key here.
fn check(key: PrivateKey) -> Result<PrivateKey, String> {
    if let Some(rsa) = key.key_data().rsa() {
        let bits = rsa.key_size();
        if bits < MIN_RSA_BITS {
            return Err(format!(
                "an RSA key of {bits} bits is too weak; at least {MIN_RSA_BITS} bits are needed"
            ));
        }
    }
    if served_as(&key).is_empty() {
        return Err(format!(
            "{} keys cannot be host keys; use ed25519, ECDSA or RSA",
            key.algorithm()
        ));
    }
    Ok(key)
}

/// A parse error as a sentence for the operator.
fn describe(e: &russh::keys::Error) -> String {
    use russh::keys::Error;
    match e {
        Error::CouldNotReadKey => "not a private key in OpenSSH, PKCS#1 (BEGIN RSA PRIVATE KEY) \
                                   or PKCS#8 (BEGIN PRIVATE KEY) PEM form"
            .into(),
        Error::KeyIsEncrypted => {
            "the key is encrypted; a host key must be stored without a passphrase".into()
        }
        other => format!("the key does not parse ({other})"),
    }
}

/// The algorithms `key` is offered under, most preferred first.
fn served_as(key: &PrivateKey) -> Vec<&'static Algorithm> {
    let algorithm = key.algorithm();
    KEY_ALGORITHMS
        .iter()
        .filter(|a| match a {
            Algorithm::Rsa { .. } => matches!(algorithm, Algorithm::Rsa { .. }),
            a => **a == algorithm,
        })
        .collect()
}

/// One startup line per served key: where it comes from, its fingerprint and algorithms.
fn log_served(what: &str, key: &PrivateKey, tail: &str) {
    let algorithms = served_as(key)
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let kind = match key.key_data().rsa() {
        Some(rsa) => format!("RSA {} bits as {algorithms}", rsa.key_size()),
        None => algorithms,
    };
    tracing::info!(
        "{what} ({}): {kind}{tail}",
        key.public_key().fingerprint(HashAlg::Sha256)
    );
}

/// Generates an ed25519 key at `path`: written whole (temp file, fsync, rename) and readable
/// by the owner only.
fn generate(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let err = |detail: String| HostKeyError::Write {
        path: path.display().to_string(),
        detail,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let seed: [u8; 32] = rand::random();
    let keypair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(keypair);
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| err(e.to_string()))?;
    write_private(path, text.as_bytes()).map_err(|e| err(e.to_string()))?;
    log_served(
        &format!("generated SSH host key {}", path.display()),
        &key,
        "; it is reused on every start",
    );
    Ok(key)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover from a crash may have other permissions: start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    /// Runs `ssh-keygen` to make a key of `kind` (`-t`, `-b`, `-m` arguments) at `path`.
    fn keygen(path: &Path, args: &[&str]) {
        let out = std::process::Command::new("ssh-keygen")
            .args(args)
            .args(["-N", "", "-q", "-f"])
            .arg(path)
            .output()
            .expect("run ssh-keygen");
        assert!(
            out.status.success(),
            "ssh-keygen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `SHA256:…` of a key file according to `ssh-keygen -l`.
    fn keygen_fingerprint(path: &Path) -> String {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(path)
            .output()
            .expect("run ssh-keygen -l");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    }

    fn fp(key: &PrivateKey) -> String {
        key.public_key().fingerprint(HashAlg::Sha256).to_string()
    }

    struct Dir {
        dir: tempfile::TempDir,
    }

    impl Dir {
        fn new() -> Dir {
            Dir {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn join(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn ed25519(&self) -> PathBuf {
            self.join("data").join(HOST_KEY_FILE_NAME)
        }
        fn load(&self, source: &HostKeySource) -> Result<Vec<PrivateKey>, HostKeyError> {
            load_host_keys_from(source, &self.ed25519(), &self.join(P0RT_HOST_KEY_FILE))
        }
    }

    #[test]
    fn rsa_in_every_format_is_served_with_sha2_beside_ed25519() {
        for (format, args, header) in [
            (
                "PKCS#1",
                &["-t", "rsa", "-b", "2048", "-m", "PEM"][..],
                "-----BEGIN RSA PRIVATE KEY-----",
            ),
            (
                "PKCS#8",
                &["-t", "rsa", "-b", "2048", "-m", "PKCS8"][..],
                "-----BEGIN PRIVATE KEY-----",
            ),
            (
                "OpenSSH",
                &["-t", "rsa", "-b", "3072"][..],
                "-----BEGIN OPENSSH PRIVATE KEY-----",
            ),
        ] {
            let dir = Dir::new();
            let file = dir.join("rsa_key");
            keygen(&file, args);
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.starts_with(header), "{format}: {text:.40}");

            let keys = dir.load(&HostKeySource::File(file.clone())).unwrap();
            assert_eq!(keys.len(), 2, "{format}");
            assert!(keys[0].algorithm().is_rsa(), "{format}");
            assert_eq!(fp(&keys[0]), keygen_fingerprint(&file), "{format}");
            assert_eq!(
                served_as(&keys[0]),
                [
                    &Algorithm::Rsa {
                        hash: Some(HashAlg::Sha512)
                    },
                    &Algorithm::Rsa {
                        hash: Some(HashAlg::Sha256)
                    }
                ],
                "{format}: never ssh-rsa (SHA-1)"
            );
            // The companion ed25519 key, generated once in the data directory.
            assert_eq!(keys[1].algorithm(), Algorithm::Ed25519, "{format}");
            assert_eq!(fp(&keys[1]), keygen_fingerprint(&dir.ed25519()), "{format}");

            // The same text inline (SSH_HOST_KEY) is the same key; the ed25519 key is reused.
            let inline = dir.load(&HostKeySource::Inline(Secret::new(text))).unwrap();
            assert_eq!(fp(&inline[0]), fp(&keys[0]), "{format}");
            assert_eq!(fp(&inline[1]), fp(&keys[1]), "{format}");
        }
    }

    #[test]
    fn ed25519_and_ecdsa_files_load() {
        let dir = Dir::new();
        let ed = dir.join("ed");
        keygen(&ed, &["-t", "ed25519"]);
        let keys = dir.load(&HostKeySource::File(ed.clone())).unwrap();
        assert_eq!(keys.len(), 1, "no companion beside an ed25519 key");
        assert_eq!(fp(&keys[0]), keygen_fingerprint(&ed));
        assert!(!dir.ed25519().exists());

        for args in [
            &["-t", "ecdsa", "-b", "256"][..],
            &["-t", "ecdsa", "-b", "384", "-m", "PEM"],
        ] {
            let dir = Dir::new();
            let ec = dir.join("ec");
            keygen(&ec, args);
            let keys = dir.load(&HostKeySource::File(ec.clone())).unwrap();
            assert_eq!(fp(&keys[0]), keygen_fingerprint(&ec), "{args:?}");
            assert_eq!(keys[1].algorithm(), Algorithm::Ed25519, "{args:?}");
        }
    }

    #[test]
    fn default_picks_up_p0rt_key_in_the_working_directory() {
        let dir = Dir::new();
        // Nothing there: only the generated ed25519 key.
        let keys = dir.load(&HostKeySource::Default).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].algorithm(), Algorithm::Ed25519);
        let ed = fp(&keys[0]);

        // P0rt's key appears: served first, the ed25519 key kept beside it.
        let p0rt = dir.join(P0RT_HOST_KEY_FILE);
        keygen(&p0rt, &["-t", "rsa", "-b", "2048", "-m", "PEM"]);
        let keys = dir.load(&HostKeySource::Default).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(fp(&keys[0]), keygen_fingerprint(&p0rt));
        assert_eq!(fp(&keys[1]), ed);

        // An explicit setting wins over P0rt's file.
        let other = dir.join("other");
        keygen(&other, &["-t", "ed25519"]);
        let keys = dir.load(&HostKeySource::File(other.clone())).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(fp(&keys[0]), keygen_fingerprint(&other));
    }

    #[test]
    fn generated_key_is_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = Dir::new();
        let file = dir.join("nested").join("key");
        let first = dir.load(&HostKeySource::File(file.clone())).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].algorithm(), Algorithm::Ed25519);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        assert_eq!(fp(&first[0]), keygen_fingerprint(&file));
        let again = dir.load(&HostKeySource::File(file.clone())).unwrap();
        assert_eq!(fp(&again[0]), fp(&first[0]));
        assert!(!dir.ed25519().exists());
    }

    #[test]
    fn unusable_key_files_are_errors_and_left_alone() {
        let dir = Dir::new();
        let weak = dir.join("weak");
        keygen(&weak, &["-t", "rsa", "-b", "1024", "-m", "PEM"]);
        let encrypted = dir.join("encrypted");
        let out = std::process::Command::new("ssh-keygen")
            .args(["-t", "ed25519", "-N", "passphrase", "-q", "-f"])
            .arg(&encrypted)
            .output()
            .unwrap();
        assert!(out.status.success());
        let cases: Vec<(PathBuf, &str)> = vec![
            (
                write(&dir, "garbage", b"not a key at all\n"),
                "not a private key",
            ),
            (write(&dir, "empty", b""), "not a private key"),
            (write(&dir, "binary", &[0xff, 0xfe, 0x00, 0x80]), "not text"),
            (
                write(
                    &dir,
                    "truncated",
                    b"-----BEGIN RSA PRIVATE KEY-----\nMIIEow==\n-----END RSA PRIVATE KEY-----\n",
                ),
                "does not parse",
            ),
            (weak, "too weak"),
            (encrypted, "encrypted"),
        ];
        for (file, expected) in cases {
            let before = std::fs::read(&file).unwrap();
            for source in [HostKeySource::File(file.clone()), HostKeySource::Default] {
                if source == HostKeySource::Default {
                    std::fs::copy(&file, dir.join(P0RT_HOST_KEY_FILE)).unwrap();
                }
                let e = dir.load(&source).unwrap_err().to_string();
                let name = match &source {
                    HostKeySource::File(f) => f.display().to_string(),
                    _ => dir.join(P0RT_HOST_KEY_FILE).display().to_string(),
                };
                assert!(e.contains(&name) && e.contains(expected), "{expected}: {e}");
            }
            assert_eq!(std::fs::read(&file).unwrap(), before);
            assert!(!dir.ed25519().exists(), "nothing generated after an error");
        }

        // Inline text: the error names the setting, never echoes the text.
        let e = dir
            .load(&HostKeySource::Inline(Secret::new(
                "-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0\n-----END RSA PRIVATE KEY-----\n",
            )))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SSH_HOST_KEY") && !e.contains("c2VjcmV0"), "{e}");
        assert!(!dir.ed25519().exists());
    }

    #[test]
    fn dangling_symlink_is_an_error_not_a_new_key() {
        let dir = Dir::new();
        let link = dir.join("link");
        std::os::unix::fs::symlink(dir.join("nowhere"), &link).unwrap();
        let e = dir.load(&HostKeySource::File(link.clone())).unwrap_err();
        assert!(matches!(e, HostKeyError::Load { .. }), "{e}");
        assert!(!dir.join("nowhere").exists());
    }

    fn write(dir: &Dir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}
