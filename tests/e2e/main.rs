//! End-to-end tests of the `p0rt` binary with the real OpenSSH client and real HTTP traffic.
//!
//! Every test starts its own p0rt (own temp dir, own ports) and its own backends, so tests are
//! independent and run in parallel. Requires `ssh` and `ssh-keygen` (openssh-client).

mod backend;
mod support;

mod abuse_http;
mod abuse_shared;
mod abuse_ssh;
mod admin;
mod bans;
mod cluster;
mod console;
mod edge_errors;
mod edge_review;
mod flow_control;
mod host_keys;
mod https;
mod key_list;
mod limits;
mod names;
mod p0rt_dropin;
mod p0rt_names;
mod p0rt_settings;
mod packet_segments;
mod plugins;
mod plugins_review;
mod policy;
mod pooled_upstreams;
mod refusals;
mod reservations;
mod scaffold;
mod scans;
mod startup;
mod traffic;

// Real redis-server processes (standalone, sentinel, cluster); requires redis-server.
mod redis;
mod redis_harness;
mod redis_support;
mod robustness;
mod shutdown;
mod store_review;
