//! Enforcing the operator's name and key bans ([`crate::bans::identity`]) on the SSH side:
//! the messages a banned name or key is refused with, the registry of authenticated
//! sessions (so a banned key's sessions can be closed even when they serve no tunnel), and
//! the enforcer, which closes what a ban covers as soon as it is made on this host, and
//! within [`REFRESH_INTERVAL`] when it was made on another host sharing the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::bans::IdentityBan;
use crate::bans::identity::REFRESH_INTERVAL;
use crate::shutdown::Stop;
use crate::tunnels::{KeyIdentity, SessionId};

use super::SshEdge;

/// What `ssh -R` for a banned name is told.
pub fn name_message(name: &str, ban: &IdentityBan) -> String {
    format!(
        "{name} is banned on this host by its operator ({}){}",
        ban.reason,
        until(ban)
    )
}

/// What a banned key is told when it logs in, or when its live session is closed.
pub fn key_message(fingerprint: &str, ban: &IdentityBan) -> String {
    format!(
        "p0rt: key {fingerprint} is banned on this host by its operator ({}){}",
        ban.reason,
        until(ban)
    )
}

fn until(ban: &IdentityBan) -> String {
    match ban
        .until
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
    {
        Some(t) => t
            .format(&time::format_description::well_known::Rfc3339)
            .map(|t| format!(" until {t}"))
            .unwrap_or_default(),
        None => String::new(),
    }
}

/// The authenticated SSH sessions of this host, by connection.
#[derive(Default)]
pub struct LiveSessions {
    sessions: Mutex<HashMap<SessionId, (KeyIdentity, russh::server::Handle)>>,
}

impl LiveSessions {
    pub(super) fn add(&self, id: SessionId, key: KeyIdentity, handle: russh::server::Handle) {
        self.lock().insert(id, (key, handle));
    }

    pub(super) fn remove(&self, id: SessionId) {
        self.lock().remove(&id);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SessionId, (KeyIdentity, russh::server::Handle)>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Renews the host's copy of the bans every [`REFRESH_INTERVAL`] (and at once when this host
/// changes one), and closes what they cover, until `stop`.
pub fn spawn_enforcer(edge: Arc<SshEdge>, mut stop: Stop) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Reported once per outage, not every interval.
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => match edge.bans.refresh_if_changed().await {
                    Ok(()) => failing = false,
                    Err(e) => {
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!("cannot re-read the name and key bans ({e}); \
                                            enforcing the last ones read");
                        }
                    }
                },
                _ = edge.bans.changed().notified() => {}
                _ = stop.stopped() => return,
            }
            enforce(&edge).await;
        }
    });
}

/// Closes the live tunnels of banned names and the sessions of banned keys.
async fn enforce(edge: &SshEdge) {
    let tunnels = edge.tunnels.live_tunnels();
    for tunnel in &tunnels {
        let Some(ban) = edge.bans.name_banned(tunnel.name.as_str()) else {
            continue;
        };
        if !edge.tunnels.close(&tunnel.name, tunnel.session) {
            continue;
        }
        tracing::info!(
            "tunnel {} down: the name is banned ({})",
            tunnel.name,
            ban.reason
        );
        let message = name_message(tunnel.name.as_str(), &ban);
        tunnel
            .output
            .line(format!("p0rt: {message}; it is no longer served"));
        // A connection left serving nothing is ended, so the client sees it.
        let serves_more = edge
            .tunnels
            .live_tunnels()
            .iter()
            .any(|t| t.session == tunnel.session);
        if !serves_more {
            tunnel.link.disconnect(&format!("p0rt: {message}")).await;
        }
    }
    let banned: Vec<(KeyIdentity, russh::server::Handle, IdentityBan)> = edge
        .sessions
        .lock()
        .values()
        .filter_map(|(key, handle)| {
            let ban = edge.bans.key_banned(&key.fingerprint, key.hash.as_str())?;
            Some((key.clone(), handle.clone(), ban))
        })
        .collect();
    for (key, handle, ban) in banned {
        tracing::info!(
            "closing a session of key {}: the key is banned ({})",
            key.fingerprint,
            ban.reason
        );
        let _ = handle
            .disconnect(
                russh::Disconnect::ByApplication,
                key_message(&key.fingerprint, &ban),
                String::new(),
            )
            .await;
    }
}
