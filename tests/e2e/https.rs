//! HTTPS on the edge: certificates from PEM files (made with rcgen, reloaded on change), the
//! HTTP → HTTPS redirect and HSTS, and certificates from a real ACME server (Pebble, with
//! real TLS-ALPN-01 validation against the host's HTTPS listener).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::*;

/// The base domain of these hosts: certificate verification refuses a wildcard for a
/// single-label name such as `*.localhost`.
const DOMAIN: &str = "p0rt.test";

/// `p0rt serve` on loopback for [`DOMAIN`].
fn host_config(sandbox: &Sandbox) -> HostConfig {
    HostConfig::flags(&sandbox.data_dir())
        .arg("--domain")
        .arg(DOMAIN)
}

/// Opens a tunnel for `key` to `backend` and waits until HTTPS serves it (with `roots`);
/// returns the client and the tunnel's full name.
async fn https_tunnel(
    host: &Host,
    sandbox: &Sandbox,
    key: &Key,
    backend: &Backend,
    roots: &str,
) -> (SshClient, String) {
    let name = host.info(sandbox, key).await.name;
    let client = host
        .ssh(sandbox, key)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    let fqdn = format!("{name}.{DOMAIN}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match https_get(&[roots], host, &fqdn, "/whoami").await {
            Ok((200, body, _)) if body == backend.id => break,
            last if Instant::now() > deadline => panic!(
                "{fqdn} not served over https: {last:?}; host log:\n{}",
                host.log()
            ),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    (client, fqdn)
}

/// A plain-HTTP request to the edge for `fqdn` (redirects not followed).
async fn plain_get(host: &Host, fqdn: &str, path: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(host.url(path))
        .header(reqwest::header::HOST, format!("{fqdn}:{}", host.http_port))
        .send()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Certificates and clients
// ---------------------------------------------------------------------------------------------

/// A private CA signing test certificates.
struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "p0rt e2e test CA");
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `names` (and IP 127.0.0.1): (cert PEM, key PEM, cert DER).
    fn leaf(&self, names: &[&str]) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// A one-connection HTTPS client trusting only `roots`, reaching `name` at `addr`, not
/// following redirects, recording the server's certificate.
fn https_client(roots: &[&str], name: &str, addr: SocketAddr) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .resolve(name, addr);
    for root in roots {
        builder =
            builder.add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// `GET https://<fqdn>:<https port><path>`: status, body and the server's leaf.
async fn https_get(
    roots: &[&str],
    host: &Host,
    fqdn: &str,
    path: &str,
) -> Result<(u16, String, Vec<u8>), reqwest::Error> {
    let addr = host.https_addr();
    let client = https_client(roots, fqdn, addr);
    let res = client
        .get(format!("https://{fqdn}:{}{path}", addr.port()))
        .send()
        .await?;
    let leaf = res
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let status = res.status().as_u16();
    Ok((status, res.text().await.unwrap_or_default(), leaf))
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// A host serving HTTPS on a free port with certificates from `cert`/`key`.
fn file_host_config(sandbox: &Sandbox, cert: &Path, key: &Path) -> HostConfig {
    host_config(sandbox)
        .env("HTTPS_PORT", "0")
        .env("TLS_CERT_FILE", cert.to_string_lossy())
        .env("TLS_KEY_FILE", key.to_string_lossy())
}

// ---------------------------------------------------------------------------------------------
// Certificates from files
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn file_certificates_serve_tunnels_and_reload_on_change() {
    let sandbox = Sandbox::new();
    let ca = TestCa::new();
    let (cert_path, key_path) = (sandbox.join("tls.crt"), sandbox.join("tls.key"));
    let (cert, key, first_der) = ca.leaf(&["*.p0rt.test", "p0rt.test"]);
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let host = Host::start_with(&sandbox, file_host_config(&sandbox, &cert_path, &key_path)).await;
    let https_port = host.https_port.expect("the ready file gives https_port");
    assert_ne!(https_port, host.http_port);

    let backend = Backend::start("tls-backend").await;
    let alice = sandbox.key("alice");
    let ca_pem = ca.pem();
    let (_tunnel, fqdn) = https_tunnel(&host, &sandbox, &alice, &backend, &ca_pem).await;
    // The printed URL is the HTTPS one.
    let info = host.info(&sandbox, &alice).await;
    assert_eq!(info.url, format!("https://{fqdn}:{https_port}"), "{info:?}");
    assert!(
        host.log()
            .contains(&format!("https edge listening on 127.0.0.1:{https_port}")),
        "{}",
        host.log()
    );

    let (status, body, leaf) = https_get(&[&ca_pem], &host, &fqdn, "/whoami")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, backend.id.as_str()));
    assert_eq!(leaf, first_der, "the file's certificate is served");
    // The base domain too, and plain HTTP still serves.
    let (status, _, _) = https_get(&[&ca_pem], &host, DOMAIN, "/").await.unwrap();
    assert_eq!(status, 200);
    let res = plain_get(&host, &fqdn, "/whoami").await;
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.text().await.unwrap(), backend.id);

    // New files: served without a restart.
    let (cert, key, second_der) = ca.leaf(&["*.p0rt.test", "p0rt.test"]);
    std::fs::write(&key_path, key).unwrap();
    std::fs::write(&cert_path, cert).unwrap();
    eventually(WAIT, "the new certificate served", || {
        let (ca_pem, fqdn, second_der) = (ca_pem.clone(), fqdn.clone(), second_der.clone());
        let host = &host;
        async move {
            let (_, _, leaf) = https_get(&[&ca_pem], host, &fqdn, "/whoami").await.ok()?;
            (leaf == second_der).then_some(())
        }
    })
    .await;
    assert!(
        host.log().contains("https: reloaded the certificate"),
        "{}",
        host.log()
    );

    // A broken file: the previous certificate stays, and the problem is logged once.
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    eventually(WAIT, "the bad certificate file logged", || {
        let log = host.log();
        async move {
            log.contains("still serving the previous certificate")
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _, leaf) = https_get(&[&ca_pem], &host, &fqdn, "/whoami")
        .await
        .unwrap();
    assert_eq!((status, leaf == second_der), (200, true));
    let log = host.log();
    assert_eq!(
        count(&log, "still serving the previous certificate"),
        1,
        "{log}"
    );
    assert!(
        log.contains(&cert_path.display().to_string()),
        "names the file: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_certificate_files_stop_startup_naming_the_file() {
    let sandbox = Sandbox::new();
    let ca = TestCa::new();
    let (cert, key, _) = ca.leaf(&["*.p0rt.test", "p0rt.test"]);
    let (good_cert, good_key) = (sandbox.join("good.crt"), sandbox.join("good.key"));
    std::fs::write(&good_cert, &cert).unwrap();
    std::fs::write(&good_key, &key).unwrap();
    let garbage = sandbox.join("garbage.pem");
    std::fs::write(&garbage, "hello\n").unwrap();
    let (_, other_key, _) = ca.leaf(&["other"]);
    let wrong_key = sandbox.join("wrong.key");
    std::fs::write(&wrong_key, other_key).unwrap();
    let missing = sandbox.join("missing.crt");

    for (cert, key, named, setting) in [
        (&missing, &good_key, &missing, "TLS_CERT_FILE"),
        (&garbage, &good_key, &garbage, "TLS_CERT_FILE"),
        (&good_cert, &garbage, &garbage, "TLS_KEY_FILE"),
        (&good_cert, &wrong_key, &wrong_key, "TLS_KEY_FILE"),
    ] {
        let config = file_host_config(&sandbox, cert, key);
        let (code, stderr) = run_host_to_exit(&sandbox, &config, STARTUP_TIMEOUT).await;
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains(&named.display().to_string()) && stderr.contains(setting),
            "names {} and {setting}: {stderr}",
            named.display()
        );
    }
    // Settings that cannot work are refused before anything is read.
    let config = host_config(&sandbox)
        .env("HTTPS_PORT", "0")
        .env("TLS_CERT_FILE", good_cert.to_string_lossy());
    let (code, stderr) = run_host_to_exit(&sandbox, &config, STARTUP_TIMEOUT).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("TLS_KEY_FILE"), "{stderr}");
    let config = host_config(&sandbox).env("HTTPS_REDIRECT", "true");
    let (code, stderr) = run_host_to_exit(&sandbox, &config, STARTUP_TIMEOUT).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("HTTPS_PORT"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_to_https_and_hsts_when_set() {
    let sandbox = Sandbox::new();
    let ca = TestCa::new();
    let (cert_path, key_path) = (sandbox.join("tls.crt"), sandbox.join("tls.key"));
    let (cert, key, _) = ca.leaf(&["*.p0rt.test", "p0rt.test"]);
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let config = file_host_config(&sandbox, &cert_path, &key_path)
        .env("HTTPS_REDIRECT", "true")
        .env("HSTS", "600");
    let host = Host::start_with(&sandbox, config).await;
    let https_port = host.https_port.unwrap();
    let backend = Backend::start("redirected").await;
    let alice = sandbox.key("alice");
    let ca_pem = ca.pem();
    let (_tunnel, fqdn) = https_tunnel(&host, &sandbox, &alice, &backend, &ca_pem).await;

    // Plain HTTP to a tunnel: 308 to the same URL over HTTPS; the backend is not reached.
    let hits = backend.hits();
    let plain = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = plain
        .post(host.url("/some/path?q=1"))
        .header(reqwest::header::HOST, format!("{fqdn}:{}", host.http_port))
        .body("kept by 308")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 308);
    assert_eq!(
        res.headers()["location"],
        format!("https://{fqdn}:{https_port}/some/path?q=1").as_str()
    );
    assert!(!res.headers().contains_key("strict-transport-security"));
    assert_eq!(backend.hits(), hits, "redirected before the backend");
    // The base domain is not redirected.
    assert_eq!(plain_get(&host, DOMAIN, "/").await.status().as_u16(), 200);

    // HTTPS answers carry HSTS, tunnel and base domain alike.
    let client = https_client(&[&ca_pem], &fqdn, host.https_addr());
    let res = client
        .get(format!("https://{fqdn}:{https_port}/whoami"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.headers()["strict-transport-security"], "max-age=600");
    // The backend is told the client came over TLS.
    let text = client
        .get(format!("https://{fqdn}:{https_port}/echo/headers"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let echo: serde_json::Value = serde_json::from_str(&text).unwrap();
    let protos: Vec<&serde_json::Value> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "x-forwarded-proto")
        .map(|h| &h[1])
        .collect();
    assert_eq!(protos, [&serde_json::json!("https")], "{echo}");
    let client = https_client(&[&ca_pem], DOMAIN, host.https_addr());
    let res = client
        .get(format!("https://{DOMAIN}:{https_port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["strict-transport-security"], "max-age=600");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_only_tunnels_pass_over_https_and_sessions_print_https_urls() {
    let sandbox = Sandbox::new();
    let ca = TestCa::new();
    let (cert_path, key_path) = (sandbox.join("tls.crt"), sandbox.join("tls.key"));
    let (cert, key, _) = ca.leaf(&["*.p0rt.test", "p0rt.test"]);
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let host = Host::start_with(&sandbox, file_host_config(&sandbox, &cert_path, &key_path)).await;
    let https_port = host.https_port.unwrap();
    let backend = Backend::start("https-only").await;
    let alice = sandbox.key("alice");
    let name = host.info(&sandbox, &alice).await.name;
    let fqdn = format!("{name}.{DOMAIN}");
    // The owner's `https-only` (the access plugin) sees the request's scheme.
    let mut session = host
        .ssh(&sandbox, &alice)
        .args(["-R", &format!("80:127.0.0.1:{}", backend.port)])
        .command("https-only")
        .spawn();
    session
        .wait_line("the session's prompt", |l| {
            l == "Press Ctrl-C to close the tunnel."
        })
        .await;
    let forwarding = format!("Forwarding https://{fqdn}:{https_port} -> your -R target");
    assert!(
        session.lines().contains(&forwarding),
        "no {forwarding:?} in {:?}",
        session.lines()
    );
    let ca_pem = ca.pem();
    let deadline = Instant::now() + WAIT;
    loop {
        match https_get(&[&ca_pem], &host, &fqdn, "/whoami").await {
            Ok((200, body, _)) => {
                assert_eq!(body, backend.id);
                break;
            }
            last if Instant::now() > deadline => panic!("not served over https: {last:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let res = plain_get(&host, &fqdn, "/x?y=1").await;
    assert_eq!(res.status().as_u16(), 308);
    assert_eq!(
        res.headers()["location"],
        format!("https://{fqdn}/x?y=1").as_str()
    );
}

// ---------------------------------------------------------------------------------------------
// ACME against Pebble
// ---------------------------------------------------------------------------------------------

/// Panics (never skips) when Pebble is missing.
fn require_pebble() {
    for tool in ["pebble", "pebble-challtestsrv"] {
        let found = std::process::Command::new(tool)
            .arg("-h")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(
            found,
            "`{tool}` not found: install pebble (apt-get install -y pebble)"
        );
    }
}

/// Pebble on loopback (validating TLS-ALPN-01 on `tls_port`) with its mock DNS server
/// (pebble-challtestsrv) answering 127.0.0.1 for every name.
struct Pebble {
    _pebble: tokio::process::Child,
    _dns: tokio::process::Child,
    log: PathBuf,
    /// The CA of Pebble's own HTTPS listener (for ACME_CA_CERT).
    listener_ca: PathBuf,
    directory: String,
    /// The root Pebble issues under (for the test's HTTPS client).
    root: String,
}

impl Pebble {
    async fn start(sandbox: &Sandbox, tls_port: u16, validity_seconds: Option<u64>) -> Pebble {
        require_pebble();
        let dir = sandbox.join("pebble");
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new();
        let (cert, key, _) = ca.leaf(&["localhost"]);
        let listener_ca = dir.join("listener-ca.pem");
        std::fs::write(&listener_ca, ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let (acme_port, management_port, dns_port) = (free_port(), free_port(), free_port());
        let mut pebble = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": free_port(),
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(seconds) = validity_seconds {
            pebble["certificateValidityPeriod"] = seconds.into();
        }
        let config = dir.join("pebble-config.json");
        std::fs::write(&config, serde_json::json!({ "pebble": pebble }).to_string()).unwrap();
        let dns = tokio::process::Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start pebble-challtestsrv");
        let log = dir.join("pebble.log");
        let out = std::fs::File::create(&log).unwrap();
        let pebble = tokio::process::Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("start pebble");
        let ca_pem = ca.pem();
        let client =
            |name: &str, port: u16| https_client(&[&ca_pem], name, ([127, 0, 0, 1], port).into());
        // By address: Pebble listens on 127.0.0.1 only (its certificate names both).
        let directory = format!("https://127.0.0.1:{acme_port}/dir");
        let dir_client = client("localhost", acme_port);
        eventually(STARTUP_TIMEOUT, "pebble's directory", || {
            let (client, url) = (dir_client.clone(), directory.clone());
            async move {
                let res = client.get(url).send().await.ok()?;
                res.status().is_success().then_some(())
            }
        })
        .await;
        let roots = client("localhost", management_port);
        let root = roots
            .get(format!("https://localhost:{management_port}/roots/0"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(root.contains("BEGIN CERTIFICATE"), "{root}");
        Pebble {
            _pebble: pebble,
            _dns: dns,
            log,
            listener_ca,
            directory,
            root,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn orders(&self) -> usize {
        count(&self.log(), "Added order")
    }
}

/// A host using `pebble` for certificates, HTTPS on `https_port`.
fn acme_host_config(sandbox: &Sandbox, pebble: &Pebble, https_port: u16) -> HostConfig {
    host_config(sandbox)
        .env("HTTPS_PORT", https_port.to_string())
        .env("ACME_DIRECTORY_URL", &pebble.directory)
        .env("ACME_CA_CERT", pebble.listener_ca.to_string_lossy())
        .env("ACME_EMAIL", "ops@example.com")
}

#[tokio::test(flavor = "multi_thread")]
async fn acme_certificates_on_demand_from_pebble() {
    let sandbox = Sandbox::new();
    let https_port = free_port();
    let pebble = Pebble::start(&sandbox, https_port, None).await;
    let mut host =
        Host::start_with(&sandbox, acme_host_config(&sandbox, &pebble, https_port)).await;
    assert_eq!(host.https_port, Some(https_port));
    let backend = Backend::start("acme-backend").await;
    let alice = sandbox.key("alice");
    let name = host.info(&sandbox, &alice).await.name;
    let _tunnel = host
        .ssh(&sandbox, &alice)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    let fqdn = format!("{name}.{DOMAIN}");
    eventually(WAIT, "the tunnel served over plain http", || {
        let (host, fqdn) = (&host, fqdn.clone());
        async move { (plain_get(host, &fqdn, "/whoami").await.status() == 200).then_some(()) }
    })
    .await;
    let root = pebble.root.clone();
    assert_eq!(
        pebble.orders(),
        0,
        "nothing ordered before the first handshake"
    );

    // A name not in the store: handshake refused, nothing asked of the ACME server.
    let refused = https_get(&[&root], &host, &format!("nobody-here.{DOMAIN}"), "/").await;
    assert!(refused.is_err(), "{refused:?}");
    let refused = https_get(&[&root], &host, &format!("a.{fqdn}"), "/").await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(pebble.orders(), 0, "{}", pebble.log());

    // First request: a certificate is ordered, validated (tls-alpn-01 on the host's own
    // listener) and served; the request goes through.
    let started = Instant::now();
    let (status, body, first_leaf) = https_get(&[&root], &host, &fqdn, "/whoami")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e:?}; host log:\n{}\npebble log:\n{}",
                host.log(),
                pebble.log()
            )
        });
    assert_eq!((status, body.as_str()), (200, backend.id.as_str()));
    eprintln!("first HTTPS request with issuance: {:?}", started.elapsed());
    assert_eq!(pebble.orders(), 1, "{}", pebble.log());
    let log = host.log();
    assert_eq!(
        count(&log, &format!("ordering a certificate for {fqdn}")),
        1,
        "{log}"
    );
    assert!(
        log.contains(&format!("certificate for {fqdn} issued")),
        "{log}"
    );
    assert!(
        sandbox
            .data_dir()
            .join("acme/certs")
            .join(format!("{fqdn}.pem"))
            .is_file()
    );
    assert!(sandbox.data_dir().join("acme/account.json").is_file());

    // Second request (new connection): the same certificate, no new order.
    let (status, _, leaf) = https_get(&[&root], &host, &fqdn, "/whoami").await.unwrap();
    assert_eq!((status, leaf == first_leaf), (200, true));
    assert_eq!(pebble.orders(), 1);

    // After a restart the stored certificate is served: no new order, no new account.
    host.restart().await;
    let (_tunnel2, _) = https_tunnel(&host, &sandbox, &alice, &backend, &root).await;
    let (status, body, leaf) = https_get(&[&root], &host, &fqdn, "/whoami").await.unwrap();
    assert_eq!((status, body.as_str()), (200, backend.id.as_str()));
    assert_eq!(leaf, first_leaf, "the stored certificate");
    assert_eq!(pebble.orders(), 1, "{}", pebble.log());
    let log = host.log();
    assert!(
        log.contains(&format!("serving the stored certificate for {fqdn}")),
        "{log}"
    );
    assert_eq!(count(&log, "ordering a certificate"), 0, "{log}");
    assert_eq!(count(&pebble.log(), "There are now 1 accounts"), 1);
    assert!(
        !pebble.log().contains("There are now 2 accounts"),
        "{}",
        pebble.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn acme_certificates_are_renewed_before_expiry() {
    let sandbox = Sandbox::new();
    let https_port = free_port();
    // 30 s certificates: renewal is due at 20 s.
    let pebble = Pebble::start(&sandbox, https_port, Some(30)).await;
    let host = Host::start_with(&sandbox, acme_host_config(&sandbox, &pebble, https_port)).await;
    let backend = Backend::start("renewed").await;
    let alice = sandbox.key("alice");
    let root = pebble.root.clone();
    let (_tunnel, fqdn) = https_tunnel(&host, &sandbox, &alice, &backend, &root).await;
    let (status, _, first_leaf) = https_get(&[&root], &host, &fqdn, "/whoami").await.unwrap();
    assert_eq!(status, 200);
    let renewed = eventually(
        Duration::from_secs(60),
        "a renewed certificate served",
        || {
            let (root, fqdn, host, first) = (root.clone(), fqdn.clone(), &host, first_leaf.clone());
            async move {
                let (_, _, leaf) = https_get(&[&root], host, &fqdn, "/whoami").await.ok()?;
                (!leaf.is_empty() && leaf != first).then_some(leaf)
            }
        },
    )
    .await;
    assert!(!renewed.is_empty());
    let log = host.log();
    assert!(
        log.contains(&format!("renewing the certificate for {fqdn}")),
        "{log}"
    );
    assert_eq!(pebble.orders(), 2, "{}", pebble.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn acme_certificates_are_shared_by_hosts_on_one_redis() {
    crate::redis_support::require_redis();
    let sandbox = Sandbox::new();
    let redis = crate::redis_support::RedisServer::start().await;
    let https_port = free_port();
    let pebble = Pebble::start(&sandbox, https_port, None).await;
    let on_redis = |dir: &str, port: u16| {
        HostConfig::flags(&sandbox.join(dir))
            .arg("--domain")
            .arg(DOMAIN)
            .env("STORAGE_TYPE", "redis")
            .env("REDIS_URL", redis.url())
            .env("HTTPS_PORT", port.to_string())
            .env("ACME_DIRECTORY_URL", &pebble.directory)
            .env("ACME_CA_CERT", pebble.listener_ca.to_string_lossy())
    };
    // Host a is the one Pebble validates against (its HTTPS port is Pebble's tlsPort).
    let a = Host::start_with(&sandbox, on_redis("a", https_port)).await;
    let b = Host::start_with(&sandbox, on_redis("b", free_port())).await;
    let backend = Backend::start("shared").await;
    let alice = sandbox.key("alice");
    let root = pebble.root.clone();
    let (_tunnel, fqdn) = https_tunnel(&a, &sandbox, &alice, &backend, &root).await;
    assert_eq!(pebble.orders(), 1, "{}", pebble.log());
    let (_, _, leaf_a) = https_get(&[&root], &a, &fqdn, "/whoami").await.unwrap();

    // Host b serves the certificate a stored in Redis, without an order of its own.
    let (_, _, leaf_b) = https_get(&[&root], &b, &fqdn, "/whoami")
        .await
        .unwrap_or_else(|e| panic!("{e:?}; host b log:\n{}", b.log()));
    assert_eq!(leaf_b, leaf_a);
    assert_eq!(pebble.orders(), 1, "{}", pebble.log());
    assert_eq!(count(&b.log(), "ordering a certificate"), 0, "{}", b.log());
    assert!(
        !sandbox
            .join("a/acme/certs")
            .join(format!("{fqdn}.pem"))
            .exists()
    );
    let mut conn = redis.client().await;
    let stored: Option<String> = redis::cmd("GET")
        .arg(format!("p0rt:acme:cert:{fqdn}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(stored.is_some_and(|pem| pem.contains("BEGIN CERTIFICATE")));
    let account: Option<String> = redis::cmd("GET")
        .arg("p0rt:acme:account")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(account.is_some());
}
