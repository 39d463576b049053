//! `p0rt plugin …`: tools for plugin authors and operators.
//!
//! - `check FILE`: validates a plugin and prints its role, WIT version, sha256 and imports.
//! - `run FILE --input JSON`: one decision, printed as JSON.
//! - `list`: the plugins a host would serve from a directory (bundled + overrides).
//! - `bench FILE --input JSON`: decision latency with a warm and with a fresh instance.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};

use super::fallback::{name_fallback, scan_fallback};
use super::runtime::{AnyPlugin, PluginSpec, Runtime};
use super::{
    LabelApproval, NamingInput, PluginOptions, PolicyPlugins, RequestFacts, Role, ScanJob,
    read_plugin_file, roles,
};
use crate::cache::Cache;
use crate::policy::{HeaderEdit, RequestVerdict};

async fn load(
    path: &Path,
    role: Option<Role>,
    config: Option<String>,
) -> anyhow::Result<AnyPlugin> {
    let mut spec: PluginSpec =
        read_plugin_file(path).with_context(|| format!("plugin {}", path.display()))?;
    if role.is_some() {
        spec.role = role;
    }
    if let Some(config) = config {
        serde_json::from_str::<serde_json::Value>(&config).context("--config must be JSON")?;
        spec.config = config;
    }
    let runtime = Runtime::new(None)?;
    runtime
        .load(spec, Cache::in_memory(), None)
        .await
        .with_context(|| format!("plugin {} cannot be loaded", path.display()))
}

/// `p0rt plugin check FILE`
pub async fn check(path: &Path, role: Option<Role>) -> anyhow::Result<String> {
    let plugin = load(path, role, None).await?;
    let plugin = plugin.info();
    let mut out = format!(
        "{}: ok\n  role:      {}\n  world:     p0rt:policy@{} ({})\n  sha256:    {}\n  imports:\n",
        path.display(),
        plugin.role,
        plugin.wit_version.as_deref().unwrap_or("?"),
        plugin.role.interface(),
        plugin.sha256
    );
    for import in &plugin.imports {
        out.push_str(&format!("    {import}\n"));
    }
    Ok(out)
}

/// One decision for `input` (JSON shaped like the role's request record, snake_case), with
/// the host's fallback when the plugin gives none.
pub async fn decide(
    plugin: &AnyPlugin,
    input: &str,
    fresh: bool,
) -> anyhow::Result<serde_json::Value> {
    let value = match plugin {
        AnyPlugin::Naming(plugin) => {
            let input: NamingInput = serde_json::from_str(input).context("--input for a naming plugin: {\"ssh_key_hash\": \"…\", \"fingerprint\": \"…\", \"requested_label\": null, \"attempt\": 0}")?;
            if input.requested_label.is_some() {
                match roles::approve_label(plugin, &input, fresh).await {
                    Ok(LabelApproval::Refused(reason)) => {
                        serde_json::json!({ "decision": "refused", "value": reason })
                    }
                    Ok(LabelApproval::Approved) => serde_json::json!({ "decision": "approved" }),
                    Ok(LabelApproval::GrantRequested) => {
                        serde_json::json!({ "decision": "grant-requested" })
                    }
                    Err(e) => {
                        serde_json::json!({ "decision": "approved", "fallback": e.to_string() })
                    }
                }
            } else {
                let choice = roles::choose_name(plugin, &input, fresh).await;
                serde_json::to_value(choice.unwrap_or_else(|e| name_fallback(&plugin.info, &e)))?
            }
        }
        AnyPlugin::RateLimit(plugin) => {
            let input: RequestFacts = serde_json::from_str(input).context("--input for a rate-limit plugin: {\"client_ip\": \"…\", \"name\": \"…\", \"method\": \"GET\", \"path\": \"/\", …}")?;
            match roles::check_request(plugin, input, fresh).await {
                Ok(decision) => serde_json::to_value(decision)?,
                Err(e) => serde_json::json!({ "decision": "fallback", "reason": e.to_string() }),
            }
        }
        AnyPlugin::RequestPolicy(plugin) => {
            let input: RequestFacts = serde_json::from_str(input).context("--input for a request-policy plugin: {\"client_ip\": \"…\", \"name\": \"…\", \"method\": \"GET\", \"path\": \"/\", \"scheme\": \"http\", \"options\": [[\"allow\", \"10.0.0.0/8\"]], …}")?;
            match roles::decide_request(plugin, input, fresh).await {
                Ok(verdict) => verdict_json(&verdict),
                Err(e) => serde_json::json!({ "decision": "fallback", "reason": e.to_string() }),
            }
        }
        AnyPlugin::ScanAdmission(plugin) => {
            let input: ScanJob = serde_json::from_str(input).context("--input for a scan-admission plugin: {\"requester_key_hash\": \"…\", \"target\": \"…\", \"ports\": [443], \"checks\": [\"headers\"], …}")?;
            let decision = roles::admit_scan(plugin, &input, fresh).await;
            serde_json::to_value(decision.unwrap_or_else(|e| scan_fallback(&e)))?
        }
    };
    Ok(value)
}

fn edits_json(edits: &[HeaderEdit]) -> serde_json::Value {
    edits
        .iter()
        .map(|e| {
            let value = e
                .value
                .as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            serde_json::json!({ "name": e.name.as_str(), "value": value })
        })
        .collect()
}

/// A request verdict as `p0rt plugin run` prints it.
fn verdict_json(verdict: &RequestVerdict) -> serde_json::Value {
    let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    match verdict {
        RequestVerdict::Admit(edits) => serde_json::json!({
            "decision": "admit",
            "request_edits": edits_json(&edits.request),
            "response_edits": edits_json(&edits.response),
        }),
        RequestVerdict::Deny {
            status,
            headers,
            body,
        } => serde_json::json!({
            "decision": "deny",
            "status": status.as_u16(),
            "headers": headers.iter().map(|(n, v)| (n.as_str().to_string(), text(v))).collect::<Vec<_>>(),
            "body": body,
        }),
        RequestVerdict::Limited {
            status,
            retry_after_seconds,
            message,
        } => serde_json::json!({
            "decision": "deny",
            "status": status.as_u16(),
            "retry_after_seconds": retry_after_seconds,
            "message": message,
        }),
        RequestVerdict::Redirect { status, location } => serde_json::json!({
            "decision": "redirect",
            "status": status.as_u16(),
            "location": text(location),
        }),
        RequestVerdict::RequireAuth(auth) => serde_json::json!({
            "decision": "require-auth",
            "realm": auth.realm,
            "users": auth.users.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>(),
            "request_edits": edits_json(&auth.edits.request),
            "response_edits": edits_json(&auth.edits.response),
        }),
    }
}

/// `p0rt plugin run FILE --input JSON`
pub async fn run(
    path: &Path,
    role: Option<Role>,
    input: &str,
    config: Option<String>,
) -> anyhow::Result<String> {
    let plugin = load(path, role, config).await?;
    let decision = decide(&plugin, input, false).await?;
    Ok(serde_json::to_string_pretty(&decision)? + "\n")
}

/// `p0rt plugin list`
pub async fn list(dir: &Path) -> anyhow::Result<String> {
    let plugins = PolicyPlugins::start(
        PluginOptions {
            dir: Some(dir.to_path_buf()),
            compile_cache: None,
            enabled: true,
        },
        Cache::in_memory(),
        None,
    )
    .await?;
    let mut out =
        String::from("ROLE            NAME            SHA256        WIT     ORIGIN / ERROR\n");
    for status in plugins.status() {
        let role = status
            .role
            .map(|r| r.to_string())
            .unwrap_or_else(|| "-".into());
        let sha = status.sha256.as_deref().map(|s| &s[..12]).unwrap_or("-");
        let wit = status.wit_version.as_deref().unwrap_or("-");
        let tail = match &status.error {
            Some(error) if !status.active => format!("{}: NOT LOADED: {error}", status.origin),
            Some(error) => format!("{} ({error})", status.origin),
            None => status.origin.clone(),
        };
        out.push_str(&format!(
            "{role:<15} {:<15} {sha:<13} {wit:<7} {tail}\n",
            status.name
        ));
    }
    Ok(out)
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// `p0rt plugin bench FILE --input JSON`: p50/p99 per decision, warm vs fresh instance.
pub async fn bench(
    path: &Path,
    role: Option<Role>,
    input: &str,
    iterations: usize,
) -> anyhow::Result<String> {
    if iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let plugin = load(path, role, None).await?;
    let mut out = format!(
        "plugin {} ({}), {iterations} decisions each\n",
        plugin.info().name,
        plugin.info().role
    );
    for (label, fresh) in [("warm instance ", false), ("fresh instance", true)] {
        // Warm-up, so one-time costs (first instantiation, page faults) are not counted.
        for _ in 0..iterations.min(100) {
            decide(&plugin, input, fresh).await?;
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let started = Instant::now();
            decide(&plugin, input, fresh).await?;
            samples.push(started.elapsed().as_nanos());
        }
        samples.sort_unstable();
        out.push_str(&format!(
            "  {label}: p50 {:>8.2} µs   p99 {:>8.2} µs\n",
            percentile(&samples, 0.50) as f64 / 1000.0,
            percentile(&samples, 0.99) as f64 / 1000.0
        ));
    }
    Ok(out)
}

/// Where `plugin list` looks when no directory is given.
pub fn default_dir() -> PathBuf {
    PathBuf::from(crate::config::DEFAULT_PLUGINS_DIR)
}
