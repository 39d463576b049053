//! Rate-limit answers the host may reuse without calling the plugin again: a lease (the
//! plugin counted that many further requests from one client IP to one tunnel) and a recent
//! denial with `Retry-After` (repeated for at most [`MAX_DENIAL_REUSE`]). Kept per plugin, so
//! a reload starts afresh; bounded, so a flood of distinct addresses cannot grow it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::policy::{RateDecision, RateLease};

/// Most (client IP, tunnel) pairs remembered; beyond it, expired entries are swept and new
/// ones are not kept until there is room (those requests simply ask the plugin).
pub const MAX_LEASES: usize = 16_384;
/// Longest a denial is repeated without asking the plugin: short, so a limit the operator
/// raises (or a window that ends) takes effect at once for practical purposes.
pub const MAX_DENIAL_REUSE: Duration = Duration::from_secs(1);

enum Entry {
    Admit {
        left: u32,
        until: Instant,
    },
    Deny {
        decision: RateDecision,
        until: Instant,
    },
}

impl Entry {
    fn until(&self) -> Instant {
        match self {
            Entry::Admit { until, .. } | Entry::Deny { until, .. } => *until,
        }
    }
}

/// Looked up for every request: hashed with foldhash (seeded per process), not SipHash.
type Entries = HashMap<String, Entry, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct Leases {
    entries: Mutex<Entries>,
}

fn key(client_ip: &str, name: &str) -> String {
    let mut key = String::with_capacity(client_ip.len() + name.len() + 1);
    key.push_str(client_ip);
    key.push(' ');
    key.push_str(name);
    key
}

/// Runs `f` with the key of `client_ip` and `name`, built on the stack when it fits (it
/// always does for an address and a DNS label): a lookup allocates nothing.
fn with_key<R>(client_ip: &str, name: &str, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; 128];
    let len = client_ip.len() + 1 + name.len();
    if len > buf.len() {
        return f(&key(client_ip, name));
    }
    buf[..client_ip.len()].copy_from_slice(client_ip.as_bytes());
    buf[client_ip.len()] = b' ';
    buf[client_ip.len() + 1..len].copy_from_slice(name.as_bytes());
    match std::str::from_utf8(&buf[..len]) {
        Ok(key) => f(key),
        // Two strings joined by a space are text; never reached.
        Err(_) => f(&key(client_ip, name)),
    }
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // Every update is a single insert or decrement, so a poisoned map is still sound.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for this request if one is held: a leased admission (used up by this
    /// request) or a recent denial.
    pub fn take(&self, client_ip: &str, name: &str) -> Option<RateDecision> {
        let now = Instant::now();
        with_key(client_ip, name, |key| {
            let mut entries = self.lock();
            let entry = entries.get_mut(key)?;
            if entry.until() <= now {
                entries.remove(key);
                return None;
            }
            match entry {
                Entry::Admit { left, .. } => {
                    *left -= 1;
                    if *left == 0 {
                        entries.remove(key);
                    }
                    Some(RateDecision::allow())
                }
                Entry::Deny { decision, .. } => Some(decision.clone()),
            }
        })
    }

    /// Remembers what the plugin answered, if it can be reused.
    pub fn note(&self, client_ip: &str, name: &str, decision: &RateDecision) {
        let now = Instant::now();
        let entry = match decision {
            RateDecision::Allow {
                lease: Some(RateLease { requests, millis }),
            } if *requests > 0 && *millis > 0 => Entry::Admit {
                left: *requests,
                until: now + Duration::from_millis(u64::from(*millis)),
            },
            RateDecision::Deny {
                retry_after_seconds: Some(seconds),
                ..
            } if *seconds > 0 => Entry::Deny {
                decision: decision.clone(),
                until: now + MAX_DENIAL_REUSE.min(Duration::from_secs(u64::from(*seconds))),
            },
            _ => return,
        };
        let key = key(client_ip, name);
        let mut entries = self.lock();
        // Concurrent requests of one client can all miss the held lease and ask the plugin;
        // a lease still held holds requests the plugin already counted, so it is kept: a new
        // lease adds to it (valid as long as both are), a denial does not replace it.
        if let Some(Entry::Admit { left, until }) = entries.get_mut(&key)
            && *until > now
        {
            if let Entry::Admit {
                left: more,
                until: new_until,
            } = entry
            {
                *left = left.saturating_add(more);
                *until = (*until).min(new_until);
            }
            return;
        }
        if entries.len() >= MAX_LEASES {
            entries.retain(|_, e| e.until() > now);
            if entries.len() >= MAX_LEASES {
                return;
            }
        }
        entries.insert(key, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(requests: u32, millis: u32) -> RateDecision {
        RateDecision::Allow {
            lease: Some(RateLease { requests, millis }),
        }
    }

    #[test]
    fn a_long_key_is_kept_as_well_as_a_short_one() {
        let leases = Leases::default();
        let long = "n".repeat(200);
        for name in ["a", long.as_str()] {
            leases.note("2001:db8::1", name, &lease(2, 60_000));
            assert_eq!(
                leases.take("2001:db8::1", name),
                Some(RateDecision::allow())
            );
            assert_eq!(
                leases.take("2001:db8::1", name),
                Some(RateDecision::allow())
            );
            assert_eq!(leases.take("2001:db8::1", name), None, "{name}: used up");
        }
    }

    #[test]
    fn a_lease_admits_exactly_its_requests_for_its_client_and_tunnel() {
        let leases = Leases::default();
        leases.note("192.0.2.1", "app", &lease(3, 60_000));
        assert_eq!(leases.take("192.0.2.2", "app"), None);
        assert_eq!(leases.take("192.0.2.1", "other"), None);
        for _ in 0..3 {
            assert_eq!(leases.take("192.0.2.1", "app"), Some(RateDecision::allow()));
        }
        assert_eq!(leases.take("192.0.2.1", "app"), None);
    }

    #[test]
    fn a_lease_still_held_is_never_lost_to_a_concurrent_answer() {
        let leases = Leases::default();
        leases.note("192.0.2.1", "app", &lease(3, 60_000));
        // Two requests that missed it asked the plugin meanwhile: a second lease and a denial.
        leases.note("192.0.2.1", "app", &lease(2, 30_000));
        let deny = RateDecision::Deny {
            status: 429,
            retry_after_seconds: Some(30),
            message: "slow down".into(),
        };
        leases.note("192.0.2.1", "app", &deny);
        for _ in 0..5 {
            assert_eq!(leases.take("192.0.2.1", "app"), Some(RateDecision::allow()));
        }
        assert_eq!(leases.take("192.0.2.1", "app"), None);
        // Once it is used up, a denial is remembered again.
        leases.note("192.0.2.1", "app", &deny);
        assert_eq!(leases.take("192.0.2.1", "app"), Some(deny));
    }

    #[test]
    fn leases_and_denials_expire() {
        let leases = Leases::default();
        leases.note("a", "app", &lease(5, 1));
        let deny = RateDecision::Deny {
            status: 429,
            retry_after_seconds: Some(30),
            message: "slow down".into(),
        };
        leases.note("b", "app", &deny);
        assert_eq!(leases.take("b", "app"), Some(deny.clone()));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(leases.take("a", "app"), None);
        // A denial without Retry-After is never reused.
        let bare = RateDecision::Deny {
            status: 429,
            retry_after_seconds: None,
            message: "no".into(),
        };
        leases.note("c", "app", &bare);
        assert_eq!(leases.take("c", "app"), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let leases = Leases::default();
        for i in 0..MAX_LEASES + 10 {
            leases.note(
                &format!("10.0.{}.{}", i / 256, i % 256),
                "app",
                &lease(1, 60_000),
            );
        }
        assert_eq!(leases.lock().len(), MAX_LEASES);
    }
}
