//! The records of `/connections`: the most recent verdicts, kept numbered, and the join
//! that lists every open socket — those the tracker follows (owner, history), completed
//! by the socket inventory (counters, and sockets only it knows: TIME_WAIT, sockets
//! older than the daemon), owned by the verdict or the start-up holder where one is
//! known. No I/O here but the cgroup names' cache; the HTTP adapter gathers the inputs.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use serde::Deserialize;

use crate::{
    classify::Role,
    clock::Clock,
    export::{
        metrics::Metrics,
        report::{ConnectionReport, OwnerReport, Status},
    },
    inventory::{DiagSocket, NamespaceSockets},
    owner::{Cgroup, CgroupNames, Process},
    track::{ClosedConnection, LiveSocket, service_port},
};

/// The most recent verdicts, for `/connections`, each numbered in order (`seq`) so a
/// client can ask only for what is new (`?after=<seq>`).
pub struct RecentConnections {
    max: usize,
    items: Mutex<Recent>,
    /// Counts verdicts pushed out by newer ones.
    metrics: Option<Arc<Metrics>>,
}

#[derive(Default)]
struct Recent {
    next_seq: u64,
    closes: VecDeque<RecentClose>,
}

/// A verdict as `/connections` keeps it. Its report (text addresses, wall-clock times,
/// owner names) is built only when asked for: under a reset storm most verdicts leave
/// the buffer unread.
struct RecentClose {
    seq: u64,
    connection: ClosedConnection,
    /// Resolved when the verdict was made: the owner's cgroup may be gone by the time
    /// someone asks.
    cgroup: Option<Cgroup>,
}

impl RecentClose {
    fn report(&self, clock: &Clock) -> ConnectionReport {
        ConnectionReport {
            seq: Some(self.seq),
            ..ConnectionReport::closed(&self.connection, clock, self.cgroup.clone())
        }
    }
}

impl RecentConnections {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            items: Mutex::new(Recent { next_seq: 1, closes: VecDeque::new() }),
            metrics: None,
        }
    }

    /// Counts overflow in `observer_connections_evicted_total`.
    pub fn counting_evictions(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Keeps a verdict; `cgroup` is its owner's, resolved now.
    pub fn push(&self, connection: ClosedConnection, cgroup: Option<Cgroup>) {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        let close = RecentClose { seq: items.next_seq, connection, cgroup };
        items.next_seq += 1;
        let evicted = if self.max == 0 {
            true
        } else if items.closes.len() >= self.max {
            items.closes.pop_front();
            items.closes.push_back(close);
            true
        } else {
            items.closes.push_back(close);
            false
        };
        drop(items);
        if evicted && let Some(metrics) = &self.metrics {
            metrics.record_recent_evicted();
        }
    }

    /// Reports of the kept verdicts, oldest first, that `filter` selects.
    pub fn reports(&self, clock: &Clock, filter: &Filter) -> Vec<ConnectionReport> {
        let items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items.closes.iter().map(|close| close.report(clock)).filter(|r| filter.matches(r)).collect()
    }
}

/// Which records `/connections` returns: open sockets, closed connections, or both.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
    Open,
    Closed,
    #[default]
    All,
}

#[derive(Debug, Default, Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub status: StatusFilter,
    /// TCP state name (`established`, `close_wait`, `time_wait`, … `close` for closed).
    pub state: Option<String>,
    /// Closed connections after this `seq` (open sockets are not numbered).
    pub after: Option<u64>,
    pub port: Option<u16>,
    pub netns: Option<u32>,
    pub pid: Option<u32>,
    pub class: Option<String>,
    pub cause: Option<String>,
    pub limit: Option<usize>,
}

impl Filter {
    pub fn matches(&self, report: &ConnectionReport) -> bool {
        self.after.is_none_or(|after| report.seq.is_some_and(|seq| seq > after))
            && self.state.as_deref().is_none_or(|state| report.state.name() == state)
            && self.port.is_none_or(|port| report.port == port)
            && self.netns.is_none_or(|netns| report.netns == netns)
            && self.pid.is_none_or(|pid| report.owner.pid() == Some(pid))
            && self
                .class
                .as_deref()
                .is_none_or(|class| report.class.is_some_and(|c| c.name() == class))
            && self
                .cause
                .as_deref()
                .is_none_or(|cause| report.cause.is_some_and(|c| c.name() == cause))
    }
}

/// Every open socket: those the tracker follows (with owner and history), completed
/// with the inventory's counters, then those only the inventory knows (older than the
/// daemon and quiet since, TIME_WAIT).
pub fn open_connections(
    live: &[LiveSocket],
    namespaces: &[NamespaceSockets],
    recent: &RecentConnections,
    startup_holders: &HashMap<u32, Process>,
    cgroups: &mut CgroupNames,
    clock: &Clock,
) -> Vec<ConnectionReport> {
    let mut by_cookie: HashMap<(u32, u64), (&DiagSocket, usize)> = HashMap::new();
    let mut by_tuple: HashMap<(u32, SocketAddr, SocketAddr), (u64, usize)> = HashMap::new();
    let listening: Vec<_> = namespaces.iter().map(|n| n.listening_ports()).collect();
    for (index, namespace) in namespaces.iter().enumerate() {
        for socket in &namespace.sockets {
            by_cookie.insert((namespace.netns, socket.cookie), (socket, index));
            by_tuple.insert((namespace.netns, socket.local, socket.remote), (socket.cookie, index));
        }
    }
    let mut reports = Vec::with_capacity(live.len());
    let mut listed = HashSet::new();
    for socket in live {
        // Kernels before 5.12 give the tracker no cookie: match by 4-tuple then.
        let cookie = match socket.cookie {
            0 => by_tuple.get(&(socket.netns, socket.local, socket.remote)).map(|(c, _)| *c),
            cookie => Some(cookie),
        };
        let found = cookie.and_then(|cookie| by_cookie.get(&(socket.netns, cookie)));
        if let Some(cookie) = cookie {
            listed.insert((socket.netns, cookie));
        }
        let port = match (socket.role, found) {
            (Role::Unknown, Some((diag, index))) => {
                namespaces[*index].service_port(&listening[*index], diag)
            }
            (role, _) => service_port(role, socket.local, socket.remote),
        };
        let stats = found.and_then(|(diag, _)| diag.stats);
        reports.push(ConnectionReport::open(socket, stats, port, clock, cgroups));
    }
    // A TIME_WAIT (or orphaned FIN_WAIT2) socket keeps the cookie of the connection it
    // continues, which already has its verdict: that one knows the role and the owner.
    let recent = recent.items.lock().unwrap_or_else(PoisonError::into_inner);
    let judged: HashMap<(u32, u64), &RecentClose> = recent
        .closes
        .iter()
        .filter(|close| close.connection.cookie != 0)
        .map(|close| ((close.connection.netns, close.connection.cookie), close))
        .collect();
    for (index, namespace) in namespaces.iter().enumerate() {
        for socket in &namespace.sockets {
            if !listed.contains(&(namespace.netns, socket.cookie)) {
                let port = namespace.service_port(&listening[index], socket);
                let role = namespace.role(&listening[index], socket);
                let mut report = ConnectionReport::inventoried(namespace.netns, socket, port, role);
                if let Some(judged) = judged.get(&(namespace.netns, socket.cookie)) {
                    let closed = &judged.connection;
                    report.role = closed.role;
                    report.port = closed.port;
                    report.owner =
                        OwnerReport::with_cgroup(closed.owner.as_ref(), judged.cgroup.clone());
                    report.opened_at = closed.opened_ns.map(|ns| clock.rfc3339(ns));
                } else if let Some(holder) = startup_holders.get(&socket.inode) {
                    report.owner = OwnerReport::new(Some(holder), cgroups);
                }
                reports.push(report);
            }
        }
    }
    debug_assert!(reports.iter().all(|r| r.status == Status::Open));
    reports
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use crate::{
        capture::decode::{Snapshot, SocketEvent, StateChange},
        inventory::TcpStats,
        tcp::TcpState::{self, *},
        track::Tracker,
    };

    const NETNS: u32 = 1;
    const CLIENT: &str = "10.0.0.1:40000";
    const SERVER: &str = "10.0.0.2:80";

    fn process(pid: u32) -> Process {
        Process { pid, tid: pid, comm: "curl".into(), cgroup_id: 0 }
    }

    fn change(cookie: u64, ms: u64, old: TcpState, new: TcpState) -> SocketEvent {
        SocketEvent::State(StateChange {
            timestamp_ns: ms * 1_000_000,
            socket: 0x1000 * cookie,
            cookie,
            netns: NETNS,
            old,
            new,
            local: CLIENT.parse().unwrap(),
            remote: SERVER.parse().unwrap(),
            snapshot: Snapshot { has_socket: true, ..Snapshot::default() },
            owner: (old == Close).then(|| process(10 + cookie as u32)),
        })
    }

    /// A client the tracker follows (connect(), then established), cookie as given.
    fn live_client(cookie: u64) -> Vec<LiveSocket> {
        let mut tracker = Tracker::new(NonZeroUsize::new(16).unwrap());
        let mut decided = Vec::new();
        for event in [change(cookie, 1, Close, SynSent), change(cookie, 2, SynSent, Established)] {
            tracker.ingest(&event, &mut decided);
        }
        tracker.live().collect()
    }

    fn listed(state: TcpState, cookie: u64, inode: u32) -> Vec<NamespaceSockets> {
        let socket = DiagSocket {
            state,
            local: CLIENT.parse().unwrap(),
            remote: SERVER.parse().unwrap(),
            cookie,
            inode,
            stats: Some(TcpStats { bytes_acked: 100, ..TcpStats::default() }),
            time_wait_left: None,
        };
        vec![NamespaceSockets { netns: NETNS, sockets: vec![socket] }]
    }

    fn join_with(
        live: &[LiveSocket],
        namespaces: &[NamespaceSockets],
        recent: &RecentConnections,
        holders: &HashMap<u32, Process>,
    ) -> Vec<ConnectionReport> {
        open_connections(live, namespaces, recent, holders, &mut CgroupNames::new(), &Clock::now())
    }

    /// The join with no verdict and no start-up holder known.
    fn join(live: &[LiveSocket], namespaces: &[NamespaceSockets]) -> Vec<ConnectionReport> {
        join_with(live, namespaces, &RecentConnections::new(8), &HashMap::new())
    }

    #[test]
    fn a_tracked_socket_is_listed_once_with_the_inventorys_counters() {
        let reports = join(&live_client(7), &listed(Established, 7, 0));
        assert_eq!(reports.len(), 1, "{reports:#?}");
        let report = &reports[0];
        assert_eq!((report.role, report.port, report.bytes_acked), (Role::Client, 80, 100));
        assert_eq!(report.owner.pid(), Some(17));
        assert_eq!(report.states, vec![SynSent, Established]);
    }

    /// Kernels before 5.12 give the tracker no cookie.
    #[test]
    fn a_socket_without_a_cookie_is_matched_by_its_addresses() {
        let reports = join(&live_client(0), &listed(Established, 9, 0));
        assert_eq!(reports.len(), 1, "{reports:#?}");
        assert_eq!((reports[0].owner.pid(), reports[0].bytes_acked), (Some(10), 100));
    }

    #[test]
    fn a_time_wait_socket_takes_role_and_owner_from_its_verdict() {
        let mut tracker = Tracker::new(NonZeroUsize::new(16).unwrap());
        let mut decided = Vec::new();
        for event in [
            change(7, 1, Close, SynSent),
            change(7, 2, SynSent, Established),
            change(7, 3, Established, FinWait1),
            change(7, 4, FinWait1, FinWait2),
            change(7, 5, FinWait2, Close),
        ] {
            tracker.ingest(&event, &mut decided);
        }
        tracker.flush(&mut decided);
        let recent = RecentConnections::new(8);
        recent.push(decided.pop().expect("a verdict"), None);
        let reports = join_with(&[], &listed(TimeWait, 7, 0), &recent, &HashMap::new());
        assert_eq!(reports.len(), 1, "{reports:#?}");
        let report = &reports[0];
        assert_eq!((report.state, report.role, report.port), (TimeWait, Role::Client, 80));
        assert_eq!(report.owner.pid(), Some(17));
        assert!(report.opened_at.is_some());
    }

    #[test]
    fn a_socket_older_than_the_daemon_is_owned_by_its_startup_holder() {
        let holders = HashMap::from([(4242, process(99))]);
        let namespaces = listed(Established, 5, 4242);
        let reports = join_with(&[], &namespaces, &RecentConnections::new(8), &holders);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].owner.pid(), Some(99));
        let unknown =
            join_with(&[], &listed(Established, 5, 1), &RecentConnections::new(8), &holders);
        assert_eq!(unknown[0].owner.pid(), None);
    }

    #[test]
    fn kept_verdicts_are_numbered_and_bounded() {
        let mut tracker = Tracker::new(NonZeroUsize::new(16).unwrap());
        let mut decided = Vec::new();
        for cookie in 1..=3 {
            for event in [change(cookie, 1, Close, SynSent), change(cookie, 2, SynSent, Close)] {
                tracker.ingest(&event, &mut decided);
            }
        }
        tracker.flush(&mut decided);
        let recent = RecentConnections::new(2);
        for connection in decided {
            recent.push(connection, None);
        }
        let all = recent.reports(&Clock::now(), &Filter::default());
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [Some(2), Some(3)]);
        let after = recent.reports(&Clock::now(), &Filter { after: Some(2), ..Filter::default() });
        assert_eq!(after.iter().map(|r| r.seq).collect::<Vec<_>>(), [Some(3)]);
    }
}
