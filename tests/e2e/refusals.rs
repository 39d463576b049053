//! Everything the SSH edge must refuse: -L, -W, -D, -R to other ports, passwords, unknown keys.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Waits until something listens on 127.0.0.1:`port` (the ssh client's local forward).
async fn wait_listening(port: u16, client: &SshClient) -> TcpStream {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
            return stream;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ssh never listened on {port}; ssh stderr {:?}",
            client.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_forward_and_stdio_forward_are_refused() {
    let sb = Sandbox::new();
    let key = sb.key("l");
    let backend = Backend::start("not-a-relay").await;
    let host = Host::start(&sb).await;

    // -L: ssh listens locally, but the host refuses the direct-tcpip channel.
    let local = free_port();
    let client = host
        .ssh(&sb, &key)
        .args(["-N", "-L", &format!("{local}:127.0.0.1:{}", backend.port)])
        .spawn();
    let mut stream = wait_listening(local, &client).await;
    stream
        .write_all(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (bytes, closed) = read_until_closed(&mut stream, WAIT).await;
    assert!(closed, "-L connection stayed open");
    assert!(
        bytes.is_empty(),
        "-L relayed data: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(backend.hits(), 0, "backend reached through -L");
    eventually(WAIT, "ssh to report the refused channel", || async {
        client
            .stderr()
            .contains("administratively prohibited")
            .then_some(())
    })
    .await;

    // -W (stdio forwarding) is the same channel type and must fail.
    let out = host
        .ssh(&sb, &key)
        .args(["-W", &format!("127.0.0.1:{}", backend.port)])
        .output()
        .await;
    assert!(!out.status.success(), "ssh -W succeeded: {:?}", out.stdout);
    assert!(
        out.stderr.contains("administratively prohibited"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("HTTP/"), "{}", out.stdout);
    assert_eq!(backend.hits(), 0, "backend reached through -W");
    assert!(host.log().contains("refused -L/-D"), "{}", host.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn dynamic_forward_is_refused() {
    let sb = Sandbox::new();
    let key = sb.key("d");
    let backend = Backend::start("not-a-socks-proxy").await;
    let host = Host::start(&sb).await;

    let socks = free_port();
    let client = host
        .ssh(&sb, &key)
        .args(["-N", "-D", &socks.to_string()])
        .spawn();
    let mut stream = wait_listening(socks, &client).await;
    // SOCKS5: no auth, then CONNECT 127.0.0.1:<backend>.
    stream.write_all(&[5, 1, 0]).await.unwrap();
    let mut greeting = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, [5, 0]);
    let [hi, lo] = backend.port.to_be_bytes();
    stream
        .write_all(&[5, 1, 0, 1, 127, 0, 0, 1, hi, lo])
        .await
        .unwrap();
    // OpenSSH may answer the CONNECT before the host refuses; the request must still go nowhere.
    let _ = stream
        .write_all(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await;
    let (bytes, closed) = read_until_closed(&mut stream, WAIT).await;
    assert!(closed, "-D connection stayed open");
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("HTTP/"), "-D relayed a response: {text:?}");
    assert!(
        bytes.len() <= 10,
        "more than a SOCKS reply came back: {bytes:?}"
    );
    assert_eq!(backend.hits(), 0, "backend reached through -D");
    eventually(WAIT, "ssh to report the refused channel", || async {
        client
            .stderr()
            .contains("administratively prohibited")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_forward_to_other_ports_is_refused() {
    let sb = Sandbox::new();
    let key = sb.key("r");
    let backend = Backend::start("r-backend").await;
    let host = Host::start(&sb).await;

    for port in ["8080", "22", "0"] {
        let out = host
            .ssh(&sb, &key)
            .args(["-N", "-R", &format!("{port}:127.0.0.1:{}", backend.port)])
            .output()
            .await;
        assert!(!out.status.success(), "-R {port} accepted");
        assert!(
            out.stderr.contains("remote port forwarding failed"),
            "-R {port}: {}",
            out.stderr
        );
    }
    assert!(host.log().contains("refused -R 8080"), "{}", host.log());
    // 443 is served like 80.
    let name = host.info(&sb, &key).await.name;
    let _ok = host
        .ssh(&sb, &key)
        .args(["-N", "-R", &format!("443:127.0.0.1:{}", backend.port)])
        .spawn();
    host.wait_served(&name, &backend).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn password_and_keyboard_interactive_are_refused() {
    let sb = Sandbox::new();
    let key = sb.key("pw");
    let host = Host::start(&sb).await;
    // An askpass that would answer any prompt, and leaves a trace if ssh ever asks.
    let marker = sb.join("askpass-called");
    let askpass = sb.join("askpass.sh");
    std::fs::write(
        &askpass,
        format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\necho hunter2\n",
            marker.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let out = host
        .ssh(&sb, &key)
        .opt("PubkeyAuthentication=no")
        .opt("PreferredAuthentications=password,keyboard-interactive")
        .opt("BatchMode=no")
        .opt("NumberOfPasswordPrompts=1")
        .env("SSH_ASKPASS", askpass.to_string_lossy())
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .args(["-v"])
        .command("info")
        .output()
        .await;
    assert_eq!(
        out.status.code(),
        Some(255),
        "password login: {}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("Permission denied (publickey)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("Authentications that can continue: publickey\n"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("name:"), "{}", out.stdout);
    assert!(
        !marker.exists(),
        "the server offered a password/keyboard-interactive prompt"
    );

    // Control: the same key with public-key auth gets in.
    host.info(&sb, &key).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn authorized_keys_restricts_keys() {
    let sb = Sandbox::new();
    let (allowed, other) = (sb.key("allowed"), sb.key("other"));
    let backend = Backend::start("restricted").await;
    let authorized = sb.join("authorized_keys");
    std::fs::write(
        &authorized,
        format!("# operator list\n{}\n", allowed.public),
    )
    .unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--authorized-keys")
        .arg(authorized.to_string_lossy());
    let host = Host::start_with(&sb, config).await;

    let info = host.info(&sb, &allowed).await;
    assert_eq!(info.key, allowed.fingerprint());

    let refused = host.ssh(&sb, &other).command("info").output().await;
    assert_eq!(refused.status.code(), Some(255), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("Permission denied"),
        "{}",
        refused.stderr
    );
    let refused_tunnel = host
        .ssh(&sb, &other)
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .output()
        .await;
    assert_eq!(refused_tunnel.status.code(), Some(255));
    // The refused key got no name.
    let stats = host.get_base("/domain-stats").await.json_value().await;
    assert_eq!(stats["total_domains"], 1, "{stats}");

    // The file is re-read: adding the key lets it in without a restart.
    std::fs::write(
        &authorized,
        format!("{}\n{}\n", allowed.public, other.public),
    )
    .unwrap();
    let now_allowed = host.info(&sb, &other).await;
    assert_ne!(now_allowed.name, info.name);
}

/// Signs `key` with `ca` into the `KEY-cert.pub` that `ssh -i KEY` offers on its own.
fn certify(key: &Key, ca: &Key) {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca.path)
        .args(["-I", "certified", "-n", "p0rt", "-V", "+1h"])
        .arg(key.path.with_extension("pub"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ssh-keygen -s");
    assert!(
        out.status.success(),
        "ssh-keygen -s failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// OpenSSH certificates are no way in: a name belongs to a plain public key. With a
/// certificate beside the key (`ssh -i KEY` loads `KEY-cert.pub` too), the plain key still
/// logs in under its name. A client that offers only the certificate is refused at the offer
/// (never told "key accepted", so it does not sign), and in open access that is no failed
/// login of the address (no ban).
#[tokio::test(flavor = "multi_thread")]
async fn certificates_are_refused_and_the_plain_key_still_logs_in() {
    require_tools();
    let sb = Sandbox::new();
    let host = Host::start(&sb).await;
    let key = sb.key("certified");
    let name = host.info(&sb, &key).await.name;
    certify(&key, &sb.key("ca"));
    assert_eq!(host.info(&sb, &key).await.name, name);

    // More attempts than the first ban tier (3 failed connections).
    for attempt in 1..=4 {
        let out = host
            .ssh(&sb, &key)
            .opt("PubkeyAcceptedAlgorithms=ssh-ed25519-cert-v01@openssh.com")
            .args(["-v"])
            .command("info")
            .output()
            .await;
        assert!(
            out.stderr.contains("Offering public key") && out.stderr.contains("ED25519-CERT"),
            "attempt {attempt}: the certificate was not offered: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("Server accepts key"),
            "attempt {attempt}: the host accepted the certificate's offer: {}",
            out.stderr
        );
        assert!(
            !out.status.success() && !out.stdout.contains("name:"),
            "attempt {attempt}: a certificate logged in: {} {}\n{}",
            out.status,
            out.stdout,
            host.log()
        );
    }
    assert_eq!(host.info(&sb, &key).await.name, name);
    assert!(!host.log().contains("banned"), "{}", host.log());
}

/// With access limited to a key list, a certificate is refused at the offer all the same,
/// and counts toward a ban of the address exactly as the key inside would: a listed key's
/// certificate never, an unlisted key's certificate at each connection.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_count_toward_a_ban_as_the_key_inside_would() {
    require_tools();
    let sb = Sandbox::new();
    let listed = sb.key("listed-certified");
    let unlisted = sb.key("unlisted-certified");
    let ca = sb.key("ca2");
    certify(&listed, &ca);
    certify(&unlisted, &ca);
    let allowed = sb.join("authorized_keys");
    std::fs::write(&allowed, format!("{}\n", listed.public)).unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--authorized-keys")
        .arg(allowed.to_string_lossy())
        .env("BAN_TIERS", "3:1h");
    let host = Host::start_with(&sb, config).await;
    let offer_certificate_only = |key: &Key, source: &'static str| {
        host.ssh(&sb, key)
            .opt("PubkeyAcceptedAlgorithms=ssh-ed25519-cert-v01@openssh.com")
            .args(["-v", "-b", source])
            .command("info")
            .output()
    };

    for attempt in 1..=4 {
        let out = offer_certificate_only(&listed, "127.0.0.21").await;
        assert!(
            !out.status.success(),
            "attempt {attempt}: a certificate logged in"
        );
        assert!(
            !out.stderr.contains("Server accepts key"),
            "attempt {attempt}: the host accepted the certificate's offer: {}",
            out.stderr
        );
    }
    for attempt in 1..=3 {
        let out = offer_certificate_only(&unlisted, "127.0.0.22").await;
        assert!(
            !out.status.success(),
            "attempt {attempt}: a certificate logged in"
        );
    }
    eventually(
        Duration::from_secs(10),
        "the unlisted key's address to be banned",
        || async { host.log().contains("banned 127.0.0.22").then_some(()) },
    )
    .await;
    assert!(!host.log().contains("banned 127.0.0.21"), "{}", host.log());
    // The listed key's own address still gets in with the plain key.
    let out = host
        .ssh(&sb, &listed)
        .args(["-b", "127.0.0.21"])
        .command("info")
        .output()
        .await;
    assert!(out.status.success(), "{}", out.stderr);
}
