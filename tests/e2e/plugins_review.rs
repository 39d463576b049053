//! Regression tests for the plugin layer's review findings (issue #9): a client's sub-name
//! request never counts against the naming plugin, host faults (Redis hung or gone) never
//! bench a plugin, and a plugin file that cannot be read is reported once, not three times
//! a second.

use std::path::Path;
use std::time::Duration;

use crate::plugins::*;
use crate::redis_support::{RedisServer, require_redis};
use crate::support::*;

/// Sends `signal` (e.g. `STOP`) to a process this test started.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Log lines that report a failure of the plugin `name` itself (what counts toward benching).
fn plugin_failures(log: &str, name: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains(&format!("plugin {name} ("))
                && (l.contains(" failed: ") || l.contains("benched"))
        })
        .map(str::to_string)
        .collect()
}

/// The active plugin serving `role`, from `/status/plugins`.
async fn serving(host: &Host, role: &str) -> serde_json::Value {
    let status = plugin_status(host).await;
    status
        .into_iter()
        .find(|p| p["role"] == role && p["active"] == true)
        .unwrap_or_else(|| panic!("no active {role} plugin"))
}

/// Defect 1: `-R api:80:…` (any reserved word) used to make the bundled `words` plugin look
/// broken (its `Name(label)` answer was validated as a main name, and `api` is reserved), so
/// three such requests benched the operator's naming plugin.
#[tokio::test(flavor = "multi_thread")]
async fn reserved_word_labels_never_count_against_the_naming_plugin() {
    let sb = Sandbox::new();
    let key = sb.key("labels");
    let backend = Backend::start("labels-backend").await;
    let host = Host::start(&sb).await;
    let main = host.info(&sb, &key).await.name;

    // Six label requests, more than the three failures in a row that bench a plugin.
    for labels in [["api", "www", "admin"], ["docs", "api", "www"]] {
        let mut args = vec!["-N".to_string()];
        for label in labels {
            args.extend([
                "-R".into(),
                format!("{label}:80:127.0.0.1:{}", backend.port),
            ]);
        }
        let mut client = host.ssh(&sb, &key).args(args).spawn();
        for label in labels {
            // Reserved words are reserved as whole names only: `api-<name>` is the key's.
            host.wait_served(&format!("{label}-{main}"), &backend).await;
        }
        client.kill().await;
    }

    let naming = serving(&host, "naming").await;
    assert_eq!(naming["name"], "words", "{naming}");
    assert!(
        naming["error"].is_null(),
        "naming plugin not healthy: {naming}"
    );
    let log = host.log();
    assert_eq!(
        plugin_failures(&log, "words"),
        Vec::<String>::new(),
        "{log}"
    );
    assert!(!log.contains("falls back"), "{log}");
    // It still names new keys (no fallback to the built-in namer).
    let newcomer = sb.key("newcomer");
    assert_eq!(
        host.info(&sb, &newcomer).await.name,
        builtin_name(&newcomer)
    );
    assert!(!host.log().contains("naming falls back"), "{}", host.log());
}

/// Defect 2: a store error in a host import, or a store wait that outlasts the call
/// deadline, used to count as the plugin's failure, so a Redis outage benched a healthy
/// rate-limit plugin. Now such calls are host faults: the built-in limiter answers, the
/// plugin is never benched.
#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_is_a_host_fault_and_never_benches_the_plugin() {
    require_tools();
    require_redis();
    let mut redis = RedisServer::start().await;
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    // Counts in the cache and looks a never-seen name up in the store on every request.
    let wasm = install_hostile(&dir, "rate-limit", "lookup");
    let config = HostConfig::flags(&sb.data_dir())
        .env("STORAGE_TYPE", "redis")
        .env("REDIS_URL", redis.url())
        .arg("--plugins-dir")
        .arg(dir.to_string_lossy());
    let host = Host::start_with(&sb, config).await;
    wait_active(&host, "rate-limit", &wasm).await;
    let key = sb.key("steady");
    let backend = Backend::start("steady-backend").await;
    let (_client, name) = host.tunnel(&sb, &key, &backend).await;
    assert!(
        !host.log().contains("rate limiting falls back"),
        "{}",
        host.log()
    );

    // Redis hangs (store lookups outlast the call deadline), then goes away (they fail).
    for (outage, act) in [("hung", "STOP"), ("gone", "KILL")] {
        if act == "KILL" {
            redis.kill9();
        } else {
            signal(redis.pid(), act);
        }
        for i in 0..6 {
            assert_eq!(
                host.whoami(&name).await,
                (200, backend.id.clone()),
                "Redis {outage}, request {i}"
            );
        }
        let limiter = serving(&host, "rate-limit").await;
        assert_eq!(limiter["sha256"], sha256_of(&wasm).as_str(), "{limiter}");
        assert!(
            limiter["error"].is_null(),
            "Redis {outage}: plugin benched: {limiter}"
        );
    }
    let log = host.log();
    assert_eq!(
        plugin_failures(&log, "hostile"),
        Vec::<String>::new(),
        "{log}"
    );
    assert!(
        log.contains("host fault, not counted against the plugin"),
        "the outage never reached the plugin's host calls:\n{log}"
    );
}

/// Defect 12: an unreadable (a symlink to `/proc/self/mem`) or oversized file in the plugins
/// directory was re-read and its ERROR logged about three times a second (each reload's own
/// reads woke the watcher again), and again on every other change in the directory.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_and_oversized_plugin_files_are_reported_once() {
    let sb = Sandbox::new();
    let dir = plugins_dir(&sb);
    let host = host_with_plugins(&sb, &dir).await;
    let mem = dir.join("mem.wasm");
    std::os::unix::fs::symlink("/proc/self/mem", &mem).unwrap();
    let big = dir.join("big.wasm");
    write_atomic(&big, &vec![0u8; 20 << 20]);
    assert!(wait_refused(&host, &mem).await.contains("cannot read"));
    assert!(wait_refused(&host, &big).await.contains("byte limit"));

    // Another change in the directory reloads it: the two files are not reported again.
    let other = install(&dir, "names", &read(&bundled("words.wasm")), None);
    wait_active(&host, "naming", &other).await;
    // Then the directory is left alone: nothing may be logged again by itself. (Absence can
    // only be watched for a while: long enough for several reloads at the old rate.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = host.log();
    for path in [&mem, &big] {
        assert_eq!(
            failed_to_load(&log, path),
            1,
            "{} reported more than once:\n{log}",
            path.display()
        );
    }
}

fn failed_to_load(log: &str, path: &Path) -> usize {
    log.matches(&format!("plugin {} failed to load", path.display()))
        .count()
}
