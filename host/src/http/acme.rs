//! ACME (RFC 8555): a certificate per name, obtained on demand at the TLS handshake.
//!
//! [`AcmeCerts`] is the HTTPS edge's [`CertSource`] when `https.acme.directory_url` is set.
//! For a ClientHello naming the base domain or `<label>.<domain>` whose label exists in the
//! domain store it serves the stored certificate, or orders one and holds the handshake
//! until it is issued (at most [`ACME_HANDSHAKE_WAIT`]). Any other name gets no certificate
//! and the ACME server is not asked. Validation is TLS-ALPN-01 (RFC 8737), answered by the
//! same listener: a handshake offering `acme-tls/1` gets the challenge certificate.
//!
//! Orders are capped host-wide ([`ACME_MAX_ORDERS_PER_HOUR`]) with one in flight per name;
//! a name whose order failed waits [`ACME_FAILED_ORDER_BACKOFF`]. Certificates and the
//! account live in `<data_dir>/acme/` or, when the domain store is Redis, under
//! `<prefix>acme:` so every host shares them (and challenge answers, and a per-name order
//! lock). A background task renews each certificate at 2/3 of its lifetime.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::ServerConfig;
use tokio::sync::watch;

use super::tls::{
    ALPN_ACME_TLS, ALPN_HTTP1, CertSource, Hello, certified_key, config_for_key,
    parse_certified_key,
};
use crate::redis_link::RedisLink;
use crate::store::DomainStore;

/// Most certificate orders (new names and renewals) this host starts per hour.
pub const ACME_MAX_ORDERS_PER_HOUR: usize = 10;
/// Longest a handshake waits for its name's order before it is refused.
pub const ACME_HANDSHAKE_WAIT: Duration = Duration::from_secs(60);
/// Longest one order may take, validation and issuance included.
pub const ACME_ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a name whose order failed gets no new order.
pub const ACME_FAILED_ORDER_BACKOFF: Duration = Duration::from_secs(600);
/// Longest pause between two renewal checks.
pub const RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Subdirectory of the data directory holding the account and certificates.
pub const ACME_DIR: &str = "acme";
/// Bound on one Redis operation of the certificate store.
const VAULT_OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a challenge answer stays in Redis for the other hosts.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// Most stored certificates listed by one renewal check.
const MAX_LISTED_CERTS: usize = 100_000;
const HOUR: Duration = Duration::from_secs(3600);

/// What the ACME client needs from the settings.
#[derive(Clone, Debug)]
pub struct AcmeSettings {
    pub directory_url: String,
    pub email: Option<String>,
    /// PEM root trusted for the ACME server's own HTTPS (instead of the system roots).
    pub ca_cert: Option<PathBuf>,
    /// The base domain; certificates are for it and `<label>.<domain>`.
    pub domain: String,
}

/// Where the account and certificates are kept.
pub enum Vault {
    /// `<data_dir>/acme/`: `account.json`, `certs/<name>.pem` (chain, then key).
    Files(PathBuf),
    /// `<prefix>acme:account`, `<prefix>acme:cert:<name>`, `<prefix>acme:challenge:<name>`,
    /// `<prefix>acme:lock:<name>`.
    Redis {
        link: Arc<RedisLink>,
        prefix: String,
    },
}

enum Item<'a> {
    Account,
    Cert(&'a str),
}

impl Vault {
    fn describe(&self) -> String {
        match self {
            Vault::Files(dir) => dir.display().to_string(),
            Vault::Redis { link, prefix } => format!("Redis {} under {prefix}acme:", link.display),
        }
    }

    fn redis_key(prefix: &str, item: &Item<'_>) -> String {
        match item {
            Item::Account => format!("{prefix}acme:account"),
            Item::Cert(name) => format!("{prefix}acme:cert:{name}"),
        }
    }

    fn path(dir: &Path, item: &Item<'_>) -> PathBuf {
        match item {
            Item::Account => dir.join("account.json"),
            Item::Cert(name) => dir.join("certs").join(format!("{name}.pem")),
        }
    }

    async fn get(&self, item: Item<'_>) -> Result<Option<String>, String> {
        match self {
            Vault::Files(dir) => match tokio::fs::read_to_string(Self::path(dir, &item)).await {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", Self::path(dir, &item).display())),
            },
            Vault::Redis { link, prefix } => link
                .query(
                    redis::cmd("GET").arg(Self::redis_key(prefix, &item)),
                    VAULT_OP_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string()),
        }
    }

    async fn put(&self, item: Item<'_>, value: &str) -> Result<(), String> {
        match self {
            Vault::Files(dir) => {
                let path = Self::path(dir, &item);
                let value = value.to_string();
                tokio::task::spawn_blocking(move || write_private(&path, value.as_bytes()))
                    .await
                    .map_err(|e| e.to_string())?
            }
            Vault::Redis { link, prefix } => link
                .query::<()>(
                    redis::cmd("SET")
                        .arg(Self::redis_key(prefix, &item))
                        .arg(value),
                    VAULT_OP_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string()),
        }
    }

    async fn cert_names(&self) -> Result<Vec<String>, String> {
        match self {
            Vault::Files(dir) => {
                let mut names = Vec::new();
                let mut entries = match tokio::fs::read_dir(dir.join("certs")).await {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                    Err(e) => return Err(e.to_string()),
                };
                while let Ok(Some(entry)) = entries.next_entry().await {
                    let file = entry.file_name().to_string_lossy().into_owned();
                    if let Some(name) = file.strip_suffix(".pem") {
                        names.push(name.to_string());
                    }
                }
                Ok(names)
            }
            Vault::Redis { link, prefix } => {
                let head = format!("{prefix}acme:cert:");
                let keys = link
                    .scan(&format!("{head}*"), MAX_LISTED_CERTS, VAULT_OP_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(keys
                    .iter()
                    .filter_map(|k| k.strip_prefix(&head).map(str::to_string))
                    .collect())
            }
        }
    }

    /// Shares a challenge answer with the other hosts (Redis only).
    async fn put_challenge(&self, name: &str, pem: &str) {
        if let Vault::Redis { link, prefix } = self {
            let set = link
                .query::<()>(
                    redis::cmd("SET")
                        .arg(format!("{prefix}acme:challenge:{name}"))
                        .arg(pem)
                        .arg("PX")
                        .arg(CHALLENGE_TTL.as_millis() as u64),
                    VAULT_OP_TIMEOUT,
                )
                .await;
            if let Err(e) = set {
                tracing::warn!("acme: cannot share the challenge for {name} in Redis: {e}");
            }
        }
    }

    async fn get_challenge(&self, name: &str) -> Option<String> {
        let Vault::Redis { link, prefix } = self else {
            return None;
        };
        link.query(
            redis::cmd("GET").arg(format!("{prefix}acme:challenge:{name}")),
            VAULT_OP_TIMEOUT,
        )
        .await
        .ok()
        .flatten()
    }

    async fn drop_challenge(&self, name: &str) {
        if let Vault::Redis { link, prefix } = self {
            let _ = link
                .query::<()>(
                    redis::cmd("DEL").arg(format!("{prefix}acme:challenge:{name}")),
                    VAULT_OP_TIMEOUT,
                )
                .await;
        }
    }

    /// Takes the per-name order lock shared by the hosts (always granted for files, which
    /// only this host uses). `None`: another host is ordering the name. The lock holds a
    /// random token, so only its taker releases it (a process id is not unique across hosts).
    async fn lock_order(&self, name: &str) -> Option<OrderLock> {
        let Vault::Redis { link, prefix } = self else {
            return Some(OrderLock(String::new()));
        };
        let token = hex::encode(rand::random::<[u8; 16]>());
        let taken: Result<Option<String>, _> = link
            .query(
                redis::cmd("SET")
                    .arg(format!("{prefix}acme:lock:{name}"))
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ACME_ORDER_TIMEOUT.as_millis() as u64),
                VAULT_OP_TIMEOUT,
            )
            .await;
        // Redis unreachable: order anyway rather than serve nothing.
        match taken {
            Ok(None) => None,
            _ => Some(OrderLock(token)),
        }
    }

    /// Releases the lock if it is still the one `lock` took: an order that outlived the
    /// lock's expiry must not free another host's lock.
    async fn unlock_order(&self, name: &str, lock: OrderLock) {
        if let Vault::Redis { link, prefix } = self {
            let _ = link
                .query::<i64>(
                    redis::cmd("EVAL")
                        .arg(RELEASE_IF_HELD)
                        .arg(1)
                        .arg(format!("{prefix}acme:lock:{name}"))
                        .arg(&lock.0),
                    VAULT_OP_TIMEOUT,
                )
                .await;
        }
    }
}

/// The token of a held order lock.
struct OrderLock(String);

/// Deletes KEYS[1] only if it holds ARGV[1] (one key, so it works on Cluster).
const RELEASE_IF_HELD: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Writes a file readable by its owner only: temp file, fsync, rename.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().ok_or("no parent directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let temp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

/// The account as stored, with the directory it belongs to.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// An issued certificate, ready to serve.
pub struct Issued {
    config: Arc<ServerConfig>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl Issued {
    /// From the stored text: the chain, then the private key, PEM.
    fn from_pem(pem: &str) -> Result<Issued, String> {
        let key = certified_key(pem.as_bytes(), pem.as_bytes()).map_err(|(_, e)| e)?;
        let leaf = key.cert.first().ok_or("no certificate")?;
        let (not_before, not_after) =
            validity(leaf.as_ref()).ok_or("cannot read the certificate's validity")?;
        Ok(Issued {
            config: config_for_key(Arc::new(key), &[ALPN_HTTP1]),
            not_before,
            not_after,
        })
    }

    /// When renewal is due: at 2/3 of the lifetime.
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn show_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// One DER element: (tag, contents, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b))
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// An X.509 time (UTCTime or GeneralizedTime, as RFC 5280 requires them) in unix seconds.
fn der_time(tag: u8, bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let part = |i: usize| rest[i..i + 2].parse::<u8>().ok();
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(part(0)?).ok()?, part(2)?)
            .ok()?;
    let clock = time::Time::from_hms(part(4)?, part(6)?, part(8)?).ok()?;
    Some(date.with_time(clock).assume_utc().unix_timestamp())
}

/// `notBefore` and `notAfter` of a DER certificate, in unix seconds.
fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (_, certificate, _) = der_element(cert)?;
    let (_, tbs, _) = der_element(certificate)?;
    let mut rest = tbs;
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xa0 {
        rest = after; // explicit version
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2; // serial, signature algorithm, issuer
    }
    let (_, validity, _) = der_element(rest)?;
    let (t1, not_before, after) = der_element(validity)?;
    let (t2, not_after, _) = der_element(after)?;
    Some((der_time(t1, not_before)?, der_time(t2, not_after)?))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An order's outcome as waiters see it: `None` while running, then the certificate or
/// `None` if it failed.
type OrderOutcome = Option<Option<Arc<Issued>>>;

/// Per-name ACME certificates; see the module docs.
pub struct AcmeCerts(Arc<Inner>);

struct Inner {
    settings: AcmeSettings,
    store: Arc<dyn DomainStore>,
    vault: Vault,
    account: tokio::sync::Mutex<Option<Account>>,
    issued: Mutex<HashMap<String, Arc<Issued>>>,
    orders: Mutex<HashMap<String, watch::Receiver<OrderOutcome>>>,
    challenges: Mutex<HashMap<String, Arc<ServerConfig>>>,
    /// When this host's orders of the last hour started.
    recent_orders: Mutex<VecDeque<Instant>>,
    failed: Mutex<HashMap<String, Instant>>,
    /// Last "order cap reached" warning, so it is logged once a minute at most.
    cap_warned: Mutex<Option<Instant>>,
    /// Wakes the renewal task when a certificate is issued (its renewal time is new).
    issued_one: tokio::sync::Notify,
}

impl AcmeCerts {
    /// Checks the settings (the CA file, the data directory) without contacting the server.
    pub fn new(
        settings: AcmeSettings,
        store: Arc<dyn DomainStore>,
        vault: Vault,
    ) -> Result<AcmeCerts, String> {
        if let Some(path) = &settings.ca_cert {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            CertificateDer::from_pem_file(path).map_err(|e| {
                format!(
                    "cannot use {} (https.acme.ca_cert / ACME_CA_CERT): no PEM certificate: {e}",
                    path.display()
                )
            })?;
        }
        if let Vault::Files(dir) = &vault {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join("certs"))
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let inner = Inner {
            settings,
            store,
            vault,
            account: tokio::sync::Mutex::new(None),
            issued: Mutex::default(),
            orders: Mutex::default(),
            challenges: Mutex::default(),
            recent_orders: Mutex::default(),
            failed: Mutex::default(),
            cap_warned: Mutex::default(),
            issued_one: tokio::sync::Notify::new(),
        };
        inner.builder()?;
        tracing::info!(
            "https: certificates from ACME at {} for {} and the names in the domain store, on \
             demand (tls-alpn-01, at most {ACME_MAX_ORDERS_PER_HOUR} orders an hour), kept in {}",
            inner.settings.directory_url,
            inner.settings.domain,
            inner.vault.describe()
        );
        Ok(AcmeCerts(Arc::new(inner)))
    }

    /// Renews stored certificates at 2/3 of their lifetime, for as long as the host runs.
    pub fn spawn_renewals(&self) {
        let inner = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(5);
            loop {
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = strong.issued_one.notified() => {}
                }
                wait = strong.renew_due().await;
            }
        });
    }
}

#[async_trait]
impl CertSource for AcmeCerts {
    async fn config_for(&self, hello: &Hello) -> Option<Arc<ServerConfig>> {
        let name = hello.server_name.as_deref()?;
        if hello.acme_challenge {
            return self.0.challenge_for(name).await;
        }
        self.0.certificate_for(name).await
    }
}

impl Inner {
    fn builder(&self) -> Result<AccountBuilder, String> {
        match &self.settings.ca_cert {
            Some(path) => Account::builder_with_root(path),
            None => Account::builder(),
        }
        .map_err(|e| format!("ACME client: {e}"))
    }

    async fn account(&self) -> Result<Account, String> {
        let mut slot = self.account.lock().await;
        if let Some(account) = &*slot {
            return Ok(account.clone());
        }
        let directory = &self.settings.directory_url;
        let stored = self.vault.get(Item::Account).await?;
        if let Some(stored) = stored.and_then(|t| serde_json::from_str::<StoredAccount>(&t).ok())
            && stored.directory == *directory
        {
            let account = self
                .builder()?
                .from_credentials(stored.credentials)
                .await
                .map_err(|e| format!("restoring the ACME account: {e}"))?;
            *slot = Some(account.clone());
            return Ok(account);
        }
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = self
            .builder()?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory.clone(),
                None,
            )
            .await
            .map_err(|e| format!("creating an ACME account at {directory}: {e}"))?;
        let stored = StoredAccount {
            directory: directory.clone(),
            credentials,
        };
        let text = serde_json::to_string(&stored).map_err(|e| e.to_string())?;
        if let Err(e) = self.vault.put(Item::Account, &text).await {
            tracing::warn!("acme: cannot store the account: {e}");
        }
        tracing::info!("acme: created an account at {directory}");
        *slot = Some(account.clone());
        Ok(account)
    }

    /// True for the base domain and `<label>.<domain>` whose label is in the store.
    async fn name_exists(&self, name: &str) -> bool {
        let domain = &self.settings.domain;
        if name == domain {
            return true;
        }
        let Some(label) = name
            .strip_suffix(domain.as_str())
            .and_then(|head| head.strip_suffix('.'))
        else {
            return false;
        };
        if label.is_empty() || label.contains('.') {
            return false;
        }
        match self.store.owner_of(label).await {
            Ok(owner) => owner.is_some(),
            Err(e) => {
                tracing::warn!("acme: cannot look {label} up in the domain store: {e}");
                false
            }
        }
    }

    fn cached(&self, name: &str) -> Option<Arc<Issued>> {
        lock(&self.issued)
            .get(name)
            .filter(|i| unix_now() < i.not_after)
            .cloned()
    }

    /// Keeps `issued` in memory unless a later one is there already.
    fn adopt(&self, name: &str, issued: Arc<Issued>) {
        let mut map = lock(&self.issued);
        if map
            .get(name)
            .is_none_or(|old| old.not_after < issued.not_after)
        {
            map.insert(name.to_string(), issued);
        }
    }

    async fn load_stored(&self, name: &str) -> Option<Arc<Issued>> {
        if !valid_name(name) {
            return None;
        }
        let text = match self.vault.get(Item::Cert(name)).await {
            Ok(text) => text?,
            Err(e) => {
                tracing::warn!("acme: cannot read the stored certificate for {name}: {e}");
                return None;
            }
        };
        match Issued::from_pem(&text) {
            Ok(issued) => Some(Arc::new(issued)),
            Err(e) => {
                tracing::warn!("acme: the stored certificate for {name} is unusable: {e}");
                None
            }
        }
    }

    async fn certificate_for(self: &Arc<Self>, name: &str) -> Option<Arc<ServerConfig>> {
        if let Some(issued) = self.cached(name) {
            return Some(issued.config.clone());
        }
        if !valid_name(name) || !self.name_exists(name).await {
            tracing::debug!("acme: no certificate for {name}: not a name in the domain store");
            return None;
        }
        if let Some(issued) = self.load_stored(name).await
            && unix_now() < issued.not_after
        {
            tracing::info!(
                "acme: serving the stored certificate for {name} (valid until {})",
                show_time(issued.not_after)
            );
            self.adopt(name, issued.clone());
            return Some(issued.config.clone());
        }
        let mut outcome = self.order_for(name)?;
        let done = tokio::time::timeout(ACME_HANDSHAKE_WAIT, outcome.wait_for(Option::is_some));
        match done.await {
            Ok(Ok(outcome)) => outcome.clone().flatten().map(|i| i.config.clone()),
            _ => None,
        }
    }

    /// Joins the order in flight for `name`, or starts one if the caps allow.
    fn order_for(self: &Arc<Self>, name: &str) -> Option<watch::Receiver<OrderOutcome>> {
        let mut orders = lock(&self.orders);
        if let Some(outcome) = orders.get(name) {
            return Some(outcome.clone());
        }
        if let Some(at) = lock(&self.failed).get(name)
            && at.elapsed() < ACME_FAILED_ORDER_BACKOFF
        {
            tracing::debug!("acme: no new order for {name} yet: its last order failed");
            return None;
        }
        if !self.take_order_slot() {
            let mut warned = lock(&self.cap_warned);
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                *warned = Some(Instant::now());
                tracing::warn!(
                    "acme: not ordering a certificate for {name}: {ACME_MAX_ORDERS_PER_HOUR} \
                     orders started in the last hour (ACME_MAX_ORDERS_PER_HOUR)"
                );
            }
            return None;
        }
        let (tx, rx) = watch::channel(None);
        orders.insert(name.to_string(), rx.clone());
        let (inner, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let issued = match tokio::time::timeout(ACME_ORDER_TIMEOUT, inner.issue(&name)).await {
                Ok(Ok(issued)) => Some(issued),
                Ok(Err(e)) => {
                    tracing::warn!("acme: no certificate for {name}: {e}");
                    None
                }
                Err(_) => {
                    tracing::warn!(
                        "acme: no certificate for {name}: the order took over {ACME_ORDER_TIMEOUT:?}"
                    );
                    None
                }
            };
            inner.withdraw_challenge(&name).await;
            match &issued {
                Some(issued) => {
                    lock(&inner.failed).remove(&name);
                    inner.adopt(&name, issued.clone());
                    inner.issued_one.notify_one();
                }
                None => {
                    lock(&inner.failed).insert(name.clone(), Instant::now());
                }
            }
            lock(&inner.orders).remove(&name);
            let _ = tx.send(Some(issued));
        });
        Some(rx)
    }

    fn take_order_slot(&self) -> bool {
        let mut recent = lock(&self.recent_orders);
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= HOUR)
        {
            recent.pop_front();
        }
        if recent.len() >= ACME_MAX_ORDERS_PER_HOUR {
            return false;
        }
        recent.push_back(now);
        true
    }

    /// Orders, validates and stores a certificate for `name` (or adopts the one another
    /// host just stored).
    async fn issue(&self, name: &str) -> Result<Arc<Issued>, String> {
        let Some(lock) = self.vault.lock_order(name).await else {
            return self.wait_for_other_host(name).await;
        };
        let result = self.order(name).await;
        self.vault.unlock_order(name, lock).await;
        result
    }

    async fn wait_for_other_host(&self, name: &str) -> Result<Arc<Issued>, String> {
        tracing::info!("acme: another host is ordering the certificate for {name}; waiting");
        let deadline = Instant::now() + ACME_ORDER_TIMEOUT;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(issued) = self.load_stored(name).await
                && unix_now() < issued.renew_at()
            {
                return Ok(issued);
            }
        }
        Err("the other host's order did not finish".into())
    }

    async fn order(&self, name: &str) -> Result<Arc<Issued>, String> {
        if let Some(issued) = self.load_stored(name).await
            && unix_now() < issued.renew_at()
        {
            return Ok(issued);
        }
        let directory = &self.settings.directory_url;
        tracing::info!("acme: ordering a certificate for {name} from {directory}");
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(name.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| format!("new order: {e}"))?;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => return Err(format!("the authorization is {status:?}")),
            }
            let mut challenge = authz
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or("the ACME server offers no tls-alpn-01 challenge")?;
            let digest = challenge.key_authorization().digest();
            self.publish_challenge(name, digest.as_ref()).await?;
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("challenge: {e}"))?;
        }
        let retries = RetryPolicy::new().timeout(ACME_ORDER_TIMEOUT);
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(|e| format!("validation: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!("the order is {status:?} after validation"));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| format!("certificate request: {e}"))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| format!("finalizing: {e}"))?;
        let chain = order
            .poll_certificate(&retries)
            .await
            .map_err(|e| format!("fetching the certificate: {e}"))?;
        let pem = format!("{}\n{}", chain.trim_end(), key.serialize_pem());
        let issued = Arc::new(Issued::from_pem(&pem)?);
        if let Err(e) = self.vault.put(Item::Cert(name), &pem).await {
            tracing::warn!("acme: cannot store the certificate for {name}: {e}");
        }
        tracing::info!(
            "acme: certificate for {name} issued, valid until {}",
            show_time(issued.not_after)
        );
        Ok(issued)
    }

    /// Serves the TLS-ALPN-01 answer for `name` (self-signed, carrying the key
    /// authorization's digest) until the order ends.
    async fn publish_challenge(&self, name: &str, digest: &[u8]) -> Result<(), String> {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        let config = challenge_config(&pem)?;
        lock(&self.challenges).insert(name.to_string(), config);
        self.vault.put_challenge(name, &pem).await;
        Ok(())
    }

    async fn withdraw_challenge(&self, name: &str) {
        if lock(&self.challenges).remove(name).is_some() {
            self.vault.drop_challenge(name).await;
        }
    }

    async fn challenge_for(&self, name: &str) -> Option<Arc<ServerConfig>> {
        if let Some(config) = lock(&self.challenges).get(name).cloned() {
            tracing::debug!("acme: answering the tls-alpn-01 validation for {name}");
            return Some(config);
        }
        let pem = self.vault.get_challenge(name).await?;
        challenge_config(&pem).ok()
    }

    /// One renewal pass: adopts certificates other hosts renewed, orders those due.
    /// Returns how long to wait before the next pass.
    async fn renew_due(self: &Arc<Self>) -> Duration {
        let names = match self.vault.cert_names().await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!("acme: cannot list the stored certificates: {e}");
                return RENEW_CHECK_INTERVAL;
            }
        };
        let now = unix_now();
        let mut next = now + RENEW_CHECK_INTERVAL.as_secs() as i64;
        for name in names {
            let Some(stored) = self.load_stored(&name).await else {
                continue;
            };
            self.adopt(&name, stored.clone());
            if now < stored.renew_at() {
                next = next.min(stored.renew_at());
                continue;
            }
            if !self.name_exists(&name).await {
                continue;
            }
            if !lock(&self.orders).contains_key(&name) {
                tracing::info!(
                    "acme: renewing the certificate for {name} (valid until {})",
                    show_time(stored.not_after)
                );
            }
            let _ = self.order_for(&name);
            next = next.min(now + 60);
        }
        Duration::from_secs((next - now).clamp(1, RENEW_CHECK_INTERVAL.as_secs() as i64) as u64)
    }
}

fn challenge_config(pem: &str) -> Result<Arc<ServerConfig>, String> {
    let key = parse_certified_key(pem.as_bytes(), pem.as_bytes()).map_err(|(_, e)| e)?;
    Ok(config_for_key(Arc::new(key), &[ALPN_ACME_TLS]))
}

/// A name safe to use as a file name and Redis key: DNS characters only.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_read_from_the_certificate() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example.test".into()]).unwrap();
        // 2024-01-02T03:04:05Z (UTCTime) and 2051-06-07T08:09:10Z (GeneralizedTime).
        params.not_before = time::OffsetDateTime::from_unix_timestamp(1_704_164_645).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_569_738_150).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (nb, na) = validity(cert.der()).unwrap();
        assert_eq!((nb, na), (1_704_164_645, 2_569_738_150));
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        let issued = Issued::from_pem(&pem).unwrap();
        assert_eq!(issued.renew_at(), nb + (na - nb) * 2 / 3);
        assert!(validity(b"\x30\x03\x02\x01").is_none());
    }

    #[test]
    fn challenge_answers_load() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example.test".into()]).unwrap();
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&[7; 32])];
        let cert = params.self_signed(&key).unwrap();
        let config = challenge_config(&format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
        assert_eq!(config.alpn_protocols, [ALPN_ACME_TLS.to_vec()]);
    }

    #[test]
    fn only_dns_names_are_stored() {
        assert!(valid_name("whale-guitar-fox.example.com"));
        for bad in ["", "../x", "a/b", "A.example", ".hidden", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
