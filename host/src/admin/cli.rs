//! `p0rt admin …`: the admin API from the command line. The token comes from the
//! environment (`ADMIN_TOKEN`, never a flag: flags show in `ps`); `--json` prints the API's
//! answer as it is, else a short text. Plain HTTP only: run it on the host (the default
//! `--remote` is its loopback edge) or through an SSH port forward.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// Where `p0rt admin` looks when `--remote` is not given: this machine's HTTP edge.
pub const DEFAULT_REMOTE: &str = "http://localhost:8080";
/// Time one admin call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from the host.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// `p0rt admin …`
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The host's HTTP edge (its base domain's URL), e.g. http://localhost:8080
    #[arg(long, env = "P0RT_REMOTE", default_value = DEFAULT_REMOTE, value_name = "URL")]
    pub remote: String,
    /// The host's base domain, when the URL names it otherwise (an IP address)
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Print the API's JSON answer
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Version, uptime, live tunnels, backends, Redis health
    Status,
    /// Live tunnels and their counters
    Tunnels,
    /// Disconnect the SSH connection serving NAME
    Disconnect { name: String },
    /// Disconnect every connection of the key with FINGERPRINT (SHA256:…)
    DisconnectKey { fingerprint: String },
    /// Stored names, by name, a page at a time
    Domains {
        #[arg(long, default_value_t = 1)]
        page: usize,
        #[arg(long, default_value_t = 50)]
        per_page: usize,
    },
    /// Name reservations
    Reservations,
    /// Reserve NAME for the key with FINGERPRINT
    Reserve {
        name: String,
        fingerprint: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Lift the reservation of NAME
    Release { name: String },
    /// Banned addresses, names and keys
    Bans,
    /// Ban ADDRESS from SSH
    Ban {
        address: std::net::IpAddr,
        /// Length of the ban (default one day)
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift the ban of ADDRESS
    Unban { address: std::net::IpAddr },
    /// Ban NAME for every key: its live tunnel is closed, `ssh -R` for it refused, HTTP
    /// for it answers 410
    BanName {
        name: String,
        /// Length of the ban (default: until lifted)
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift the ban of NAME
    UnbanName { name: String },
    /// Ban the key KEY (its SHA256:… fingerprint or its key hash): its sessions are
    /// closed and its logins refused
    BanKey {
        key: String,
        /// Length of the ban (default: until lifted)
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift the ban of KEY
    UnbanKey { key: String },
    /// Plugins: role, hash, origin, errors
    Plugins,
    /// Rescan the plugin directory now
    ReloadPlugins,
    /// Every scan job
    Scans,
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The host refused or failed the request; its message.
    #[error("the host answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
}

/// Percent-encodes one path part.
fn encode(part: &str) -> String {
    part.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl AdminCommand {
    /// Method, path under `/api/v1/`, body.
    fn request(&self) -> (Method, String, Option<Value>) {
        use AdminCommand::*;
        match self {
            Status => (Method::GET, "status".into(), None),
            Tunnels => (Method::GET, "tunnels".into(), None),
            Disconnect { name } => (Method::DELETE, format!("tunnels/{}", encode(name)), None),
            DisconnectKey { fingerprint } => (
                Method::DELETE,
                format!("keys/{}", encode(fingerprint)),
                None,
            ),
            Domains { page, per_page } => (
                Method::GET,
                format!("domains?page={page}&per_page={per_page}"),
                None,
            ),
            Reservations => (Method::GET, "reservations".into(), None),
            Reserve {
                name,
                fingerprint,
                comment,
            } => (
                Method::POST,
                format!("reservations/{}", encode(name)),
                Some(json!({ "fingerprint": fingerprint, "comment": comment })),
            ),
            Release { name } => (
                Method::DELETE,
                format!("reservations/{}", encode(name)),
                None,
            ),
            Bans => (Method::GET, "bans".into(), None),
            Ban {
                address,
                seconds,
                reason,
            } => (
                Method::POST,
                format!("bans/addresses/{address}"),
                Some(json!({ "seconds": seconds, "reason": reason })),
            ),
            Unban { address } => (Method::DELETE, format!("bans/addresses/{address}"), None),
            BanName {
                name,
                seconds,
                reason,
            } => (
                Method::POST,
                format!("bans/names/{}", encode(name)),
                Some(json!({ "seconds": seconds, "reason": reason })),
            ),
            UnbanName { name } => (Method::DELETE, format!("bans/names/{}", encode(name)), None),
            BanKey {
                key,
                seconds,
                reason,
            } => (
                Method::POST,
                format!("bans/keys/{}", encode(key)),
                Some(json!({ "seconds": seconds, "reason": reason })),
            ),
            UnbanKey { key } => (Method::DELETE, format!("bans/keys/{}", encode(key)), None),
            Plugins => (Method::GET, "plugins".into(), None),
            ReloadPlugins => (Method::POST, "plugins/reload".into(), None),
            Scans => (Method::GET, "scans".into(), None),
        }
    }
}

/// Runs one `p0rt admin` command; the text to print. `token`: `ADMIN_TOKEN` from the
/// environment, if set.
pub async fn run(args: &AdminArgs, token: Option<&str>) -> anyhow::Result<String> {
    let (method, path, body) = args.command.request();
    let answer = tokio::time::timeout(CALL_TIMEOUT, call(args, token, method, &path, body))
        .await
        .map_err(|_| anyhow!("{} did not answer within {CALL_TIMEOUT:?}", args.remote))??;
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&answer)?));
    }
    Ok(text(&args.command, &answer))
}

async fn call(
    args: &AdminArgs,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let remote: http::Uri = args
        .remote
        .parse()
        .with_context(|| format!("--remote {:?} is not a URL", args.remote))?;
    if remote.scheme_str() != Some("http") {
        bail!(
            "--remote must be an http:// URL (p0rt admin speaks plain HTTP; over the internet, \
             use an SSH port forward to the host's loopback edge)"
        );
    }
    let authority = remote
        .authority()
        .ok_or_else(|| anyhow!("--remote {:?} names no host", args.remote))?;
    let port = authority.port_u16().unwrap_or(80);
    let host_header = match &args.domain {
        Some(domain) => format!("{domain}:{port}"),
        None => authority.to_string(),
    };
    let stream = tokio::net::TcpStream::connect((authority.host().trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("cannot connect to {}", args.remote))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(format!("/api/v1/{path}"))
        .header(http::header::HOST, host_header);
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(body) => {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    let response = sender
        .send_request(request.body(Full::new(body))?)
        .await
        .with_context(|| format!("request to {}", args.remote))?;
    let status = response.status();
    let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the answer: {e}"))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes).trim().to_string() }));
    if !status.is_success() {
        let mut message = value["error"].as_str().unwrap_or("no message").to_string();
        if status == StatusCode::UNAUTHORIZED && token.is_none() {
            message.push_str(" (export ADMIN_TOKEN=… before running p0rt admin)");
        }
        return Err(CliError::Refused { status, message }.into());
    }
    Ok(value)
}

/// A short human answer.
fn text(command: &AdminCommand, answer: &Value) -> String {
    use AdminCommand::*;
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    match command {
        Status => {
            for key in [
                "version",
                "uptime_seconds",
                "domain",
                "tunnels",
                "store",
                "cache",
                "scan_queue",
            ] {
                out.push_str(&format!("{key}: {}\n", s(&answer[key])));
            }
            out.push_str(&format!("redis: {}\n", s(&answer["redis"]["status"])));
        }
        Tunnels => {
            let list = answer["tunnels"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                out.push_str("no live tunnels\n");
            }
            for t in list {
                out.push_str(&format!(
                    "{}  {}  from {}  requests {}  out {} B  in {} B\n",
                    s(&t["name"]),
                    s(&t["fingerprint"]),
                    s(&t["client"]),
                    s(&t["requests"]),
                    s(&t["bytes_out"]),
                    s(&t["bytes_in"]),
                ));
            }
        }
        Disconnect { .. } | DisconnectKey { .. } => {
            let names: Vec<String> = answer["disconnected"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            out.push_str(&format!("disconnected {}\n", names.join(", ")));
        }
        Domains { .. } => {
            out.push_str(&format!(
                "page {} of {} names ({} per page)\n",
                s(&answer["page"]),
                s(&answer["total"]),
                s(&answer["per_page"])
            ));
            for d in answer["domains"].as_array().cloned().unwrap_or_default() {
                out.push_str(&format!(
                    "{}  {}  last seen {}\n",
                    s(&d["domain"]),
                    s(&d["ssh_key_hash"]),
                    s(&d["last_seen"])
                ));
            }
        }
        Reservations => {
            for r in answer["reservations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                out.push_str(&format!("{}  {}\n", s(&r["domain"]), s(&r["fingerprint"])));
            }
            if out.is_empty() {
                out.push_str("no reservations\n");
            }
        }
        Reserve { name, .. } => out.push_str(&format!("{name}: reserved\n")),
        Release { name } => out.push_str(&format!("{name}: released\n")),
        Bans => {
            for (list, field, what) in [
                ("addresses", "ip", "address"),
                ("names", "name", "name"),
                ("keys", "key", "key"),
            ] {
                for b in answer[list].as_array().cloned().unwrap_or_default() {
                    let until = match &b["until"] {
                        Value::Null => "lifted".to_string(),
                        until => s(until),
                    };
                    out.push_str(&format!(
                        "{what} {}  until {until}  {}\n",
                        s(&b[field]),
                        s(&b["reason"])
                    ));
                }
            }
            if out.is_empty() {
                out.push_str("no bans\n");
            }
        }
        Ban { address, .. } => out.push_str(&format!(
            "{address}: banned until {}\n",
            s(&answer["ban"]["until"])
        )),
        Unban { address } => out.push_str(&format!("{address}: ban lifted\n")),
        BanName { name: target, .. } | BanKey { key: target, .. } => {
            let until = match &answer["ban"]["until"] {
                Value::Null => "lifted".to_string(),
                until => s(until),
            };
            out.push_str(&format!("{target}: banned until {until}\n"));
        }
        UnbanName { name: target } | UnbanKey { key: target } => {
            out.push_str(&format!("{target}: ban lifted\n"))
        }
        Plugins | ReloadPlugins => {
            for p in answer["plugins"].as_array().cloned().unwrap_or_default() {
                let hash = s(&p["sha256"]);
                out.push_str(&format!(
                    "{}  {}  {}  {}\n",
                    s(&p["name"]),
                    s(&p["role"]),
                    &hash[..hash.len().min(12)],
                    if p["active"] == true {
                        format!(
                            "active, {} decisions, {} failures",
                            s(&p["decisions"]),
                            s(&p["failures"])
                        )
                    } else {
                        s(&p["error"])
                    },
                ));
            }
        }
        Scans => {
            let jobs = answer["jobs"].as_array().cloned().unwrap_or_default();
            out.push_str(&format!("{} scan jobs\n", jobs.len()));
            for j in jobs {
                out.push_str(&format!("{}  {}\n", s(&j["id"]), s(&j["state"])));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_parts_are_encoded() {
        assert_eq!(encode("SHA256:a+b/c"), "SHA256%3Aa%2Bb%2Fc");
        assert_eq!(encode("plain-name"), "plain-name");
    }
}
