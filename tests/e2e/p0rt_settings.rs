//! P0rt's settings work unchanged on the real binary: its `config.yaml` in the working
//! directory (P0rt's `server.*` shape), its environment names, and its rule that a Redis URL
//! moves the domain store to Redis when `STORAGE_TYPE` is not set.

use redis::AsyncCommands;

use crate::redis_support::{RedisServer, require_redis};
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn p0rt_config_yaml_in_the_working_directory_is_read() {
    require_tools();
    let sb = Sandbox::new();
    // As P0rt's README writes it; the ports stay the harness's (flags win over the file).
    std::fs::write(
        sb.join("config.yaml"),
        "server:\n  ssh:\n    port: 2222\n  http:\n    port: 80\n\
         domain:\n  base: tunnels.p0rt.test\n  reservations_enabled: false\n\
         storage:\n  type: json\n",
    )
    .unwrap();
    let host = Host::start_with(&sb, HostConfig::flags(&sb.data_dir())).await;
    assert!(
        host.log().contains("config: read config.yaml"),
        "{}",
        host.log()
    );
    let key = sb.key("p0rt-yaml");
    let info = host.info(&sb, &key).await;
    assert!(
        info.url
            .contains(&format!("{}.tunnels.p0rt.test", info.name)),
        "the base domain comes from config.yaml: {}",
        info.url
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn p0rt_environment_names_and_redis_url_moving_the_store() {
    require_tools();
    require_redis();
    let redis = RedisServer::start().await;
    let sb = Sandbox::new();
    let data = sb.join("p0rt-data");
    // P0rt's names only: STORAGE_DATA_DIR for the data dir, P0RT_REDIS_URL for Redis, and no
    // STORAGE_TYPE, so the domain store follows the Redis URL.
    let mut config = HostConfig::flags(&data);
    config
        .args
        .retain(|a| a != "--data-dir" && *a != data.to_string_lossy());
    let config = config
        .env("STORAGE_DATA_DIR", data.to_string_lossy())
        .env("P0RT_REDIS_URL", redis.url());
    let host = Host::start_with(&sb, config).await;
    let log = host.log();
    assert!(
        log.contains("storage: redis, because a Redis URL is set and STORAGE_TYPE is not"),
        "{log}"
    );
    let key = sb.key("p0rt-env");
    let info = host.info(&sb, &key).await;
    let mut client = redis.client().await;
    let record: std::collections::HashMap<String, String> = client
        .hgetall(format!("p0rt:domain:{}", key.key_hash()))
        .await
        .unwrap();
    assert_eq!(
        record.get("domain"),
        Some(&info.name),
        "the domain record is in Redis; host log:\n{log}"
    );
    assert!(
        !data.join("domains.json").exists(),
        "the JSON store was used although the store follows the Redis URL"
    );
    assert!(
        data.exists(),
        "STORAGE_DATA_DIR names the data directory (host key, lock)"
    );
}
