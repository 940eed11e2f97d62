//! Every TCP socket of every network namespace on the host, as the kernel's socket-diag
//! netlink interface lists them — the same source and the same counts as `ss -tan`.
//!
//! The tracepoint never shows TIME_WAIT sockets (they are mini-sockets, not `struct
//! sock`) nor sockets that existed before the daemon started, so the live state counts
//! come from here, not from counting transitions. A dump runs on a short-lived thread
//! that enters each namespace in turn (`setns` changes only the calling thread, and a
//! netlink socket answers for the namespace it was created in); the thread then exits,
//! so no other thread ever runs in a foreign namespace and no namespace is kept alive.
//!
//! Namespaces seen: the daemon's own, the named ones under `/run/netns`, and those of
//! every running process (`/proc/<pid>/ns/net`), deduplicated by inode.

//!
//! Here: the dump itself ([`sock_diag`]), the namespaces and the thread that enters them
//! ([`namespaces`]), and what the metrics keep of a listing — counts, ages, CLOSE_WAIT by
//! port ([`Inventory`]).

pub mod namespaces;
pub mod sock_diag;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use self::namespaces::for_each_namespace;
pub use self::{
    namespaces::network_namespaces,
    sock_diag::{Detail, DiagSocket, TcpStats, dump_tcp_sockets},
};
use crate::{classify::Role, tcp::TcpState};

/// How long a socket stays in TIME_WAIT: the kernel's `TCP_TIMEWAIT_LEN`, a constant
/// (not a sysctl) on every kernel we support. The timer restarts at this length when
/// the peer retransmits its FIN.
pub(crate) const TIME_WAIT_LENGTH: Duration = Duration::from_secs(60);

/// The sockets of one network namespace.
#[derive(Clone, Debug, Default)]
pub struct NamespaceSockets {
    /// Inode of the namespace (as in `readlink /proc/PID/ns/net`).
    pub netns: u32,
    pub sockets: Vec<DiagSocket>,
}

impl NamespaceSockets {
    /// The service port of a socket: its local port if something in this namespace
    /// listens on it (the server side), else the remote one.
    pub fn service_port(&self, listening: &HashSet<u16>, socket: &DiagSocket) -> u16 {
        service_port(listening, socket.local.port(), socket.remote.port())
    }

    /// What a dump alone tells of a socket's role: on a port this namespace listens on,
    /// it is the server side (a child of that listener); talking to a listener of this
    /// same namespace over loopback, the client. Anything else is unknown.
    pub fn role(&self, listening: &HashSet<u16>, socket: &DiagSocket) -> Role {
        if socket.state == TcpState::Listen {
            Role::Unknown
        } else if listening.contains(&socket.local.port()) {
            Role::Server
        } else if socket.remote.ip().is_loopback() && listening.contains(&socket.remote.port()) {
            Role::Client
        } else {
            Role::Unknown
        }
    }

    pub fn listening_ports(&self) -> HashSet<u16> {
        self.sockets
            .iter()
            .filter(|s| s.state == TcpState::Listen)
            .map(|s| s.local.port())
            .collect()
    }
}

/// See [`NamespaceSockets::service_port`].
fn service_port(listening: &HashSet<u16>, local: u16, remote: u16) -> u16 {
    if listening.contains(&local) { local } else { remote }
}

/// What the metrics need of one namespace: counts and oldest age per state, and the
/// CLOSE_WAIT sockets' ages by service port. Kept instead of the sockets themselves,
/// which may be hundreds of thousands (TIME_WAIT under churn).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceSummary {
    pub netns: u32,
    /// state → (sockets, seconds the oldest has been in it).
    pub states: BTreeMap<TcpState, (u64, f64)>,
    /// (service port, seconds in CLOSE_WAIT) of each CLOSE_WAIT socket.
    pub close_wait_ages: Vec<(u16, f64)>,
    /// Ports something listens on (the metrics give them their own `port` value first).
    pub listening: Vec<u16>,
}

impl NamespaceSummary {
    /// Summarises a listing, given each socket's age.
    pub fn of(namespace: &NamespaceSockets, mut age: impl FnMut(&DiagSocket) -> f64) -> Self {
        let mut tally = Tally::new(namespace.netns);
        for socket in &namespace.sockets {
            tally.add(socket, age(socket));
        }
        tally.finish()
    }
}

/// A [`NamespaceSummary`] built while the namespace is being listed, so that its
/// sockets need not be kept.
struct Tally {
    summary: NamespaceSummary,
    listening: HashSet<u16>,
    /// (local port, remote port, seconds in CLOSE_WAIT) of each CLOSE_WAIT socket: which
    /// port is the service is known once all the listeners have been seen.
    close_wait: Vec<(u16, u16, f64)>,
}

impl Tally {
    fn new(netns: u32) -> Self {
        Self {
            summary: NamespaceSummary { netns, ..NamespaceSummary::default() },
            listening: HashSet::new(),
            close_wait: Vec::new(),
        }
    }

    fn add(&mut self, socket: &DiagSocket, age: f64) {
        let entry = self.summary.states.entry(socket.state).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(age);
        match socket.state {
            TcpState::Listen => {
                self.listening.insert(socket.local.port());
            }
            TcpState::CloseWait => {
                self.close_wait.push((socket.local.port(), socket.remote.port(), age));
            }
            _ => {}
        }
    }

    fn finish(mut self) -> NamespaceSummary {
        self.summary.close_wait_ages = self
            .close_wait
            .into_iter()
            .map(|(local, remote, age)| (service_port(&self.listening, local, remote), age))
            .collect();
        self.summary.listening = self.listening.into_iter().collect();
        self.summary.listening.sort_unstable();
        self.summary
    }
}

/// The inventory as the metrics see it.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub namespaces: Vec<NamespaceSummary>,
    /// Namespaces that could not be entered or dumped.
    pub failures: u64,
}

/// Socket counts of every namespace, refreshed on demand, and when each socket was
/// first seen in its current state.
///
/// A TIME_WAIT socket's age is what its timewait timer has run (the kernel knows it;
/// under churn they are most of the host's sockets, so none of them is remembered).
/// Other ages are measured from the first dump that showed the socket in that state, so
/// they are exact to the refresh interval for sockets that changed state while the
/// daemon ran, and lower bounds (time since the daemon's first dump) for older ones.
pub struct Inventory {
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    taken_at: Option<Instant>,
    /// How long the latest listing took.
    took: Duration,
    latest: Arc<Summary>,
    /// netns → socket cookie → when the socket was first seen in its state. Updated in
    /// place (not rebuilt) at each refresh: there may be hundreds of thousands of sockets.
    first_seen: HashMap<u32, HashMap<u64, Seen, foldhash::fast::RandomState>>,
    /// Flipped at each refresh; entries it did not mark were not listed again.
    parity: bool,
}

/// A socket's entry in [`State::first_seen`], in one word: its state (4 bits), the
/// parity of the refresh that last listed it (1 bit), and since when it has been in that
/// state (milliseconds after [`Inventory`]'s start, 59 bits).
#[derive(Clone, Copy, Debug)]
struct Seen(u64);

impl Seen {
    const SINCE_BITS: u32 = 59;
    const SINCE_MASK: u64 = (1 << Self::SINCE_BITS) - 1;

    fn new(state: TcpState, parity: bool, since_ms: u64) -> Self {
        Self(
            (state as u64) << (Self::SINCE_BITS + 1)
                | u64::from(parity) << Self::SINCE_BITS
                | since_ms & Self::SINCE_MASK,
        )
    }

    fn state(self) -> TcpState {
        TcpState::ALL[(self.0 >> (Self::SINCE_BITS + 1)) as usize]
    }

    fn parity(self) -> bool {
        self.0 >> Self::SINCE_BITS & 1 == 1
    }

    fn since_ms(self) -> u64 {
        self.0 & Self::SINCE_MASK
    }
}

impl Default for Inventory {
    fn default() -> Self {
        Self::new()
    }
}

/// A listing is reused for at least this many times as long as it took.
const COST_LIMIT: u32 = 20;

/// How long a listing that took `took` is reused at least: a listing costs in proportion
/// to every socket of the host times the namespaces (the kernel walks all its sockets for
/// each namespace), so scrapes of a large host would otherwise keep a core busy. This
/// keeps the inventory under 1/[`COST_LIMIT`] of a core, whatever the host holds.
pub fn reuse_time(took: Duration) -> Duration {
    took * COST_LIMIT
}

impl Inventory {
    pub fn new() -> Self {
        Self { started: Instant::now(), state: Mutex::new(State::default()) }
    }

    /// The latest summary, taken anew if it is older than `max_age` and than its
    /// [`reuse_time`] (blocking: call from a blocking thread). Sockets are counted as the
    /// kernel lists them, never kept all at once.
    pub fn refresh(&self, max_age: Duration) -> Arc<Summary> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let reuse_for = max_age.max(reuse_time(state.took));
        if state.taken_at.is_some_and(|at| at.elapsed() < reuse_for) {
            return Arc::clone(&state.latest);
        }
        let now = Instant::now();
        let now_ms = now.duration_since(self.started).as_millis() as u64;
        state.parity = !state.parity;
        let parity = state.parity;
        let first_seen = &mut state.first_seen;
        let mut namespaces = Vec::new();
        let failures = for_each_namespace(Detail::StatesOnly, |netns, namespace| {
            let seen = first_seen.entry(netns).or_default();
            let mut tally = Tally::new(netns);
            namespace.list(|socket| {
                let age_ms = match socket.time_wait_left {
                    Some(left) if socket.state == TcpState::TimeWait => {
                        TIME_WAIT_LENGTH.saturating_sub(left).as_millis() as u64
                    }
                    _ => {
                        let entry = seen.entry(socket.cookie).or_insert(Seen::new(
                            socket.state,
                            parity,
                            now_ms,
                        ));
                        let since =
                            if entry.state() == socket.state { entry.since_ms() } else { now_ms };
                        *entry = Seen::new(socket.state, parity, since);
                        now_ms.saturating_sub(since)
                    }
                };
                tally.add(&socket, age_ms as f64 / 1000.0);
            })?;
            namespaces.push(tally.finish());
            Ok(())
        });
        first_seen.retain(|_, seen| {
            seen.retain(|_, entry| entry.parity() == parity);
            // Give back what a burst of sockets (TIME_WAIT under churn) made it grow to.
            if seen.capacity() > 4 * seen.len().max(1024) {
                seen.shrink_to(2 * seen.len());
            }
            !seen.is_empty()
        });
        state.latest = Arc::new(Summary { namespaces, failures });
        state.taken_at = Some(now);
        state.took = now.elapsed();
        log::debug!(
            "socket inventory: {} sockets in {} namespaces listed in {:?}",
            state
                .latest
                .namespaces
                .iter()
                .flat_map(|n| n.states.values())
                .map(|s| s.0)
                .sum::<u64>(),
            state.latest.namespaces.len(),
            state.took
        );
        crate::memory::release_freed_heap();
        Arc::clone(&state.latest)
    }

    /// The latest summary without refreshing.
    pub fn latest(&self) -> Arc<Summary> {
        Arc::clone(&self.state.lock().unwrap_or_else(PoisonError::into_inner).latest)
    }
}

/// Full listings ([`list_all`]) shared by the requests that want one at the same time.
///
/// A request is answered by a listing started after it arrived, so it sees every socket
/// that existed then; but requests arriving while a listing is being taken wait for the
/// next one together, and take it once: however many clients ask, at most one listing
/// runs and one waits.
#[derive(Default)]
pub struct SharedListing {
    /// Held while a listing is taken.
    turn: Mutex<()>,
    latest: Mutex<Option<(Instant, Arc<Vec<NamespaceSockets>>)>>,
}

impl SharedListing {
    /// A listing started no earlier than this call (blocking).
    pub fn get(&self) -> Arc<Vec<NamespaceSockets>> {
        let arrived = Instant::now();
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some((started, listing)) = latest
            && started >= arrived
        {
            return listing;
        }
        let started = Instant::now();
        let listing = Arc::new(list_all());
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((started, Arc::clone(&listing)));
        listing
    }
}

/// Every socket of every namespace, listed now (blocking).
pub fn list_all() -> Vec<NamespaceSockets> {
    let mut namespaces = Vec::new();
    for_each_namespace(Detail::WithCounters, |netns, namespace| {
        let mut sockets = Vec::new();
        namespace.list(|socket| sockets.push(socket))?;
        namespaces.push(NamespaceSockets { netns, sockets });
        Ok(())
    });
    namespaces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_is_reused_in_proportion_to_its_cost() {
        assert_eq!(reuse_time(Duration::from_millis(2)), Duration::from_millis(40));
        assert_eq!(reuse_time(Duration::from_millis(100)), Duration::from_secs(2));
        let inventory = Inventory::new();
        let started = Instant::now();
        let first = inventory.refresh(Duration::ZERO);
        let took = inventory.state.lock().unwrap().took;
        assert!(took > Duration::ZERO);
        // Asked again at once with no age allowed: reused, unless its reuse time passed.
        let second = inventory.refresh(Duration::ZERO);
        assert!(Arc::ptr_eq(&first, &second) || started.elapsed() >= reuse_time(took));
    }

    #[test]
    fn first_seen_entries_keep_their_parts() {
        for state in TcpState::ALL {
            for parity in [false, true] {
                for since_ms in [0, 1, 86_400_000 * 365 * 100] {
                    let seen = Seen::new(state, parity, since_ms);
                    assert_eq!(
                        (seen.state(), seen.parity(), seen.since_ms()),
                        (state, parity, since_ms)
                    );
                }
            }
        }
    }
}
