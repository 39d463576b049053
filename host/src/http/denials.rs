//! Denials in the host's log. Every request a policy or a limit refused is already a line in
//! its tunnel owner's session; the host log gets one info line per tunnel and kind of denial
//! per [`DENIAL_LOG_INTERVAL`], with the reason, the client and how many were folded into it,
//! so a flood of 429s is a line every ten seconds and not a line per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// At most one host-log line per tunnel and kind of denial per interval.
pub const DENIAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Tunnel/kind pairs remembered; beyond this, windows that ended are forgotten (then all).
pub const MAX_TRACKED_DENIALS: usize = 4096;
/// Longest reason text copied into the log.
const MAX_REASON_CHARS: usize = 160;

/// Which kind of refusal a request met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenialKind {
    RateLimited,
    Policy,
    Redirected,
    CredentialsRequired,
    Busy,
}

impl DenialKind {
    fn as_str(self) -> &'static str {
        match self {
            DenialKind::RateLimited => "rate limited",
            DenialKind::Policy => "denied by the access policy",
            DenialKind::Redirected => "redirected by the access policy",
            DenialKind::CredentialsRequired => "credentials required",
            DenialKind::Busy => "tunnel busy",
        }
    }
}

struct Window {
    started: Instant,
    folded: u64,
}

/// The throttle; one per process ([`note`]).
#[derive(Default)]
struct DenialLog {
    windows: Mutex<HashMap<(String, DenialKind), Window>>,
}

static LOG: LazyLock<DenialLog> = LazyLock::new(DenialLog::default);

/// Logs a denial at info, unless one of the same tunnel and kind was logged within the
/// interval (then it is counted into the next line).
pub fn note(tunnel: &str, kind: DenialKind, status: u16, client: IpAddr, reason: &str) {
    if let Some(folded) = LOG.due(tunnel, kind, Instant::now()) {
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_REASON_CHARS)
            .collect();
        let more = if folded > 0 {
            format!(
                " (+{folded} more in the last {}s)",
                DENIAL_LOG_INTERVAL.as_secs()
            )
        } else {
            String::new()
        };
        tracing::info!(
            "{tunnel}: {} {status} for {client}: {reason}{more}",
            kind.as_str()
        );
    }
}

impl DenialLog {
    /// `Some(denials folded since the last line)` when a line is due.
    fn due(&self, tunnel: &str, kind: DenialKind, now: Instant) -> Option<u64> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tunnel.to_string(), kind);
        if let Some(window) = windows.get_mut(&key) {
            if now.duration_since(window.started) < DENIAL_LOG_INTERVAL {
                window.folded += 1;
                return None;
            }
            let folded = window.folded;
            *window = Window {
                started: now,
                folded: 0,
            };
            return Some(folded);
        }
        if windows.len() >= MAX_TRACKED_DENIALS {
            windows.retain(|_, w| now.duration_since(w.started) < DENIAL_LOG_INTERVAL);
            if windows.len() >= MAX_TRACKED_DENIALS {
                windows.clear();
            }
        }
        windows.insert(
            key,
            Window {
                started: now,
                folded: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_tunnel_and_kind_per_interval_with_the_count() {
        let log = DenialLog::default();
        let t0 = Instant::now();
        assert_eq!(log.due("a", DenialKind::RateLimited, t0), Some(0));
        for _ in 0..5 {
            assert_eq!(log.due("a", DenialKind::RateLimited, t0), None);
        }
        assert_eq!(
            log.due("a", DenialKind::Policy, t0),
            Some(0),
            "another kind"
        );
        assert_eq!(
            log.due("b", DenialKind::RateLimited, t0),
            Some(0),
            "another tunnel"
        );
        let later = t0 + DENIAL_LOG_INTERVAL;
        assert_eq!(log.due("a", DenialKind::RateLimited, later), Some(5));
        assert_eq!(log.due("a", DenialKind::RateLimited, later), None);
    }

    #[test]
    fn memory_stays_bounded() {
        let log = DenialLog::default();
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_DENIALS * 3 {
            log.due(&format!("t{i}"), DenialKind::Busy, t0);
        }
        assert!(log.windows.lock().unwrap().len() <= MAX_TRACKED_DENIALS);
    }
}
