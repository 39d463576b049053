//! HTTPS on the HTTP edge: the TLS handshake in front of the same per-connection serve path
//! as plain HTTP (see [`super::serve_edge`]), certificates from PEM files reloaded on
//! change ([`FileCerts`]) or from ACME ([`super::acme::AcmeCerts`]), and the two HTTPS
//! request rules: the HTTP → HTTPS redirect and HSTS ([`HttpsPolicy`]).
//!
//! The certificate is chosen after the ClientHello has been read ([`CertSource`], async),
//! so a source may look names up or wait for an order before answering; a source that
//! answers `None` refuses the handshake with an alert.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

/// Time a client gets to send its ClientHello, and again to finish the handshake once its
/// certificate is chosen, so a slow or silent handshake cannot hold a connection slot.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for changes (modification time, size, inode).
pub const CERT_RELOAD_POLL: Duration = Duration::from_secs(1);
/// The one application protocol served (HTTP/2 is not offered).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The ALPN protocol of ACME's TLS-ALPN-01 validation (RFC 8737).
pub const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";

/// What a ClientHello asked for.
#[derive(Clone, Debug)]
pub struct Hello {
    /// SNI, lowercase, without a trailing dot.
    pub server_name: Option<String>,
    /// The client offered `acme-tls/1`: an ACME server validating a TLS-ALPN-01 challenge.
    pub acme_challenge: bool,
}

impl Hello {
    fn of(hello: &ClientHello<'_>) -> Hello {
        Hello {
            server_name: hello
                .server_name()
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase()),
            acme_challenge: hello
                .alpn()
                .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_ACME_TLS)),
        }
    }
}

/// Chooses the server configuration (its certificate) for a handshake.
#[async_trait]
pub trait CertSource: Send + Sync {
    /// The configuration to finish the handshake with, or `None` to refuse it.
    async fn config_for(&self, hello: &Hello) -> Option<Arc<ServerConfig>>;
}

/// Why a TLS connection did not get as far as HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
    #[error("no certificate for {0}")]
    Refused(String),
    /// An ACME TLS-ALPN-01 validation: answered by the handshake itself, nothing to serve.
    #[error("answered an ACME tls-alpn-01 validation")]
    AcmeValidation,
}

/// Runs the server side of a TLS handshake on `socket`, with `certs` choosing the
/// certificate: the stream HTTP is then served on.
pub async fn handshake(
    socket: TcpStream,
    certs: &dyn CertSource,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), socket);
    let start = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor)
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(HandshakeError::Failed)?;
    let hello = Hello::of(&start.client_hello());
    let (config, refused) = match certs.config_for(&hello).await {
        Some(config) => (config, false),
        None => (refusing_config(), true),
    };
    let finished = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, start.into_stream(config))
        .await
        .map_err(|_| HandshakeError::Timeout)?;
    if refused {
        return Err(HandshakeError::Refused(
            hello
                .server_name
                .unwrap_or_else(|| "a client without SNI".into()),
        ));
    }
    let mut stream = finished.map_err(HandshakeError::Failed)?;
    if stream.get_ref().1.alpn_protocol() == Some(ALPN_ACME_TLS) {
        let _ = stream.shutdown().await;
        return Err(HandshakeError::AcmeValidation);
    }
    Ok(stream)
}

/// Answers every handshake with "no certificate" (rustls sends the client an alert).
fn refusing_config() -> Arc<ServerConfig> {
    #[derive(Debug)]
    struct NoCertificate;
    impl ResolvesServerCert for NoCertificate {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            None
        }
    }
    static CONFIG: std::sync::OnceLock<Arc<ServerConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| config_with_resolver(Arc::new(NoCertificate), &[ALPN_HTTP1]))
        .clone()
}

/// Serves one certificate to every handshake.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn config_with_resolver(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A server configuration presenting `key`, offering `alpn`.
pub fn config_for_key(key: Arc<CertifiedKey>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    config_with_resolver(Arc::new(Fixed(key)), alpn)
}

/// A certificate chain and its private key from PEM text, checked to belong together.
/// Errors say which part is wrong (the caller names the file).
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, (CertPart, String)> {
    let certified = parse_certified_key(cert_pem, key_pem)?;
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // The check cannot be made for some key types; the handshake will tell.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err((
            CertPart::Key,
            "does not match the certificate (the first one in the certificate file)".into(),
        )),
        Err(e) => Err((CertPart::Cert, format!("unusable certificate: {e}"))),
    }
}

/// [`certified_key`] without the check that the key belongs to the certificate (which
/// refuses certificates with unknown critical extensions, such as ACME's TLS-ALPN-01
/// answer).
pub fn parse_certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, (CertPart, String)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| (CertPart::Cert, format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err((
            CertPart::Cert,
            "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        (
            CertPart::Key,
            format!("no private key in it (expected PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| (CertPart::Key, format!("unusable private key: {e}")))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Which of the two PEM inputs is at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertPart {
    Cert,
    Key,
}

/// A certificate file that cannot be used, naming the file and its setting.
#[derive(Debug, thiserror::Error)]
#[error("cannot use {} ({setting}): {problem}", path.display())]
pub struct CertFileError {
    pub path: PathBuf,
    pub setting: &'static str,
    pub problem: String,
}

const CERT_SETTING: &str = "https.cert_file / TLS_CERT_FILE";
const KEY_SETTING: &str = "https.key_file / TLS_KEY_FILE";

/// What identifies one version of a file without reading it.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// A certificate (usually `*.<domain>` and `<domain>`) from PEM files, served for every
/// name; reloaded when either file changes. A change that cannot be loaded keeps the
/// certificate in use and is logged once.
pub struct FileCerts {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    /// Stamps of the files last tried (loaded or refused), so each version is tried once.
    tried: Mutex<(Stamp, Stamp)>,
}

impl FileCerts {
    /// Loads both files; an error names the file at fault.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<FileCerts>, CertFileError> {
        let stamps = (stamp(cert_path), stamp(key_path));
        let config = Self::read(cert_path, key_path)?;
        Ok(Arc::new(FileCerts {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(config),
            tried: Mutex::new(stamps),
        }))
    }

    fn read(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, CertFileError> {
        let file_error = |part: CertPart, problem: String| match part {
            CertPart::Cert => CertFileError {
                path: cert_path.to_path_buf(),
                setting: CERT_SETTING,
                problem,
            },
            CertPart::Key => CertFileError {
                path: key_path.to_path_buf(),
                setting: KEY_SETTING,
                problem,
            },
        };
        let cert =
            std::fs::read(cert_path).map_err(|e| file_error(CertPart::Cert, e.to_string()))?;
        let key = std::fs::read(key_path).map_err(|e| file_error(CertPart::Key, e.to_string()))?;
        let key =
            certified_key(&cert, &key).map_err(|(part, problem)| file_error(part, problem))?;
        Ok(config_for_key(Arc::new(key), &[ALPN_HTTP1]))
    }

    /// Reloads the files if either changed since last tried; true if a new certificate
    /// is now served.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
        {
            let mut tried = self.tried.lock().unwrap_or_else(|e| e.into_inner());
            if *tried == stamps {
                return false;
            }
            *tried = stamps;
        }
        match Self::read(&self.cert_path, &self.key_path) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!(
                    "https: reloaded the certificate from {} and {}",
                    self.cert_path.display(),
                    self.key_path.display()
                );
                true
            }
            Err(e) => {
                tracing::warn!("https: {e}; still serving the previous certificate");
                false
            }
        }
    }

    /// Checks the files every [`CERT_RELOAD_POLL`] for as long as the host runs.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let certs = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CERT_RELOAD_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(certs) = certs.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || certs.reload_if_changed()).await;
            }
        });
    }
}

#[async_trait]
impl CertSource for FileCerts {
    async fn config_for(&self, _: &Hello) -> Option<Arc<ServerConfig>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The HTTPS rules applied to requests: redirecting plain HTTP, HSTS on HTTPS.
#[derive(Clone, Debug, Default)]
pub struct HttpsPolicy {
    /// Plain-HTTP requests for tunnels get a 308 to the same URL over HTTPS.
    pub redirect: bool,
    /// `Strict-Transport-Security: max-age=…` on HTTPS responses that lack one.
    pub hsts_max_age: Option<u64>,
    /// The HTTPS port in redirects; `None` when it is 443 (not shown).
    pub public_port: Option<u16>,
}

impl HttpsPolicy {
    /// The 308 for a plain-HTTP request routed to a tunnel, when redirecting is on.
    pub(super) fn redirect<B>(
        &self,
        req: &Request<B>,
        domain: &str,
    ) -> Option<Response<super::Body>> {
        if !self.redirect {
            return None;
        }
        let target = super::route::route(req.method(), req.headers(), req.uri(), domain).ok()?;
        if !matches!(target, super::route::Target::Tunnel(_)) {
            return None;
        }
        let host = req.headers().get(header::HOST)?.to_str().ok()?;
        let host = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = match self.public_port {
            Some(port) => format!("https://{host}:{port}{path}"),
            None => format!("https://{host}{path}"),
        };
        let location = HeaderValue::from_str(&location).ok()?;
        let mut res = super::full(
            StatusCode::PERMANENT_REDIRECT,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"This tunnel is served over HTTPS.\n"),
        );
        res.headers_mut().insert(header::LOCATION, location);
        Some(res)
    }

    /// Adds HSTS to an HTTPS response (keeping the backend's own, if it sent one).
    pub(super) fn add_hsts(&self, res: &mut Response<super::Body>) {
        if let Some(max_age) = self.hsts_max_age
            && !res
                .headers()
                .contains_key(header::STRICT_TRANSPORT_SECURITY)
            && let Ok(value) = HeaderValue::from_str(&format!("max-age={max_age}"))
        {
            res.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn pem_pairs_are_checked() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (cert, key) = pair(&["*.example.test", "example.test"]);
        assert!(certified_key(cert.as_bytes(), key.as_bytes()).is_ok());
        let (_, other_key) = pair(&["x"]);
        let e = certified_key(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert_eq!(e.0, CertPart::Key, "{e:?}");
        assert!(e.1.contains("does not match"), "{e:?}");
        let e = certified_key(b"nothing here", key.as_bytes()).unwrap_err();
        assert_eq!(e.0, CertPart::Cert, "{e:?}");
        let e = certified_key(cert.as_bytes(), cert.as_bytes()).unwrap_err();
        assert_eq!(e.0, CertPart::Key, "{e:?}");
    }

    #[test]
    fn file_errors_name_the_file_and_a_bad_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let e = FileCerts::load(&cert_path, &key_path)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("c.pem") && e.contains("TLS_CERT_FILE"), "{e}");
        let (cert, key) = pair(&["a.test"]);
        std::fs::write(&cert_path, &cert).unwrap();
        std::fs::write(&key_path, "junk").unwrap();
        let e = FileCerts::load(&cert_path, &key_path)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("k.pem") && e.contains("TLS_KEY_FILE"), "{e}");
        std::fs::write(&key_path, &key).unwrap();
        let certs = FileCerts::load(&cert_path, &key_path).unwrap();
        assert!(!certs.reload_if_changed(), "nothing changed");
        std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        assert!(!certs.reload_if_changed(), "a bad file is refused");
        assert!(!certs.reload_if_changed(), "and tried once");
        let (cert, key) = pair(&["b.test"]);
        std::fs::write(&key_path, &key).unwrap();
        std::fs::write(&cert_path, &cert).unwrap();
        assert!(certs.reload_if_changed());
    }
}
