//! Follows every socket from its first event to its verdict, in bounded memory.
//!
//! Pure state machine: events go in ([`Tracker::ingest`]), closed connections come out
//! ([`Tracker::expire`]) once their evidence is complete. The caller supplies the clock.
//!
//! **When is the evidence complete?** Some RSTs are emitted *after* the final
//! transition F, in the same kernel call (unread-data and SO_LINGER aborts, the reply to
//! data after close). The ring buffer delivers records in the order they were reserved,
//! so they reach us after F, microseconds later. A closed socket therefore waits
//! [`EVIDENCE_WINDOW`] after F before it is classified; the caller drains the ring before
//! each [`Tracker::expire`], so everything reserved within that window has been seen. A
//! socket whose address is reused earlier is decided at once: it was freed, so nothing
//! more can come.
//!
//! **Identity.** The socket pointer, which the kernel reuses after a free. A new
//! lifetime starts with `CLOSE -> SYN_SENT`, `CLOSE -> LISTEN` or `LISTEN -> SYN_RECV`
//! (a fresh child); anything still tracked under that address is settled first.
//!
//! **Bounds.** At most `capacity` sockets; past that the least recently active is
//! evicted (counted, never classified on partial evidence), so memory stays bounded
//! under any churn, including sockets whose final event was lost.
//!
//! **Size.** A busy host has hundreds of thousands of sockets open, so a tracked socket
//! keeps only what its verdict and `/connections` need, compactly ([`super::compact`]): the states it went
//! through four bits each, the one transition the classifier looks back at, addresses
//! without `SocketAddr`'s padding, its owner shared with the other sockets of the same
//! process, and the evidence of its end boxed (it exists only for the last instants).

pub mod compact;
mod tracked;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    num::{NonZeroU64, NonZeroUsize},
    sync::Arc,
};

use lru::LruCache;
use serde::Serialize;

use crate::{
    capture::decode::{Accepted, Reset, SocketEvent, SocketId, StateChange},
    classify::{self, Close, History, Outcome, ResetList, ResetSeen, Role, Verdict},
    owner::process::Process,
    tcp::TcpState,
    track::{
        compact::{Address, Owners},
        tracked::Tracked,
    },
};

pub use self::compact::StatePath;

/// How long after F RSTs of the same kernel call are waited for.
pub const EVIDENCE_WINDOW_NS: u64 = 100_000_000;

/// RSTs kept per socket (a connection sees one or two; a flood of them must not grow
/// memory). Further ones are still counted in the metrics, not kept as evidence.
const MAX_RESETS: usize = 8;

/// When a socket closed at `closed_ns` is classified (saturating: a timestamp near the
/// end of the clock, as only a corrupt record could carry, must not wrap or panic).
fn evidence_deadline(closed_ns: u64) -> u64 {
    closed_ns.saturating_add(EVIDENCE_WINDOW_NS)
}

/// A closed connection with its verdict and statistics, as reported everywhere
/// (metrics, `/connections`, `observer watch`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClosedConnection {
    /// CLOCK_MONOTONIC nanoseconds of the final transition.
    pub closed_at_ns: u64,
    pub netns: u32,
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub role: Role,
    pub verdict: Verdict,
    /// The service port: local for a server, remote for a client, lower otherwise.
    pub port: u16,
    /// States visited, first to last (`close` last).
    pub states: StatePath,
    /// CLOCK_MONOTONIC of the open (SYN_SENT / child creation / listen); unknown for
    /// sockets opened before we started.
    pub opened_ns: Option<u64>,
    /// Open to F; unknown for sockets opened before us.
    pub duration_ns: Option<u64>,
    /// The process that last made a system call on the socket; unknown if none did
    /// while we watched.
    pub owner: Option<Process>,
    pub previous_state: TcpState,
    pub snapshot: crate::capture::decode::Snapshot,
    pub resets: ResetList,
}

/// What the caller should count for an ingested event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A real state change (`old != new`).
    Transition { from: TcpState, to: TcpState },
    /// Nothing to count.
    None,
}

/// A socket still open, as `/connections` lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveSocket {
    pub netns: u32,
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    pub role: Role,
    pub opened_ns: Option<u64>,
    pub owner: Option<Process>,
    /// States visited so far, first to current.
    pub states: Vec<TcpState>,
}

/// Counters the tracker keeps about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Sockets dropped undecided because the table was full.
    pub evicted: u64,
    /// Sockets whose address was reused before we saw their final transition.
    pub replaced: u64,
}

/// (network namespace inode, local port) of a listener.
type ListeningPort = (u32, u16);
/// The listener's socket (`None`: older than the daemon) and its owner.
type ListenerOwner = (Option<SocketId>, Arc<Process>);

pub struct Tracker {
    /// Unbounded to the crate (which would allocate its table for the full capacity up
    /// front); the capacity is enforced in [`Tracker::insert`].
    sockets: LruCache<SocketId, Tracked>,
    capacity: NonZeroUsize,
    owners: Owners,
    /// Owners of sockets older than the daemon, by cookie (from the startup descriptor
    /// scan), taken when such a socket is first seen. Idle ones may never be: shared
    /// like the tracked sockets' owners, they cost a word each.
    preexisting_owners: std::collections::HashMap<u64, Arc<Process>>,
    /// The owner of each listening port, by (network namespace, port): the owner an
    /// accepted socket starts with. Where accept() is traced (a trampoline, or the
    /// opt-in system-call tracepoints) the accepting process replaces it; elsewhere it
    /// stands until a system call on the socket itself (close, shutdown) names one. The
    /// socket is `None` for listeners older than the daemon (known from the startup
    /// descriptor scan, not by address). With SO_REUSEPORT, the last listener seen.
    /// foldhash: looked up for every accepted socket.
    listener_owners: HashMap<ListeningPort, ListenerOwner, foldhash::fast::RandomState>,
    /// Closed sockets waiting for late evidence, in order of F.
    closing: VecDeque<(u64, SocketId)>,
    stats: TrackerStats,
}

impl Tracker {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            sockets: LruCache::unbounded(),
            capacity,
            owners: Owners::default(),
            preexisting_owners: std::collections::HashMap::new(),
            listener_owners: HashMap::default(),
            closing: VecDeque::new(),
            stats: TrackerStats::default(),
        }
    }

    /// Owners of the sockets that existed when the daemon started, by cookie, and of the
    /// listening ports among them, by (network namespace, port).
    pub fn set_preexisting_owners(
        &mut self,
        owners: std::collections::HashMap<u64, Process>,
        listeners: impl IntoIterator<Item = ((u32, u16), Process)>,
    ) {
        self.preexisting_owners =
            owners.into_iter().map(|(cookie, owner)| (cookie, self.owners.share(owner))).collect();
        for (port, owner) in listeners {
            let owner = self.owners.share(owner);
            self.listener_owners.entry(port).or_insert((None, owner));
        }
    }

    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// Sockets currently tracked (live and awaiting a verdict).
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// When the oldest closed socket's evidence window ends.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.closing.front().map(|(deadline, _)| *deadline)
    }

    /// Feeds one event; verdicts settled on the way (address reuse, eviction) are
    /// appended to `decided`.
    pub fn ingest(&mut self, event: &SocketEvent, decided: &mut Vec<ClosedConnection>) -> Effect {
        match event {
            SocketEvent::State(change) => self.state_change(change, decided),
            SocketEvent::Reset(reset) => {
                self.reset(reset, decided);
                Effect::None
            }
            SocketEvent::Accepted(accepted) => {
                self.accepted(accepted);
                Effect::None
            }
        }
    }

    /// Sockets still open (not yet at their final transition), least recent first.
    pub fn live(&self) -> impl Iterator<Item = LiveSocket> + '_ {
        self.open_sockets()
            .map(|(socket, tracked)| LiveSocket { states: states_path(tracked).to_vec(), ..socket })
    }

    /// The first `max` open sockets (most recently active first) that `keep` selects.
    /// `keep` sees each one without its `states`, which are filled in only for the
    /// sockets kept: a selective filter costs a comparison per socket, as it runs under
    /// the lock the capture thread takes.
    pub fn live_where(
        &self,
        max: usize,
        mut keep: impl FnMut(&LiveSocket) -> bool,
    ) -> Vec<LiveSocket> {
        self.open_sockets()
            .filter(|(socket, _)| keep(socket))
            .take(max)
            .map(|(socket, tracked)| LiveSocket { states: states_path(tracked).to_vec(), ..socket })
            .collect()
    }

    fn open_sockets(&self) -> impl Iterator<Item = (LiveSocket, &Tracked)> + '_ {
        self.sockets.iter().rev().filter(|(_, tracked)| !tracked.is_closed()).map(|(_, tracked)| {
            let socket = LiveSocket {
                netns: tracked.netns,
                cookie: tracked.cookie,
                local: tracked.local.into(),
                remote: tracked.remote.into(),
                state: tracked.state,
                role: tracked.role.unwrap_or(Role::Unknown),
                opened_ns: tracked.opened_ns(),
                owner: tracked.owner.as_deref().copied(),
                states: Vec::new(),
            };
            (socket, tracked)
        })
    }

    /// Classifies every closed socket whose evidence window ended at or before `now_ns`
    /// (CLOCK_MONOTONIC). Drain the ring buffer first.
    pub fn expire(&mut self, now_ns: u64, decided: &mut Vec<ClosedConnection>) {
        self.expire_at_most(now_ns, decided, usize::MAX);
    }

    /// [`Tracker::expire`], deciding at most `limit` sockets; returns whether more are
    /// due. When a whole host's connections close at once (a process holding 100 000 of
    /// them exits), deciding them in batches keeps their verdicts from all being held in
    /// memory together (~400 bytes each).
    pub fn expire_at_most(
        &mut self,
        now_ns: u64,
        decided: &mut Vec<ClosedConnection>,
        limit: usize,
    ) -> bool {
        let mut left = limit;
        while let Some(&(deadline, socket)) = self.closing.front() {
            if deadline > now_ns {
                return false;
            }
            if left == 0 {
                return true;
            }
            self.closing.pop_front();
            // Stale entries (already settled by reuse or eviction) are skipped.
            let current = self.sockets.peek(&socket).and_then(Tracked::close);
            if current.is_some_and(|c| evidence_deadline(c.timestamp_ns) == deadline)
                && let Some(tracked) = self.sockets.pop(&socket)
            {
                decided.extend(finish(tracked));
                left -= 1;
            }
        }
        false
    }

    /// Classifies everything already closed, regardless of the window (shutdown).
    pub fn flush(&mut self, decided: &mut Vec<ClosedConnection>) {
        self.expire(u64::MAX, decided);
    }

    fn state_change(
        &mut self,
        change: &StateChange,
        decided: &mut Vec<ClosedConnection>,
    ) -> Effect {
        let birth = match (change.old, change.new) {
            (TcpState::Close, TcpState::SynSent) => Some(Role::Client),
            (TcpState::Listen, TcpState::SynRecv) => Some(Role::Server),
            (TcpState::Close, TcpState::Listen) => Some(Role::Unknown),
            _ => None,
        };
        if let Some(role) = birth {
            self.settle_previous_lifetime(change.socket, decided);
            let role = (role != Role::Unknown).then_some(role);
            let opened = NonZeroU64::new(change.timestamp_ns.max(1));
            let mut tracked = Tracked::new(role, opened, change);
            tracked.state = change.old;
            if role == Some(Role::Server) {
                tracked.owner = self
                    .listener_owners
                    .get(&(change.netns, change.local.port()))
                    .map(|(_, owner)| Arc::clone(owner));
            }
            self.insert(change.socket, tracked, decided);
        } else if self.sockets.peek(&change.socket).is_none_or(|t| t.is_closed()) {
            if change.old == change.new || change.old == TcpState::Close {
                // CLOSE -> CLOSE after a listener abort, or a repeat of a settled socket.
                return Effect::None;
            }
            // First sight of a socket opened before we started.
            self.settle_previous_lifetime(change.socket, decided);
            let mut tracked = Tracked::new(None, None, change);
            tracked.owner = self.preexisting_owners.remove(&change.cookie);
            self.insert(change.socket, tracked, decided);
        }

        let Some(tracked) = self.sockets.get_mut(&change.socket) else {
            return Effect::None;
        };
        tracked.record(change);
        tracked.learn_addresses(change);
        if let Some(owner) = change.owner
            && tracked.owner.as_deref() != Some(&owner)
        {
            tracked.owner = Some(self.owners.share(owner));
        }
        let listening_port = (change.netns, change.local.port());
        if change.new == TcpState::Listen
            && let Some(owner) = &tracked.owner
        {
            self.listener_owners.insert(listening_port, (Some(change.socket), Arc::clone(owner)));
        } else if change.old == TcpState::Listen
            && change.new == TcpState::Close
            && self
                .listener_owners
                .get(&listening_port)
                .is_some_and(|(socket, _)| socket.is_none_or(|socket| socket == change.socket))
        {
            self.listener_owners.remove(&listening_port);
        }
        if change.old == change.new {
            return Effect::None;
        }
        tracked.state = change.new;
        if change.new == TcpState::Close {
            tracked.end.get_or_insert_default().close = Some(Close {
                previous: change.old,
                timestamp_ns: change.timestamp_ns,
                snapshot: change.snapshot,
            });
            self.closing.push_back((evidence_deadline(change.timestamp_ns), change.socket));
        }
        Effect::Transition { from: change.old, to: change.new }
    }

    /// accept() handed the socket to a process. A socket we do not follow (established
    /// before we started and never seen since) is left alone: we know nothing else of it.
    fn accepted(&mut self, accepted: &Accepted) {
        if let Some(tracked) = self.sockets.get_mut(&accepted.socket)
            && !tracked.is_closed()
        {
            tracked.owner = Some(self.owners.share(accepted.owner));
        }
    }

    fn reset(&mut self, reset: &Reset, decided: &mut Vec<ClosedConnection>) {
        if !self.sockets.contains(&reset.socket) {
            // RSTs from timewait/request sockets and listeners, or after a socket was
            // settled, belong to no connection we follow.
            if matches!(
                reset.state,
                TcpState::Close | TcpState::TimeWait | TcpState::NewSynRecv | TcpState::Listen
            ) {
                return;
            }
            // A socket opened before we started, about to be reset or time out.
            // Its addresses arrive with its final transition.
            let unknown = Address::from(SocketAddr::from(([0, 0, 0, 0], 0)));
            let placeholder = Tracked {
                state: reset.state,
                role: None,
                states: StatePath::default(),
                last_change_ns: 0,
                last_change: None,
                opened_ns: None,
                netns: 0,
                cookie: reset.cookie,
                local: unknown,
                remote: unknown,
                owner: self.preexisting_owners.remove(&reset.cookie),
                end: None,
            };
            self.insert(reset.socket, placeholder, decided);
        }
        if let Some(tracked) = self.sockets.get_mut(&reset.socket) {
            let after_close = tracked.is_closed();
            let end = tracked.end.get_or_insert_default();
            if end.resets.len() >= MAX_RESETS {
                return;
            }
            end.resets.push(ResetSeen {
                direction: reset.direction,
                reason: reset.reason,
                answers_packet: reset.answers_packet,
                after_close,
            });
        }
    }

    /// A new socket at this address: whatever was there has been freed.
    fn settle_previous_lifetime(&mut self, socket: SocketId, decided: &mut Vec<ClosedConnection>) {
        if let Some(previous) = self.sockets.pop(&socket) {
            if previous.is_closed() {
                decided.extend(finish(previous));
            } else {
                // Its final transition was lost (ring buffer full): no verdict.
                self.stats.replaced += 1;
            }
        }
    }

    /// Tracks a socket not tracked yet, making room for it if the table is full.
    fn insert(&mut self, socket: SocketId, tracked: Tracked, decided: &mut Vec<ClosedConnection>) {
        if self.sockets.len() >= self.capacity.get()
            && let Some((_, evicted)) = self.sockets.pop_lru()
        {
            if evicted.is_closed() {
                // Its window is cut short, but F and the RSTs of its own call are in.
                decided.extend(finish(evicted));
            } else {
                self.stats.evicted += 1;
            }
        }
        self.sockets.put(socket, tracked);
    }
}

/// Classifies a closed socket; listeners yield nothing.
fn finish(mut tracked: Tracked) -> Option<ClosedConnection> {
    let states = states_path(&tracked);
    let last_change = tracked.last_change();
    let end = *tracked.end.take()?;
    let close = end.close?;
    let history =
        History { role: tracked.role, last_change, close: Some(close), resets: end.resets };
    let verdict = match classify::classify(&history) {
        Outcome::Connection(verdict) => verdict,
        Outcome::Listener | Outcome::Open => return None,
    };
    let role = tracked.role.unwrap_or(Role::Unknown);
    let (local, remote) = (tracked.local.into(), tracked.remote.into());
    let port = service_port(role, local, remote);
    Some(ClosedConnection {
        closed_at_ns: close.timestamp_ns,
        netns: tracked.netns,
        cookie: tracked.cookie,
        local,
        remote,
        role,
        verdict,
        port,
        states,
        opened_ns: tracked.opened_ns(),
        duration_ns: tracked.opened_ns().map(|opened| close.timestamp_ns.saturating_sub(opened)),
        owner: tracked.owner.as_deref().copied(),
        previous_state: close.previous,
        snapshot: close.snapshot,
        resets: history.resets,
    })
}

/// The service port: local for a server (and a listener), remote for a client, and
/// without a role the lower of the two (services usually have the lower port).
pub fn service_port(role: Role, local: SocketAddr, remote: SocketAddr) -> u16 {
    match role {
        Role::Server => local.port(),
        Role::Client => remote.port(),
        Role::Unknown => match (local.port(), remote.port()) {
            (0, remote) => remote,
            (local, 0) => local,
            (local, remote) => local.min(remote),
        },
    }
}

/// The states a socket went through, first to current.
fn states_path(tracked: &Tracked) -> StatePath {
    match tracked.states {
        states if states.is_empty() => {
            let mut only = StatePath::default();
            only.push(tracked.state);
            only
        }
        states => states,
    }
}

#[cfg(test)]
mod tests;
