//! Exec commands a key may run: `ssh … info`, `ssh … scan [--json] [--checks a,b]
//! [--ports 22,80] [target]`, `ssh … token [--revoke]`, `ssh … stats`, `ssh … help`.

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelWriteHalf;
use russh::server::Msg;

use crate::config::PublicUrls;
use crate::names::KeyHash;
use crate::scan::checks::Severity;
use crate::scan::{JobRecord, JobState, JobView, ScanRequest, ScanService, ScanTarget};

/// How often a running scan's record is read for new progress.
pub const PROGRESS_POLL: Duration = Duration::from_millis(200);
/// Longest a session follows one job (queue wait included) before pointing at the API.
pub const MAX_FOLLOW: Duration = Duration::from_secs(600);
/// Width of the terminal progress bar, in cells.
const BAR_CELLS: usize = 24;

pub const HELP: &str = "\
p0rt commands (ssh -p <port> <host> <command>):
  info                 your key's name and URL
  stats                your live tunnels and their counters (requests, bytes)
  scan [name]          scan your live tunnels (or one of them) for what they expose
       --json          print the report as JSON
       --checks a,b    only these checks: reachability, headers, paths, cors, cookies, errors
       --ports 22,80   TCP port check of an operator-allowlisted host instead
  token                print a new API token for /api/scans (replaces the previous one)
  token --revoke       remove your API token
  key=value … [flag]   options for this connection's tunnels, e.g.
                       ssh -R 80:localhost:3000 <host> -- allow=203.0.113.0/24 auth=alice:secret https-only
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Info,
    Help,
    Stats,
    Scan { request: ScanRequest, json: bool },
    Token { revoke: bool },
}

/// Parses an exec command line; `Err` is the message for the client.
pub fn parse(line: &str) -> Result<Command, String> {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or("");
    let rest: Vec<&str> = words.collect();
    match command {
        "info" if rest.is_empty() => Ok(Command::Info),
        "help" | "--help" => Ok(Command::Help),
        "stats" if rest.is_empty() => Ok(Command::Stats),
        "token" => match rest.as_slice() {
            [] => Ok(Command::Token { revoke: false }),
            ["--revoke"] => Ok(Command::Token { revoke: true }),
            _ => Err("usage: token [--revoke]".into()),
        },
        "scan" => parse_scan(&rest),
        _ => Err(format!(
            "unknown command {:?}; commands: info, stats, scan, token, help, or tunnel options (key=value)",
            line.trim().chars().take(64).collect::<String>()
        )),
    }
}

/// `ssh … help`: the commands, then what this host offers this key.
pub fn help_text(max_tunnels: usize, tier: Option<&str>) -> String {
    let mut text = HELP.to_string();
    text.push_str(&format!(
        "\nthis key: up to {max_tunnels} live tunnels at once (-R 80:… or -R name:80:…)"
    ));
    if let Some(tier) = tier {
        text.push_str(&format!(", tier {tier}"));
    }
    text.push('\n');
    text
}

/// `ssh … stats`: the key's live tunnels (on this host) with their counters.
pub fn stats_text(tunnels: &[Arc<crate::tunnels::Tunnel>], urls: &PublicUrls) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    if tunnels.is_empty() {
        return "no live tunnels for this key (ssh -R 80:localhost:3000 … opens one)\n".into();
    }
    let now = crate::unix_now();
    let mut list: Vec<_> = tunnels.iter().collect();
    list.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    let mut text = String::new();
    for t in list {
        text.push_str(&format!(
            "{}  up {}  requests {}  out {} B  in {} B  in flight {}\n",
            urls.of(t.name.as_str()),
            ago(now - t.since).trim_end_matches(" ago"),
            t.stats.requests.load(Relaxed),
            t.stats.bytes_out.load(Relaxed),
            t.stats.bytes_in.load(Relaxed),
            t.in_flight.load(Relaxed),
        ));
    }
    text
}

fn parse_scan(words: &[&str]) -> Result<Command, String> {
    let mut request = ScanRequest::default();
    let mut json = false;
    let mut words = words.iter();
    while let Some(word) = words.next() {
        match *word {
            "--json" => json = true,
            "--checks" => {
                let list = words
                    .next()
                    .ok_or("--checks needs a list: --checks headers,paths")?;
                request.checks = Some(
                    list.split(',')
                        .filter(|c| !c.is_empty())
                        .map(String::from)
                        .collect(),
                );
            }
            "--ports" => {
                let list = words.next().ok_or("--ports needs a list: --ports 22,80")?;
                for port in list.split(',').filter(|p| !p.is_empty()) {
                    let port: u16 = port
                        .parse()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("{port:?} is not a port number (1-65535)"))?;
                    request.ports.push(port);
                }
            }
            flag if flag.starts_with('-') => {
                return Err(format!("unknown option {flag:?}\n{HELP}"));
            }
            target if request.target.is_none() => request.target = Some(target.to_string()),
            _ => return Err("scan takes one target".into()),
        }
    }
    Ok(Command::Scan { request, json })
}

/// Runs a scan for the session: submits it, follows each job (progress on the session),
/// prints the report, and ends the channel with 0 if every job finished.
pub async fn run_scan(
    scans: Arc<ScanService>,
    urls: PublicUrls,
    key: KeyHash,
    request: ScanRequest,
    json: bool,
    pty: bool,
    writer: ChannelWriteHalf<Msg>,
) {
    let out = Output { writer, pty };
    let status = match scans.submit(&key, &request).await {
        Err(e) => {
            out.text(&format!("p0rt: scan refused: {e}\n")).await;
            1
        }
        Ok(jobs) => {
            let mut finished = Vec::with_capacity(jobs.len());
            for view in jobs {
                if !json {
                    out.text(&job_header(&view, &urls)).await;
                }
                let view = if view.record.state.is_final() {
                    view
                } else {
                    let Some(record) = follow(&scans, &key, view.record, json, &out).await else {
                        return; // the client went away; the job runs on
                    };
                    JobView {
                        record,
                        from_cache: false,
                    }
                };
                finished.push(view);
            }
            if json {
                let report = serde_json::json!({ "jobs": finished });
                out.text(&format!("{report}\n")).await;
            } else {
                for view in &finished {
                    out.text(&report_text(view, &urls)).await;
                }
            }
            if finished.iter().all(|v| v.record.state == JobState::Done) {
                0
            } else {
                1
            }
        }
    };
    out.finish(status).await;
}

struct Output {
    writer: ChannelWriteHalf<Msg>,
    pty: bool,
}

impl Output {
    /// Writes to the client; `false` once it is gone.
    async fn text(&self, text: &str) -> bool {
        let text = if self.pty {
            text.replace('\n', "\r\n")
        } else {
            text.to_string()
        };
        self.writer.data_bytes(text.into_bytes()).await.is_ok()
    }

    async fn finish(&self, status: u32) {
        let _ = self.writer.exit_status(status).await;
        let _ = self.writer.eof().await;
        let _ = self.writer.close().await;
    }
}

/// Prints progress until the job is final; `None` if the client went away.
async fn follow(
    scans: &ScanService,
    key: &KeyHash,
    mut record: JobRecord,
    json: bool,
    out: &Output,
) -> Option<JobRecord> {
    let started = tokio::time::Instant::now();
    let mut shown_lines = 0;
    let mut shown_running = false;
    loop {
        if !json {
            if record.state == JobState::Running && !shown_running {
                shown_running = true;
                if !out
                    .text(&format!("running (attempt {})\n", record.attempts))
                    .await
                {
                    return None;
                }
            }
            for line in record.progress.lines.iter().skip(shown_lines) {
                let text = if out.pty {
                    let done = record.progress.done as usize;
                    let total = (record.progress.total as usize).max(1);
                    let filled = (BAR_CELLS * done.min(total)) / total;
                    format!(
                        "\r\x1b[2K[{}{}] {done}/{total} {line}\n",
                        "#".repeat(filled),
                        ".".repeat(BAR_CELLS - filled)
                    )
                } else {
                    format!("{line}\n")
                };
                if !out.text(&text).await {
                    return None;
                }
            }
            shown_lines = shown_lines.max(record.progress.lines.len());
        }
        if record.state.is_final() {
            return Some(record);
        }
        if started.elapsed() > MAX_FOLLOW {
            out.text(&format!(
                "p0rt: job {} is still {}; follow it with GET /api/scans/{}\n",
                record.id,
                record.state.as_str(),
                record.id
            ))
            .await;
            return Some(record);
        }
        tokio::time::sleep(PROGRESS_POLL).await;
        // Probe the channel so a client that left stops the follow (the job runs on).
        if !json && !out.text("").await {
            return None;
        }
        match scans.get(&record.id, Some(key)).await {
            Ok(Some(next)) => record = next,
            Ok(None) => {
                out.text("p0rt: the job's record is gone (expired or removed)\n")
                    .await;
                return Some(record);
            }
            Err(e) => tracing::debug!("following scan {}: {e}", record.id),
        }
    }
}

fn target_text(target: &ScanTarget, urls: &PublicUrls) -> String {
    match target {
        ScanTarget::Tunnel { name } if !name.is_empty() => urls.of(name),
        ScanTarget::Tunnel { name } => name.clone(),
        ScanTarget::Address { target, ip } => format!("{target} ({ip})"),
    }
}

fn job_header(view: &JobView, urls: &PublicUrls) -> String {
    let job = &view.record;
    let what = target_text(&job.target, urls);
    match job.state {
        JobState::Rejected => format!(
            "scan of {what} rejected: {}\n",
            job.error.as_deref().unwrap_or("")
        ),
        _ if view.from_cache => format!("scan of {what}: cached report (job {})\n", job.id),
        state => format!("scan of {what}: job {} {}\n", job.id, state.as_str()),
    }
}

/// The human report of one finished job.
pub fn report_text(view: &JobView, urls: &PublicUrls) -> String {
    let job = &view.record;
    let what = target_text(&job.target, urls);
    let mut text = String::new();
    match job.state {
        JobState::Rejected => return String::new(), // said in the header
        JobState::Done => {}
        state => {
            text.push_str(&format!(
                "\nscan of {what} {}: {}\n",
                state.as_str(),
                job.error.as_deref().unwrap_or("")
            ));
            if job.findings.is_empty() {
                return text;
            }
        }
    }
    let counts: Vec<String> = job
        .severity_counts()
        .iter()
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect();
    let source = if view.from_cache {
        let age = (crate::scan::job::now_ms() - job.finished_at_ms.unwrap_or(0)).max(0) / 1000;
        format!("from the cache, scanned {}", ago(age))
    } else {
        "fresh".into()
    };
    text.push_str(&format!(
        "\nReport for {what} (job {}, {source}, checks: {})\n",
        job.id,
        job.checks
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if job.findings.is_empty() {
        text.push_str("  no findings\n");
        return text;
    }
    text.push_str(&format!(
        "{} findings: {}\n",
        job.findings.len(),
        counts.join(", ")
    ));
    for f in &job.findings {
        let label = match f.severity {
            Severity::High => "HIGH",
            Severity::Medium => "MEDIUM",
            Severity::Low => "LOW",
            Severity::Info => "INFO",
        };
        text.push_str(&format!(
            "\n  {label:<7} {}\n          seen: {}\n          why:  {}\n          fix:  {}\n",
            f.title, f.seen, f.why, f.fix
        ));
    }
    text
}

fn ago(seconds: i64) -> String {
    match seconds {
        0..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        _ => format!("{} h ago", seconds / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_say_why() {
        assert_eq!(parse("info"), Ok(Command::Info));
        assert_eq!(
            parse(" token --revoke "),
            Ok(Command::Token { revoke: true })
        );
        let Ok(Command::Scan { request, json }) =
            parse("scan --json --checks headers,paths shop-x")
        else {
            panic!("scan did not parse");
        };
        assert!(json);
        assert_eq!(request.target.as_deref(), Some("shop-x"));
        assert_eq!(request.checks, Some(vec!["headers".into(), "paths".into()]));
        let Ok(Command::Scan { request, .. }) = parse("scan --ports 22,80 scanme") else {
            panic!("ports did not parse");
        };
        assert_eq!(request.ports, [22, 80]);
        for bad in [
            "scan --ports 0",
            "scan --ports x",
            "scan a b",
            "scan --frobnicate",
            "rm -rf /",
            "token please",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
