//! Startup: configuration errors, corrupt stores, the data-dir lock, the host key.

use std::time::Duration;

use crate::support::*;

/// Startup failures must happen quickly; anything longer means p0rt started serving.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

async fn assert_corrupt_store_refused(content: &[u8]) {
    let sb = Sandbox::new();
    let data = sb.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    let path = data.join("domains.json");
    std::fs::write(&path, content).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();

    let (code, stderr) = run_host_to_exit(&sb, &HostConfig::flags(&data), EXIT_TIMEOUT).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "p0rt did not fail (exit {code:?}): {stderr}"
    );
    assert!(
        stderr.contains("domains.json"),
        "error does not name the file: {stderr}"
    );
    assert!(
        stderr.contains("unreadable"),
        "error does not say what is wrong: {stderr}"
    );
    assert!(
        !stderr.contains("listening on"),
        "p0rt started serving: {stderr}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        content,
        "domains.json was modified"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        mtime,
        "domains.json was rewritten"
    );
    assert!(
        !data.join("domains.json.tmp").exists(),
        "a replacement was staged"
    );

    // Once repaired, the same data dir starts.
    std::fs::write(&path, "{}").unwrap();
    let _host = Host::start_with(&sb, HostConfig::flags(&data)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_domains_json_is_refused_and_untouched() {
    assert_corrupt_store_refused(
        br#"{
  "4f1c2a": {
    "domain": "whale-guitar-fox",
    "ssh_key_hash": "4f1c2a",
    "first_seen": "2022-01-01T00:00:00Z",
    "last_se"#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn non_json_domains_json_is_refused_and_untouched() {
    assert_corrupt_store_refused(b"this is not JSON at all\n\x00\x01").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_shape_domains_json_is_refused_and_untouched() {
    assert_corrupt_store_refused(br#"[{"domain": "whale-guitar-fox", "ssh_key_hash": "4f1c2a"}]"#)
        .await;
}

async fn assert_config_error(sb: &Sandbox, config: HostConfig, must_name: &[&str]) {
    let (code, stderr) = run_host_to_exit(sb, &config, EXIT_TIMEOUT).await;
    assert_eq!(
        code,
        Some(2),
        "expected exit 2 for a configuration error; stderr: {stderr}"
    );
    for needle in must_name {
        assert!(
            stderr.contains(needle),
            "error does not name {needle:?}: {stderr}"
        );
    }
    assert!(
        !stderr.contains("listening on"),
        "p0rt started serving: {stderr}"
    );
    assert!(
        !sb.data_dir().exists(),
        "p0rt touched its data dir despite a config error"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_yaml_key_exits_2_naming_the_key() {
    let sb = Sandbox::new();
    let file = sb.join("p0rt.yaml");
    std::fs::write(&file, "ssh:\n  port: 0\n  prot: 2222\nhttp:\n  port: 0\n").unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--config")
        .arg(file.to_string_lossy());
    assert_config_error(&sb, config, &["prot", "p0rt.yaml"]).await;

    let top = sb.join("top.yaml");
    std::fs::write(&top, "domian:\n  base: example.com\n").unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--config")
        .arg(top.to_string_lossy());
    assert_config_error(&sb, config, &["domian", "top.yaml"]).await;

    // Control: the same file without the typo is accepted.
    std::fs::write(&file, "ssh:\n  port: 0\nhttp:\n  port: 0\n").unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--config")
        .arg(file.to_string_lossy());
    let _host = Host::start_with(&sb, config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_port_environment_value_exits_2_naming_the_variable() {
    let sb = Sandbox::new();
    // Only the environment sets the ports here (flags would win over it).
    let base = || HostConfig::env_only(&sb.data_dir());
    assert_config_error(
        &sb,
        base().env("SSH_SERVER_PORT", "70000").env("HTTP_PORT", "0"),
        &["SSH_SERVER_PORT", "70000"],
    )
    .await;
    assert_config_error(
        &sb,
        base()
            .env("SSH_SERVER_PORT", "0")
            .env("HTTP_PORT", "eighty"),
        &["HTTP_PORT", "eighty"],
    )
    .await;
    assert_config_error(
        &sb,
        base()
            .env("SSH_SERVER_PORT", "0")
            .env("HTTP_PORT", "0")
            .env("STORAGE_TYPE", "mongo"),
        &["STORAGE_TYPE", "json"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_config_file_exits_2_naming_the_file() {
    let sb = Sandbox::new();
    let missing = sb.join("does-not-exist.yaml");
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--config")
        .arg(missing.to_string_lossy());
    assert_config_error(&sb, config, &["does-not-exist.yaml"]).await;

    // A directory cannot be read as a file either.
    let dir = sb.join("a-directory.yaml");
    std::fs::create_dir(&dir).unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--config")
        .arg(dir.to_string_lossy());
    assert_config_error(&sb, config, &["a-directory.yaml"]).await;

    // Not YAML at all.
    let garbage = sb.join("garbage.yaml");
    std::fs::write(&garbage, "ssh: [unclosed\n  : :\n").unwrap();
    let config = HostConfig::flags(&sb.data_dir())
        .arg("--config")
        .arg(garbage.to_string_lossy());
    assert_config_error(&sb, config, &["garbage.yaml"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn second_process_on_same_data_dir_is_refused() {
    let sb = Sandbox::new();
    let key = sb.key("lock");
    let backend = Backend::start("lock-backend").await;
    let mut first = Host::start(&sb).await;
    let (_client, name) = first.tunnel(&sb, &key, &backend).await;
    let before = std::fs::read(sb.data_dir().join("domains.json")).unwrap();

    // Plain `p0rt` (no subcommand) on the same data dir.
    let mut second = HostConfig::flags(&sb.data_dir());
    second.args.remove(0);
    let (code, stderr) = run_host_to_exit(&sb, &second, EXIT_TIMEOUT).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "second p0rt did not fail (exit {code:?}): {stderr}"
    );
    assert!(stderr.contains("in use by another p0rt"), "{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");
    assert_eq!(
        std::fs::read(sb.data_dir().join("domains.json")).unwrap(),
        before
    );

    // The first one is unaffected.
    assert!(first.is_running());
    assert_eq!(first.whoami(&name).await, (200, "lock-backend".to_string()));

    // Once it stops, the lock is released and the data dir can be used again.
    let status = first.stop().await;
    assert!(status.success(), "{status}");
    let third = Host::start(&sb).await;
    assert_eq!(third.info(&sb, &key).await.name, name);
}

fn logged_fingerprint(log: &str, marker: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} line in:\n{log}"));
    let start = line.find("(SHA256:").expect("fingerprint in log line") + 1;
    let end = start + line[start..].find(')').unwrap();
    line[start..end].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn host_key_is_generated_once_and_reused() {
    let sb = Sandbox::new();
    let key = sb.key("hk");
    let known_hosts = sb.join("pinned_known_hosts");
    // Cold: a data dir with nothing in it, as on a fresh machine.
    let mut host = Host::start_with(&sb, HostConfig::flags(&sb.data_dir()).cold()).await;
    let key_file = sb.data_dir().join("ssh_host_ed25519_key");
    let original = std::fs::read(&key_file).expect("host key written on first start");
    let generated = logged_fingerprint(&host.log(), "generated SSH host key");
    assert_eq!(generated, fingerprint_of(&key_file));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "host key readable by others: {mode:o}");
    }

    // Pin the host key under a port-independent alias.
    let pinned = |host: &Host, strict: &str| {
        host.ssh(&sb, &key)
            .opt(&format!("StrictHostKeyChecking={strict}"))
            .opt("HostKeyAlias=p0rt-under-test")
            .known_hosts(&known_hosts)
            .command("info")
    };
    let out = pinned(&host, "accept-new").output().await;
    assert!(out.status.success(), "{}", out.stderr);
    let scanned = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(
        scanned.contains("p0rt-under-test ssh-ed25519 "),
        "{scanned}"
    );

    host.restart().await;
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        original,
        "host key file changed on restart"
    );
    assert_eq!(
        logged_fingerprint(&host.log(), "loaded SSH host key"),
        generated
    );
    assert!(
        !host.log().contains("generated SSH host key"),
        "{}",
        host.log()
    );
    // The server presents the same key: strict checking against the pin passes.
    let out = pinned(&host, "yes").output().await;
    assert!(
        out.status.success(),
        "host key changed across restart: {}",
        out.stderr
    );

    // Control: a host with another data dir has another key, and the pin catches it.
    let other_sb = Sandbox::new();
    let other = Host::start(&other_sb).await;
    let out = pinned(&other, "yes").output().await;
    assert!(!out.status.success(), "a different host key was accepted");
    assert!(
        out.stderr.contains("HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_host_key_exits_2_and_is_never_replaced() {
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.data_dir()).unwrap();
    let key_file = sb.data_dir().join("ssh_host_ed25519_key");
    let garbage =
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n";
    std::fs::write(&key_file, garbage).unwrap();
    let config = HostConfig::flags(&sb.data_dir()).cold();
    let (code, stderr) = run_host_to_exit(&sb, &config, EXIT_TIMEOUT).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("ssh_host_ed25519_key") && stderr.contains("cannot load SSH host key"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        garbage,
        "the bad key file must be left as it was"
    );

    // Inline key text (SSH_HOST_KEY) that does not parse: exit 2, and the text is not echoed.
    std::fs::remove_file(&key_file).unwrap();
    let config = HostConfig::flags(&sb.data_dir()).cold().env(
        "SSH_HOST_KEY",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-ish\n",
    );
    let (code, stderr) = run_host_to_exit(&sb, &config, EXIT_TIMEOUT).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("SSH_HOST_KEY") && !stderr.contains("secret-ish"),
        "{stderr}"
    );
    assert!(
        !key_file.exists(),
        "no key generated when SSH_HOST_KEY is given"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn numeric_settings_out_of_range_exit_2_naming_the_setting() {
    let sb = Sandbox::new();
    // Overflowed `days * 86400` and panicked before it had a range.
    for days in ["99999999999999999", "36501", "0"] {
        let config = HostConfig::flags(&sb.data_dir()).env("REDIS_TTL_DAYS", days);
        assert_config_error(&sb, config, &["redis_ttl_days"]).await;
    }
    let config = HostConfig::flags(&sb.data_dir()).env("REDIS_DB", "4294967295");
    assert_config_error(&sb, config, &["redis_db"]).await;
}
