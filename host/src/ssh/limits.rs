//! The SSH edge's limits as one value: defaults are the constants here and in
//! [`admission`](super::admission); operators change them with the `ssh.limits.*` settings
//! (README, "SSH edge limits"). Printed once at startup by [`SshLimits::describe`].

use std::time::Duration;

use super::admission::{AdmissionLimits, MAX_CONNECTIONS_PER_KEY};
use crate::tunnels::{MAX_TUNNELS_PER_KEY, SESSION_OUTPUT_LINE_MAX, SESSION_OUTPUT_QUEUE};

/// Time from accept to authenticated, banner and key exchange included (`LoginGraceTime`).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(20);
/// Concurrent SSH connections accepted; beyond this new connections are closed at once.
pub const MAX_SSH_CONNECTIONS: usize = 20_000;
/// Remote forwards one connection may hold.
pub const MAX_FORWARDS_PER_CONNECTION: usize = 16;
/// Session channels (shell, `info`, `scan`, …) one connection may have open at once.
pub const MAX_SESSION_CHANNELS: usize = 4;
/// Tunnel channels (`forwarded-tcpip`, one per visitor stream, pooled idle ones included) open
/// at once on one connection; beyond this visitors get 502.
pub const MAX_TUNNEL_CHANNELS: usize = 512;
/// Tunnel channel opens one connection's client has not answered yet; more visitors wait.
pub const MAX_PENDING_CHANNEL_OPENS: usize = 32;

/// Every SSH limit an operator can set.
#[derive(Clone, Copy, Debug)]
pub struct SshLimits {
    /// From accept to authenticated.
    pub auth_timeout: Duration,
    /// Connections at once, host-wide.
    pub max_connections: usize,
    /// Authenticated connections per key (counted once its signature is verified).
    pub max_connections_per_key: usize,
    /// Tunnels (names served) per key, over all its connections.
    pub max_tunnels_per_key: usize,
    pub max_forwards_per_connection: usize,
    pub max_session_channels: usize,
    pub max_tunnel_channels: usize,
    pub max_pending_channel_opens: usize,
    /// Unauthenticated connections: `MaxStartups` and the per-address cap.
    pub unauthenticated: AdmissionLimits,
}

impl Default for SshLimits {
    fn default() -> Self {
        SshLimits {
            auth_timeout: AUTH_TIMEOUT,
            max_connections: MAX_SSH_CONNECTIONS,
            max_connections_per_key: MAX_CONNECTIONS_PER_KEY,
            max_tunnels_per_key: MAX_TUNNELS_PER_KEY,
            max_forwards_per_connection: MAX_FORWARDS_PER_CONNECTION,
            max_session_channels: MAX_SESSION_CHANNELS,
            max_tunnel_channels: MAX_TUNNEL_CHANNELS,
            max_pending_channel_opens: MAX_PENDING_CHANNEL_OPENS,
            unauthenticated: AdmissionLimits::default(),
        }
    }
}

/// A limit setting that cannot work; the message names the setting.
#[derive(Debug, thiserror::Error)]
#[error("setting `{key}`: {problem}")]
pub struct LimitError {
    pub key: &'static str,
    pub problem: String,
}

impl SshLimits {
    /// Refuses limits that would lock every client out or make no sense together.
    pub fn validate(&self) -> Result<(), LimitError> {
        let positive = [
            ("ssh.limits.max_connections", self.max_connections),
            (
                "ssh.limits.max_connections_per_key",
                self.max_connections_per_key,
            ),
            ("ssh.limits.max_tunnels_per_key", self.max_tunnels_per_key),
            (
                "ssh.limits.max_forwards_per_connection",
                self.max_forwards_per_connection,
            ),
            ("ssh.limits.max_session_channels", self.max_session_channels),
            ("ssh.limits.max_tunnel_channels", self.max_tunnel_channels),
            (
                "ssh.limits.max_pending_channel_opens",
                self.max_pending_channel_opens,
            ),
            (
                "ssh.limits.max_unauthenticated_per_address",
                self.unauthenticated.max_per_source,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(LimitError {
                    key,
                    problem: "must be at least 1".into(),
                });
            }
        }
        if self.auth_timeout.is_zero() || self.auth_timeout > MAX_AUTH_TIMEOUT {
            return Err(LimitError {
                key: "ssh.limits.auth_timeout_seconds",
                problem: format!("must be 1 to {} seconds", MAX_AUTH_TIMEOUT.as_secs()),
            });
        }
        let u = &self.unauthenticated;
        if u.max_total == 0 || u.drop_start == 0 || u.drop_start > u.max_total {
            return Err(LimitError {
                key: "ssh.limits.max_startups",
                problem: "start and full must be at least 1, start no larger than full".into(),
            });
        }
        Ok(())
    }

    /// The startup line listing every SSH limit.
    pub fn describe(&self) -> String {
        let u = &self.unauthenticated;
        format!(
            "ssh limits: auth deadline {}s; unauthenticated connections {} (per address {}, \
             random drop from {} at {:.0}% rising to 100%, silent ones replaced after {}s); \
             connections {} (per key {}); per connection {} session channels, {} forwards, \
             {} tunnel channels ({} opening); tunnels per key {}; session output {} lines of \
             up to {} bytes; compression off",
            self.auth_timeout.as_secs(),
            u.max_total,
            u.max_per_source,
            u.drop_start,
            u.drop_rate_at_start * 100.0,
            u.idle_replace_after.as_secs(),
            self.max_connections,
            self.max_connections_per_key,
            self.max_session_channels,
            self.max_forwards_per_connection,
            self.max_tunnel_channels,
            self.max_pending_channel_opens,
            self.max_tunnels_per_key,
            SESSION_OUTPUT_QUEUE,
            SESSION_OUTPUT_LINE_MAX,
        )
    }
}

/// Longest authentication deadline accepted: a longer one only helps a flood hold slots.
pub const MAX_AUTH_TIMEOUT: Duration = Duration::from_secs(600);

/// Parses OpenSSH's `MaxStartups` form `start:rate:full` (e.g. `100:30:200`), or a single
/// number `full` (drops start at full). Keeps the per-address cap and replacement delay.
pub fn parse_max_startups(value: &str, base: AdmissionLimits) -> Result<AdmissionLimits, String> {
    let bad = || format!("{value:?} is not start:rate:full (e.g. 100:30:200) or a number");
    let parts: Vec<&str> = value.trim().split(':').map(str::trim).collect();
    let (start, rate, full) = match parts.as_slice() {
        [full] => {
            let full: usize = full.parse().map_err(|_| bad())?;
            (full, 100u32, full)
        }
        [start, rate, full] => (
            start.parse().map_err(|_| bad())?,
            rate.parse().map_err(|_| bad())?,
            full.parse().map_err(|_| bad())?,
        ),
        _ => return Err(bad()),
    };
    if start == 0 || full == 0 || start > full || rate > 100 {
        return Err(format!(
            "{value:?}: start and full must be at least 1, start ≤ full, rate 0 to 100"
        ));
    }
    Ok(AdmissionLimits {
        max_total: full,
        drop_start: start,
        drop_rate_at_start: f64::from(rate) / 100.0,
        ..base
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_startups_forms() {
        let base = AdmissionLimits::default();
        let l = parse_max_startups("10:30:100", base).unwrap();
        assert_eq!((l.drop_start, l.max_total), (10, 100));
        assert!((l.drop_rate_at_start - 0.30).abs() < 1e-9);
        assert_eq!(l.max_per_source, base.max_per_source);
        let l = parse_max_startups("50", base).unwrap();
        assert_eq!((l.drop_start, l.max_total), (50, 50));
        for bad in [
            "",
            "0",
            "10:30",
            "200:30:100",
            "10:101:100",
            "a:b:c",
            "1:2:3:4",
        ] {
            assert!(parse_max_startups(bad, base).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_validate_and_zeroes_do_not() {
        SshLimits::default().validate().unwrap();
        let zero = SshLimits {
            max_tunnel_channels: 0,
            ..SshLimits::default()
        };
        assert_eq!(
            zero.validate().unwrap_err().key,
            "ssh.limits.max_tunnel_channels"
        );
        let long = SshLimits {
            auth_timeout: Duration::from_secs(3600),
            ..SshLimits::default()
        };
        assert!(long.validate().is_err());
    }
}
