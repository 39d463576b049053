//! Host keys as P0rt left them: `./ssh_host_key` (RSA, PKCS#1 PEM) or the PEM text in
//! `SSH_HOST_KEY`, served beside p0rt's ed25519 key and checked with the real `ssh-keyscan`
//! and `ssh` (StrictHostKeyChecking=yes against a `known_hosts` holding only the RSA key).

use std::path::Path;
use std::time::Duration;

use crate::support::*;

/// Startup failures must happen quickly; anything longer means p0rt started serving.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes an RSA host key as P0rt does: 2048 bits, PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`).
pub(crate) fn p0rt_rsa_key(path: &Path) {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-q", "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "{text:.40}"
    );
}

/// `ssh-keyscan -t TYPE` against the host: the `known_hosts` lines it prints.
pub(crate) fn keyscan(host: &Host, kind: &str) -> String {
    let out = std::process::Command::new("ssh-keyscan")
        .args([
            "-T",
            "5",
            "-t",
            kind,
            "-p",
            &host.ssh_port.to_string(),
            "127.0.0.1",
        ])
        .output()
        .expect("run ssh-keyscan (openssh-client)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `SHA256:…` of each key in `known_hosts` text, per `ssh-keygen -lf`.
pub(crate) fn fingerprints(dir: &Path, known_hosts: &str) -> Vec<String> {
    let file = dir.join("scanned");
    std::fs::write(&file, known_hosts).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{known_hosts:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect()
}

/// A `known_hosts` file that holds only the public half of `private_key`, for this host.
fn known_hosts_with(sb: &Sandbox, host: &Host, private_key: &Path) -> std::path::PathBuf {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(private_key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(public.starts_with("ssh-rsa "), "{public}");
    let path = sb.join("rsa_known_hosts");
    std::fs::write(&path, format!("[127.0.0.1]:{} {public}\n", host.ssh_port)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn p0rt_rsa_key_in_working_directory_is_served_beside_ed25519() {
    let sb = Sandbox::new();
    // The host's working directory is the sandbox: P0rt's key sits where P0rt keeps it.
    let rsa_file = sb.join("ssh_host_key");
    p0rt_rsa_key(&rsa_file);
    let original = std::fs::read(&rsa_file).unwrap();
    let rsa_fp = fingerprint_of(&rsa_file);

    let mut host = Host::start(&sb).await;
    let ed_file = sb.data_dir().join("ssh_host_ed25519_key");
    let ed_fp = fingerprint_of(&ed_file);
    let log = host.log();
    assert!(
        log.contains(&format!("loaded SSH host key ssh_host_key ({rsa_fp}): RSA 2048 bits as rsa-sha2-512, rsa-sha2-256")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "generated SSH host key {} ({ed_fp}): ssh-ed25519",
            ed_file.display()
        )),
        "{log}"
    );

    // ssh-keyscan sees both keys, and the RSA one is P0rt's.
    let rsa_scan = keyscan(&host, "rsa");
    assert_eq!(
        fingerprints(sb.path(), &rsa_scan),
        std::slice::from_ref(&rsa_fp),
        "{rsa_scan}"
    );
    let ed_scan = keyscan(&host, "ed25519");
    assert_eq!(
        fingerprints(sb.path(), &ed_scan),
        std::slice::from_ref(&ed_fp),
        "{ed_scan}"
    );

    // A P0rt user: known_hosts holds only the RSA key, strict checking on.
    let known_hosts = known_hosts_with(&sb, &host, &rsa_file);
    let key = sb.key("p0rt-user");
    let strict = |host: &Host, algorithms: Option<&str>| {
        let mut ssh = host
            .ssh(&sb, &key)
            .opt("StrictHostKeyChecking=yes")
            .known_hosts(&known_hosts);
        if let Some(algorithms) = algorithms {
            ssh = ssh.opt(&format!("HostKeyAlgorithms={algorithms}"));
        }
        ssh
    };
    for algorithms in [Some("rsa-sha2-256"), Some("rsa-sha2-512"), None] {
        let out = strict(&host, algorithms).command("info").output().await;
        assert!(
            out.status.success(),
            "{algorithms:?}: {}\np0rt:\n{}",
            out.stderr,
            host.log()
        );
        assert_eq!(Info::parse(&out.stdout).key, key.fingerprint());
    }
    // And gets a tunnel that way.
    let backend = Backend::start("rsa-pinned").await;
    let name = host.info(&sb, &key).await.name;
    let _client = strict(&host, Some("rsa-sha2-256"))
        .args(["-N", "-R", &format!("80:127.0.0.1:{}", backend.port)])
        .spawn();
    host.wait_served(&name, &backend).await;
    assert_eq!(host.whoami(&name).await, (200, "rsa-pinned".to_string()));

    // SHA-1 `ssh-rsa` is never offered.
    let out = strict(&host, Some("ssh-rsa"))
        .command("info")
        .output()
        .await;
    assert!(!out.status.success(), "ssh-rsa (SHA-1) was accepted");
    assert!(
        out.stderr.contains("no matching host key type"),
        "{}",
        out.stderr
    );

    // Control: the pin is real — a known_hosts with another RSA key is refused.
    let other = sb.join("other_rsa");
    p0rt_rsa_key(&other);
    let wrong = known_hosts_with(&sb, &host, &other);
    let out = host
        .ssh(&sb, &key)
        .opt("StrictHostKeyChecking=yes")
        .opt("HostKeyAlgorithms=rsa-sha2-256")
        .known_hosts(&wrong)
        .command("info")
        .output()
        .await;
    assert!(
        !out.status.success(),
        "a different RSA host key was accepted"
    );
    assert!(
        out.stderr.contains("HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        out.stderr
    );

    // Restart: both keys as they were, nothing regenerated.
    host.restart().await;
    assert_eq!(std::fs::read(&rsa_file).unwrap(), original);
    assert!(
        !host.log().contains("generated SSH host key"),
        "{}",
        host.log()
    );
    assert_eq!(fingerprints(sb.path(), &keyscan(&host, "rsa")), [rsa_fp]);
    assert_eq!(fingerprints(sb.path(), &keyscan(&host, "ed25519")), [ed_fp]);
}

#[tokio::test(flavor = "multi_thread")]
async fn pem_text_in_ssh_host_key_is_served() {
    let sb = Sandbox::new();
    let rsa_file = sb.join("elsewhere_rsa");
    p0rt_rsa_key(&rsa_file);
    let pem = std::fs::read_to_string(&rsa_file).unwrap();
    let rsa_fp = fingerprint_of(&rsa_file);

    let host = Host::start_with(
        &sb,
        HostConfig::flags(&sb.data_dir()).env("SSH_HOST_KEY", pem.clone()),
    )
    .await;
    let log = host.log();
    assert!(
        log.contains(&format!(
            "loaded SSH host key from SSH_HOST_KEY (ssh.host_key) ({rsa_fp})"
        )),
        "{log}"
    );
    // The key text itself never reaches the log.
    let body = pem.lines().nth(1).unwrap();
    assert!(!log.contains(body), "{log}");

    assert_eq!(fingerprints(sb.path(), &keyscan(&host, "rsa")), [rsa_fp]);
    let ed_file = sb.data_dir().join("ssh_host_ed25519_key");
    assert_eq!(
        fingerprints(sb.path(), &keyscan(&host, "ed25519")),
        [fingerprint_of(&ed_file)]
    );

    let known_hosts = known_hosts_with(&sb, &host, &rsa_file);
    let key = sb.key("env-user");
    let out = host
        .ssh(&sb, &key)
        .opt("StrictHostKeyChecking=yes")
        .opt("HostKeyAlgorithms=rsa-sha2-256")
        .known_hosts(&known_hosts)
        .command("info")
        .output()
        .await;
    assert!(out.status.success(), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_p0rt_key_exits_2_and_is_left_alone() {
    let sb = Sandbox::new();
    let rsa_file = sb.join("ssh_host_key");
    // A key cut short, as a failed copy leaves it.
    p0rt_rsa_key(&rsa_file);
    let full = std::fs::read_to_string(&rsa_file).unwrap();
    let cut: String = full.lines().take(5).map(|l| format!("{l}\n")).collect();
    let corrupt = format!("{cut}-----END RSA PRIVATE KEY-----\n");
    std::fs::write(&rsa_file, &corrupt).unwrap();

    let config = HostConfig::flags(&sb.data_dir()).cold();
    let (code, stderr) = run_host_to_exit(&sb, &config, EXIT_TIMEOUT).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot load SSH host key ssh_host_key")
            && stderr.contains("does not parse"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&rsa_file).unwrap(),
        corrupt,
        "the file was changed"
    );
    assert!(
        !sb.data_dir().join("ssh_host_ed25519_key").exists(),
        "a key was generated although the host did not start"
    );

    // Not a key at all (say, the public half copied by mistake): same outcome.
    let public = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ p0rt\n";
    std::fs::write(&rsa_file, public).unwrap();
    let (code, stderr) = run_host_to_exit(&sb, &config, EXIT_TIMEOUT).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("ssh_host_key") && stderr.contains("not a private key"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&rsa_file).unwrap(), public);
}
