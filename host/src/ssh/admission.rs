//! Who may hold an SSH connection before authenticating, and how many connections a key may
//! hold after.
//!
//! Unauthenticated connections are capped host-wide and per client address, like OpenSSH's
//! `MaxStartups 10:30:100` and `PerSourceMaxStartups`: below [`UNAUTH_DROP_START`] every new
//! connection is admitted; from there a new one is refused with a probability rising linearly
//! from [`UNAUTH_DROP_RATE_AT_START`] to 1 at [`MAX_UNAUTHENTICATED`]; an address holding
//! [`MAX_UNAUTHENTICATED_PER_SOURCE`] gets no more. Refused connections are closed at accept,
//! before a byte of SSH is sent.
//!
//! Caps alone let a flood of connections that take a slot and then say nothing keep every real
//! client out until the auth deadline frees the slots. So a newcomer that would be refused
//! takes the place of the unauthenticated connection that has been silent longest, if that one
//! has sent nothing for [`IDLE_REPLACE_AFTER`] (at the per-address cap: the longest-silent one
//! of the same address). A real client is never silent that long during its handshake (it
//! answers each server message within a round trip), so it can lose its slot only while it
//! waits on its user (a passphrase prompt) during a flood. Random early drop still applies to
//! newcomers while every unauthenticated connection is busy (a flood of real handshakes, which
//! cost the host CPU).
//!
//! A connection stops counting as unauthenticated the moment its public-key signature is
//! verified (its [`Unauthenticated`] guard is dropped); from then on it counts against its
//! key's quota ([`KeyConnections`]). Nothing is counted per key at the key offer, so knowing a
//! public key is not enough to use up its owner's quota.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::names::KeyHash;

/// Unauthenticated connections held at once, host-wide (OpenSSH `MaxStartups` full).
pub const MAX_UNAUTHENTICATED: usize = 200;
/// Unauthenticated connections from which new ones are dropped at random (`MaxStartups` start).
pub const UNAUTH_DROP_START: usize = 100;
/// Drop probability at [`UNAUTH_DROP_START`], rising linearly to 1 at [`MAX_UNAUTHENTICATED`].
pub const UNAUTH_DROP_RATE_AT_START: f64 = 0.30;
/// Unauthenticated connections one client address (an IPv6 /64) may hold at once.
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 20;
/// Silence after which an unauthenticated connection gives its slot to a refused newcomer.
pub const IDLE_REPLACE_AFTER: Duration = Duration::from_secs(2);
/// At most one info line summing up refused connections per this interval.
pub const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Authenticated SSH connections one key may hold at once.
pub const MAX_CONNECTIONS_PER_KEY: usize = 8;

/// The unauthenticated-connection caps (defaults: the constants above).
#[derive(Clone, Copy, Debug)]
pub struct AdmissionLimits {
    pub max_total: usize,
    pub max_per_source: usize,
    pub drop_start: usize,
    pub drop_rate_at_start: f64,
    pub idle_replace_after: Duration,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_total: MAX_UNAUTHENTICATED,
            max_per_source: MAX_UNAUTHENTICATED_PER_SOURCE,
            drop_start: UNAUTH_DROP_START,
            drop_rate_at_start: UNAUTH_DROP_RATE_AT_START,
            idle_replace_after: IDLE_REPLACE_AFTER,
        }
    }
}

impl AdmissionLimits {
    /// Probability that a new connection is refused while `open` unauthenticated ones are held:
    /// 0 below the drop start, then linear from the start rate to 1 at the cap.
    pub fn drop_probability(&self, open: usize) -> f64 {
        if open < self.drop_start {
            0.0
        } else if open >= self.max_total {
            1.0
        } else {
            let span = (self.max_total - self.drop_start) as f64;
            let into = (open - self.drop_start) as f64;
            self.drop_rate_at_start + (1.0 - self.drop_rate_at_start) * into / span
        }
    }
}

/// What the per-address cap counts: an IPv4 address, or an IPv6 /64 (one end site).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Source(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
        }
    }
}

/// Why a new connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its address holds [`AdmissionLimits::max_per_source`] unauthenticated connections.
    PerSource,
    /// Dropped at random: the host holds many unauthenticated connections.
    Random,
    /// The host holds [`AdmissionLimits::max_total`] unauthenticated connections.
    Full,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::PerSource => "its address has too many unauthenticated connections",
            Refusal::Random => "dropped at random, many unauthenticated connections are open",
            Refusal::Full => "the host holds its maximum of unauthenticated connections",
        })
    }
}

/// One connection's liveness as the admission sees it: when it last sent something, and a
/// switch that closes it (its [`Watched`] stream then fails every read and write).
pub struct Watch {
    since: Instant,
    /// Milliseconds after `since` of the last read that returned data.
    last_read_ms: AtomicU64,
    closed: AtomicBool,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
}

impl Watch {
    fn new(since: Instant) -> Watch {
        Watch {
            since,
            last_read_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
        }
    }

    /// The client sent something at `now`.
    pub fn note_read(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.since).as_millis();
        self.last_read_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long the client has sent nothing, as of `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        let last = self.since + Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Closes the connection: its stream fails from now on, which ends the SSH session.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.read_waker.wake();
        self.write_waker.wake();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A connection's socket, noting each read in its [`Watch`] and failing once it is closed.
pub struct Watched<S> {
    inner: S,
    watch: Arc<Watch>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, watch: Arc<Watch>) -> Watched<S> {
        Watched { inner, watch }
    }
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "closed by the host")
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.watch.read_waker.register(cx.waker());
        if self.watch.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.note_read(Instant::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.watch.write_waker.register(cx.waker());
        if self.watch.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.watch.write_waker.register(cx.waker());
        if self.watch.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Entry {
    source: Source,
    watch: Arc<Watch>,
}

/// Counts since the last summary line.
#[derive(Default)]
struct Tally {
    per_source: u64,
    random: u64,
    full: u64,
    replaced: u64,
}

#[derive(Default)]
struct Held {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    per_source: HashMap<Source, usize>,
    tally: Tally,
}

impl Held {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&entry.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&entry.source);
            }
        }
        Some(entry)
    }

    /// The connection silent longest (of `source`, if given), if silent for `at_least`.
    fn longest_silent(
        &self,
        now: Instant,
        at_least: Duration,
        source: Option<Source>,
    ) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| source.is_none_or(|s| e.source == s))
            .map(|(id, e)| (*id, e.watch.silent_for(now)))
            .filter(|(_, silent)| *silent >= at_least)
            .max_by_key(|(_, silent)| *silent)
            .map(|(id, _)| id)
    }
}

/// The unauthenticated connections of the host.
pub struct Admission {
    limits: AdmissionLimits,
    held: Mutex<Held>,
}

/// An admitted connection that has not authenticated yet. Dropping it (on authentication, or
/// when the connection ends) frees its slot.
pub struct Unauthenticated {
    admission: Arc<Admission>,
    id: u64,
    watch: Arc<Watch>,
}

impl Unauthenticated {
    pub fn watch(&self) -> Arc<Watch> {
        self.watch.clone()
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.admission.lock().remove(self.id);
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            held: Mutex::new(Held::default()),
        })
    }

    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    /// Admits or refuses a connection from `ip` accepted just now.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Unauthenticated, Refusal> {
        self.admit_at(ip, Instant::now(), rand::random::<f64>())
    }

    /// [`Admission::admit`] at `now`, with `roll` (uniform in [0, 1)) deciding a random drop.
    pub fn admit_at(
        self: &Arc<Self>,
        ip: IpAddr,
        now: Instant,
        roll: f64,
    ) -> Result<Unauthenticated, Refusal> {
        let source = Source::of(ip);
        let limits = self.limits;
        let mut held = self.lock();
        let open = held.entries.len();
        let from_source = held.per_source.get(&source).copied().unwrap_or(0);
        let refusal = if from_source >= limits.max_per_source {
            Some(Refusal::PerSource)
        } else if open >= limits.max_total {
            Some(Refusal::Full)
        } else if roll < limits.drop_probability(open) {
            Some(Refusal::Random)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            let among = (refusal == Refusal::PerSource).then_some(source);
            match held.longest_silent(now, limits.idle_replace_after, among) {
                Some(victim) => {
                    if let Some(entry) = held.remove(victim) {
                        entry.watch.close();
                    }
                    held.tally.replaced += 1;
                }
                None => {
                    match refusal {
                        Refusal::PerSource => held.tally.per_source += 1,
                        Refusal::Random => held.tally.random += 1,
                        Refusal::Full => held.tally.full += 1,
                    }
                    return Err(refusal);
                }
            }
        }
        let id = held.next_id;
        held.next_id += 1;
        let watch = Arc::new(Watch::new(now));
        held.entries.insert(
            id,
            Entry {
                source,
                watch: watch.clone(),
            },
        );
        *held.per_source.entry(source).or_insert(0) += 1;
        Ok(Unauthenticated {
            admission: self.clone(),
            id,
            watch,
        })
    }

    /// Unauthenticated connections held now, and from how many addresses.
    pub fn held(&self) -> (usize, usize) {
        let held = self.lock();
        (held.entries.len(), held.per_source.len())
    }

    /// One line on what was refused or replaced since the last call, `None` if nothing was.
    pub fn take_summary(&self) -> Option<String> {
        let mut held = self.lock();
        let tally = std::mem::take(&mut held.tally);
        let refused = tally.per_source + tally.random + tally.full;
        if refused == 0 && tally.replaced == 0 {
            return None;
        }
        Some(format!(
            "ssh admission: refused {refused} new connections before authentication \
             ({} over the per-address cap of {}, {} dropped at random, {} at the cap of {}) and \
             closed {} silent unauthenticated connections to admit new ones; \
             {} unauthenticated connections from {} addresses now",
            tally.per_source,
            self.limits.max_per_source,
            tally.random,
            tally.full,
            self.limits.max_total,
            tally.replaced,
            held.entries.len(),
            held.per_source.len(),
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Authenticated connections per key.
pub struct KeyConnections {
    max: usize,
    counts: Mutex<HashMap<KeyHash, usize>>,
}

/// One authenticated connection of a key; dropping it frees the slot.
pub struct KeySlot {
    quota: Arc<KeyConnections>,
    key: KeyHash,
}

impl KeyConnections {
    pub fn new(max: usize) -> Arc<KeyConnections> {
        Arc::new(KeyConnections {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for `key`, or `None` when it holds its maximum. Call only once the key's
    /// signature is verified.
    pub fn try_acquire(self: &Arc<Self>, key: &KeyHash) -> Option<KeySlot> {
        let mut counts = self.lock();
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(KeySlot {
            quota: self.clone(),
            key: key.clone(),
        })
    }

    /// Connections `key` holds now.
    pub fn count(&self, key: &KeyHash) -> usize {
        self.lock().get(key).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<KeyHash, usize>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut counts = self.quota.lock();
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// 127.0.<i / 250>.<i % 250 + 1>: a distinct address per `i`.
    fn spread(i: usize) -> IpAddr {
        IpAddr::from([127, 0, (i / 250) as u8, (i % 250 + 1) as u8])
    }

    const NEVER_DROP: f64 = 0.999_999;

    #[test]
    fn the_drop_probability_rises_linearly_from_the_start_rate_to_one_at_the_cap() {
        let limits = AdmissionLimits::default();
        assert_eq!(limits.drop_probability(0), 0.0);
        assert_eq!(limits.drop_probability(UNAUTH_DROP_START - 1), 0.0);
        assert!((limits.drop_probability(UNAUTH_DROP_START) - 0.30).abs() < 1e-9);
        assert!((limits.drop_probability(150) - 0.65).abs() < 1e-9);
        assert!((limits.drop_probability(199) - (0.30 + 0.7 * 99.0 / 100.0)).abs() < 1e-9);
        assert_eq!(limits.drop_probability(MAX_UNAUTHENTICATED), 1.0);
        assert_eq!(limits.drop_probability(10_000), 1.0);
        let mut last = 0.0;
        for open in UNAUTH_DROP_START..=MAX_UNAUTHENTICATED {
            let p = limits.drop_probability(open);
            assert!(p >= last, "not monotonic at {open}");
            last = p;
        }
        // A start at or past the cap: no random zone, a hard cap.
        let hard = AdmissionLimits {
            drop_start: 10,
            max_total: 10,
            ..limits
        };
        assert_eq!(hard.drop_probability(9), 0.0);
        assert_eq!(hard.drop_probability(10), 1.0);
    }

    #[test]
    fn random_drop_follows_the_roll_between_start_and_cap() {
        let admission = Admission::new(AdmissionLimits::default());
        let now = Instant::now();
        let held: Vec<_> = (0..UNAUTH_DROP_START)
            .map(|i| admission.admit_at(spread(i), now, 0.0).unwrap())
            .collect();
        // At the start the probability is 30 %: a roll under it drops, one over it admits.
        assert_eq!(
            admission.admit_at(spread(1000), now, 0.29).err(),
            Some(Refusal::Random)
        );
        let admitted = admission.admit_at(spread(1000), now, 0.31).unwrap();
        assert_eq!(admission.held().0, UNAUTH_DROP_START + 1);
        drop((held, admitted));
        assert_eq!(admission.held(), (0, 0));
    }

    #[test]
    fn the_global_cap_holds_and_slots_come_back_when_guards_drop() {
        let admission = Admission::new(AdmissionLimits::default());
        let now = Instant::now();
        let mut held: Vec<_> = (0..MAX_UNAUTHENTICATED)
            .map(|i| admission.admit_at(spread(i), now, NEVER_DROP).unwrap())
            .collect();
        assert_eq!(admission.held(), (MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED));
        assert_eq!(
            admission.admit_at(spread(5000), now, NEVER_DROP).err(),
            Some(Refusal::Full)
        );
        held.pop();
        assert!(admission.admit_at(spread(5000), now, NEVER_DROP).is_ok());
        let summary = admission.take_summary().unwrap();
        assert!(summary.contains("refused 1 new connections"), "{summary}");
        assert!(summary.contains("1 at the cap of 200"), "{summary}");
        assert_eq!(admission.take_summary(), None, "the tally restarts");
    }

    #[test]
    fn each_address_gets_its_own_cap_and_ipv6_counts_per_64() {
        let admission = Admission::new(AdmissionLimits::default());
        let now = Instant::now();
        let mut from_one: Vec<_> = (0..MAX_UNAUTHENTICATED_PER_SOURCE)
            .map(|_| admission.admit_at(ip("203.0.113.7"), now, 0.0).unwrap())
            .collect();
        assert_eq!(
            admission.admit_at(ip("203.0.113.7"), now, 0.0).err(),
            Some(Refusal::PerSource)
        );
        // The same address written as IPv4-mapped IPv6 is the same source.
        assert_eq!(
            admission.admit_at(ip("::ffff:203.0.113.7"), now, 0.0).err(),
            Some(Refusal::PerSource)
        );
        // Another address is unaffected.
        let other = admission.admit_at(ip("203.0.113.8"), now, 0.0).unwrap();
        // One slot back, one more admitted.
        from_one.pop();
        from_one.push(admission.admit_at(ip("203.0.113.7"), now, 0.0).unwrap());

        let v6: Vec<_> = (0..MAX_UNAUTHENTICATED_PER_SOURCE)
            .map(|i| {
                let addr = IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i as u16]);
                admission.admit_at(addr, now, 0.0).unwrap()
            })
            .collect();
        assert_eq!(
            admission
                .admit_at(ip("2001:db8:0:1:ffff::1"), now, 0.0)
                .err(),
            Some(Refusal::PerSource),
            "another address of the same /64"
        );
        assert!(admission.admit_at(ip("2001:db8:0:2::1"), now, 0.0).is_ok());
        assert_eq!(admission.held().1, 3, "three sources");
        drop((from_one, other, v6));
        assert_eq!(admission.held(), (0, 0));
    }

    #[test]
    fn a_refused_newcomer_replaces_the_longest_silent_connection_once_silent_long_enough() {
        let admission = Admission::new(AdmissionLimits::default());
        let t0 = Instant::now();
        let held: Vec<_> = (0..MAX_UNAUTHENTICATED)
            .map(|i| admission.admit_at(spread(i), t0, NEVER_DROP).unwrap())
            .collect();
        // All silent, but not long enough: refused.
        let soon = t0 + IDLE_REPLACE_AFTER / 2;
        assert_eq!(
            admission.admit_at(spread(9000), soon, NEVER_DROP).err(),
            Some(Refusal::Full)
        );
        // Connection 7 talked recently; every other one stayed silent. Later, a newcomer
        // replaces one of the silent ones, never 7.
        let later = t0 + IDLE_REPLACE_AFTER * 2;
        for (i, guard) in held.iter().enumerate() {
            if i != 7 {
                guard
                    .watch()
                    .note_read(t0 + Duration::from_millis(i as u64));
            }
        }
        held[7].watch().note_read(later);
        let newcomer = admission.admit_at(spread(9000), later, NEVER_DROP).unwrap();
        assert_eq!(admission.held().0, MAX_UNAUTHENTICATED, "one for one");
        let closed: Vec<usize> = (0..held.len())
            .filter(|i| held[*i].watch().is_closed())
            .collect();
        assert_eq!(closed, vec![0], "the longest-silent one (0) is closed");
        // The replaced connection's guard dropping later does not free a second slot.
        let mut held = held;
        drop(held.remove(0));
        assert_eq!(admission.held().0, MAX_UNAUTHENTICATED);
        assert!(
            admission
                .take_summary()
                .unwrap()
                .contains("closed 1 silent unauthenticated connections")
        );
        drop(newcomer);
        drop(held);
        assert_eq!(admission.held(), (0, 0));
    }

    #[test]
    fn at_the_per_address_cap_only_a_silent_connection_of_that_address_is_replaced() {
        let admission = Admission::new(AdmissionLimits::default());
        let t0 = Instant::now();
        let other = admission.admit_at(ip("198.51.100.1"), t0, 0.0).unwrap();
        let same: Vec<_> = (0..MAX_UNAUTHENTICATED_PER_SOURCE)
            .map(|_| admission.admit_at(ip("198.51.100.2"), t0, 0.0).unwrap())
            .collect();
        let later = t0 + IDLE_REPLACE_AFTER * 3;
        // The other address's connection is the longest silent, but it is not this address's.
        for guard in &same {
            guard.watch().note_read(t0 + IDLE_REPLACE_AFTER);
        }
        let newcomer = admission.admit_at(ip("198.51.100.2"), later, 0.0).unwrap();
        assert!(!other.watch().is_closed());
        assert_eq!(same.iter().filter(|g| g.watch().is_closed()).count(), 1);
        drop((newcomer, same, other));
    }

    #[tokio::test]
    async fn a_closed_watch_fails_the_stream_and_wakes_a_pending_read() {
        use tokio::io::AsyncReadExt;
        let (client, server) = tokio::io::duplex(64);
        let watch = Arc::new(Watch::new(Instant::now()));
        let mut stream = Watched::new(server, watch.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            stream.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        watch.close();
        let result = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the pending read was woken")
            .unwrap();
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        drop(client);
    }

    #[tokio::test]
    async fn reads_count_as_activity() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let t0 = Instant::now();
        let watch = Arc::new(Watch::new(t0));
        let mut stream = Watched::new(server, watch.clone());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(watch.silent_for(Instant::now()) >= Duration::from_millis(100));
        client.write_all(b"SSH-2.0-x\r\n").await.unwrap();
        let mut buf = [0u8; 16];
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        assert!(watch.silent_for(Instant::now()) < Duration::from_millis(100));
    }

    #[test]
    fn key_slots_count_per_key_and_come_back_on_drop() {
        let quota = KeyConnections::new(2);
        let (a, b) = (
            KeyHash::from_stored("a".repeat(64)),
            KeyHash::from_stored("b".repeat(64)),
        );
        let a1 = quota.try_acquire(&a).unwrap();
        let a2 = quota.try_acquire(&a).unwrap();
        assert!(quota.try_acquire(&a).is_none());
        let b1 = quota.try_acquire(&b).unwrap();
        assert_eq!((quota.count(&a), quota.count(&b)), (2, 1));
        drop(a1);
        let a3 = quota.try_acquire(&a).unwrap();
        drop((a2, a3, b1));
        assert_eq!((quota.count(&a), quota.count(&b)), (0, 0));
        assert!(quota.lock().is_empty(), "no entries left behind");
    }
}
