//! Issue 14's swap: a P0rt working directory — `config.yaml` in P0rt's shape, its RSA
//! `ssh_host_key`, its `authorized_keys.json`, and `data/domains.json` plus
//! `data/reservations.json` — written as P0rt writes them, served unchanged by p0rt: the same
//! host key fingerprint, the same names, restricted keys refused, the reserved name to its
//! owner. (Tier limits, Redis variants and 20 fresh keys' names have their own tests in
//! key_list.rs, reservations.rs and p0rt_names.rs.)

use crate::host_keys::{fingerprints, keyscan, p0rt_rsa_key};
use crate::key_list::{Entry, assert_refused, no_bans, p0rt_key_file, save_like_p0rt};
use crate::reservations::{p0rt_domains_file, p0rt_name, p0rt_reservations_file};
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_p0rt_working_directory_serves_unchanged() {
    require_tools();
    let sb = Sandbox::new();
    let (alice, bob, carol, dave, erin) = (
        sb.key("alice"),
        sb.key("bob"),
        sb.key("carol"),
        sb.key("dave"),
        sb.key("erin"),
    );
    // P0rt's files, as P0rt leaves them in its working directory.
    std::fs::write(
        sb.join("config.yaml"),
        "server:\n  ssh:\n    port: 2222\n  http:\n    port: 80\n\
         domain:\n  base: tunnels.p0rt.test\n\
         storage:\n  type: json\n  data_dir: ./data\n",
    )
    .unwrap();
    p0rt_rsa_key(&sb.join("ssh_host_key"));
    let carol_off = Entry {
        active: false,
        ..Entry::active(&carol, "free")
    };
    save_like_p0rt(
        &sb.join("authorized_keys.json"),
        &p0rt_key_file(&[
            Entry::active(&alice, "free"),
            Entry::active(&bob, "premium"),
            carol_off,
            Entry::active(&erin, ""),
        ]),
    );
    std::fs::create_dir_all(sb.data_dir()).unwrap();
    std::fs::write(
        sb.data_dir().join("domains.json"),
        p0rt_domains_file(&alice, "happy-cat-jump"),
    )
    .unwrap();
    std::fs::write(
        sb.data_dir().join("reservations.json"),
        p0rt_reservations_file(&[("bobs-place", &bob.fingerprint(), Some("reserved in P0rt"))]),
    )
    .unwrap();
    let domains_before = std::fs::read(sb.data_dir().join("domains.json")).unwrap();

    // The harness passes ports 0 and the data dir as flags; everything else is P0rt's.
    let host = Host::start_with(&sb, no_bans(HostConfig::flags(&sb.data_dir()))).await;
    let log = host.log();
    assert!(log.contains("config: read config.yaml"), "{log}");

    // The same host key: what ssh-keyscan sees is P0rt's key.
    let served = fingerprints(sb.path(), &keyscan(&host, "rsa"));
    let p0rts = fingerprints(
        sb.path(),
        &std::fs::read_to_string(sb.join("ssh_host_key.pub")).unwrap(),
    );
    assert_eq!(served, p0rts, "the RSA host key served is P0rt's");
    assert!(
        std::fs::read_to_string(sb.join("ssh_host_key"))
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "P0rt's key file is left as it was"
    );

    // The same names: Alice's stored name, Bob's reservation, Erin's derived name.
    let info = host.info(&sb, &alice).await;
    assert_eq!(info.name, "happy-cat-jump");
    assert!(
        info.url.contains("happy-cat-jump.tunnels.p0rt.test"),
        "{}",
        info.url
    );
    assert_eq!(host.info(&sb, &bob).await.name, "bobs-place");
    assert_eq!(host.info(&sb, &erin).await.name, p0rt_name(&erin, 0));

    // Restricted keys: Carol's is deactivated, Dave's is not listed.
    assert_refused(&host, &sb, &carol, "is deactivated on this host").await;
    assert_refused(&host, &sb, &dave, "Permission denied").await;

    // P0rt's domains.json still reads as P0rt's (records added, none rewritten away).
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.data_dir().join("domains.json")).unwrap())
            .unwrap();
    let before: serde_json::Value = serde_json::from_slice(&domains_before).unwrap();
    let alice_hash = alice.key_hash();
    assert_eq!(
        after[&alice_hash]["domain"], before[&alice_hash]["domain"],
        "{after}"
    );
}
