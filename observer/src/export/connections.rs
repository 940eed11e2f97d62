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
    tcp::TcpState,
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
#[derive(Clone)]
struct RecentClose {
    seq: u64,
    connection: ClosedConnection,
    /// Resolved when the verdict was made: the owner's cgroup may be gone by the time
    /// someone asks.
    cgroup: Option<Cgroup>,
}

impl RecentClose {
    fn fields(&self) -> Fields<'_> {
        let connection = &self.connection;
        Fields {
            seq: Some(self.seq),
            state: TcpState::Close,
            ports: (connection.port, connection.port),
            netns: connection.netns,
            pid: connection.owner.map(|owner| owner.pid),
            class: Some(connection.verdict.class().name()),
            cause: Some(connection.verdict.cause.name()),
        }
    }

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

    /// Reports of at most `limit` kept verdicts that `filter` selects, oldest first: the
    /// newest ones, or with `after` the first ones after it (a client following the
    /// verdicts pages forward). Only those are built, under the lock the capture thread
    /// takes to push: selecting is a comparison per verdict.
    pub fn reports(&self, clock: &Clock, filter: &Filter, limit: usize) -> Vec<ConnectionReport> {
        let items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        let selected = |close: &&RecentClose| filter.selects(&close.fields());
        let chosen: Vec<&RecentClose> = if filter.after.is_some() {
            items.closes.iter().filter(selected).take(limit).collect()
        } else {
            let mut newest: Vec<_> =
                items.closes.iter().rev().filter(selected).take(limit).collect();
            newest.reverse();
            newest
        };
        // Copies out, so that the reports are built after the lock is released.
        let chosen: Vec<RecentClose> = chosen.into_iter().cloned().collect();
        drop(items);
        chosen.iter().map(|close| close.report(clock)).collect()
    }
}

impl RecentConnections {
    /// Copies of the kept verdicts on these sockets ((netns, cookie); cookie 0 never
    /// matches), one pass under the lock.
    fn verdicts_on(
        &self,
        sockets: impl Iterator<Item = (u32, u64)>,
    ) -> HashMap<(u32, u64), RecentClose> {
        let wanted: HashSet<(u32, u64)> = sockets.filter(|(_, cookie)| *cookie != 0).collect();
        if wanted.is_empty() {
            return HashMap::new();
        }
        let items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items
            .closes
            .iter()
            .map(|close| ((close.connection.netns, close.connection.cookie), close))
            .filter(|(key, _)| wanted.contains(key))
            .map(|(key, close)| (key, close.clone()))
            .collect()
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

/// The query of `/connections`. Unknown keys, repeated keys and values that do not parse
/// are refused (400): a typo must not turn into an unfiltered answer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// At most this many records ([`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]): the newest
    /// closed connections, or with `after` the first ones after it, then open sockets
    /// while room is left.
    pub limit: Option<usize>,
}

/// Records in a `/connections` answer unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 1000;
/// The most records one answer holds (a few MiB of JSON).
pub const MAX_LIMIT: usize = 10_000;

/// What a filter looks at in a record, whatever kind of record it is: a report, a kept
/// verdict, or a tracked socket (before anything is built for it).
pub struct Fields<'a> {
    pub seq: Option<u64>,
    pub state: TcpState,
    /// The service port; for a socket whose role is unknown, both of its ports.
    pub ports: (u16, u16),
    pub netns: u32,
    pub pid: Option<u32>,
    pub class: Option<&'a str>,
    pub cause: Option<&'a str>,
}

impl Filter {
    pub fn matches(&self, report: &ConnectionReport) -> bool {
        self.selects(&Fields {
            seq: report.seq,
            state: report.state,
            ports: (report.port, report.port),
            netns: report.netns,
            pid: report.owner.pid(),
            class: report.class.map(|class| class.name()),
            cause: report.cause.map(|cause| cause.name()),
        })
    }

    /// Whether a tracked open socket may be selected (exact but for the port of a socket
    /// whose role is unknown: either of its ports passes, the report decides).
    pub fn may_select_live(&self, socket: &LiveSocket) -> bool {
        let ports = match socket.role {
            Role::Unknown => (socket.local.port(), socket.remote.port()),
            role => {
                let port = service_port(role, socket.local, socket.remote);
                (port, port)
            }
        };
        self.selects(&Fields {
            seq: None,
            state: socket.state,
            ports,
            netns: socket.netns,
            pid: socket.owner.map(|owner| owner.pid),
            class: None,
            cause: None,
        })
    }

    pub fn selects(&self, fields: &Fields<'_>) -> bool {
        self.after.is_none_or(|after| fields.seq.is_some_and(|seq| seq > after))
            && self.state.as_deref().is_none_or(|state| fields.state.name() == state)
            && self.port.is_none_or(|port| fields.ports.0 == port || fields.ports.1 == port)
            && self.netns.is_none_or(|netns| fields.netns == netns)
            && self.pid.is_none_or(|pid| fields.pid == Some(pid))
            && self.class.as_deref().is_none_or(|class| fields.class == Some(class))
            && self.cause.as_deref().is_none_or(|cause| fields.cause == Some(cause))
    }

    /// The answer's size: `limit`, or [`DEFAULT_LIMIT`]; `None` past [`MAX_LIMIT`].
    pub fn limit(&self) -> Option<usize> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        (limit <= MAX_LIMIT).then_some(limit)
    }
}

/// The open sockets `filter` selects, at most `limit`: those the tracker follows (with
/// owner and history; `live`, already chosen with [`Filter::may_select_live`]),
/// completed with the inventory's counters, then those only the inventory knows (older
/// than the daemon and quiet since, TIME_WAIT). Reports are built only for sockets that
/// will be in the answer.
pub fn open_connections(
    live: &[LiveSocket],
    namespaces: &[NamespaceSockets],
    recent: &RecentConnections,
    startup_holders: &HashMap<u32, Process>,
    cgroups: &mut CgroupNames,
    clock: &Clock,
    (filter, limit): (&Filter, usize),
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
        let report = ConnectionReport::open(socket, stats, port, clock, cgroups);
        if filter.matches(&report) {
            reports.push(report);
        }
    }
    let only_inventoried: Vec<(usize, &DiagSocket)> = namespaces
        .iter()
        .enumerate()
        .filter(|(_, namespace)| filter.netns.is_none_or(|netns| namespace.netns == netns))
        .flat_map(|(index, namespace)| namespace.sockets.iter().map(move |socket| (index, socket)))
        .filter(|(index, socket)| {
            filter.state.as_deref().is_none_or(|state| socket.state.name() == state)
                && !listed.contains(&(namespaces[*index].netns, socket.cookie))
        })
        .collect();
    // A TIME_WAIT (or orphaned FIN_WAIT2) socket keeps the cookie of the connection it
    // continues, which already has its verdict: that one knows the role and the owner.
    let judged = recent.verdicts_on(
        only_inventoried.iter().map(|(index, socket)| (namespaces[*index].netns, socket.cookie)),
    );
    for (index, socket) in only_inventoried {
        if reports.len() >= limit {
            break;
        }
        let namespace = &namespaces[index];
        let port = namespace.service_port(&listening[index], socket);
        let role = namespace.role(&listening[index], socket);
        let mut report = ConnectionReport::inventoried(namespace.netns, socket, port, role);
        if let Some(judged) = judged.get(&(namespace.netns, socket.cookie)) {
            let closed = &judged.connection;
            report.role = closed.role;
            report.port = closed.port;
            report.owner = OwnerReport::with_cgroup(closed.owner.as_ref(), judged.cgroup.clone());
            report.opened_at = closed.opened_ns.map(|ns| clock.rfc3339(ns));
        } else if let Some(holder) = startup_holders.get(&socket.inode) {
            report.owner = OwnerReport::new(Some(holder), cgroups);
        }
        if filter.matches(&report) {
            reports.push(report);
        }
    }
    debug_assert!(reports.iter().all(|r| r.status == Status::Open));
    reports.truncate(limit);
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
        let everything = (&Filter::default(), usize::MAX);
        open_connections(
            live,
            namespaces,
            recent,
            holders,
            &mut CgroupNames::new(None),
            &Clock::now(),
            everything,
        )
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
        let all = recent.reports(&Clock::now(), &Filter::default(), usize::MAX);
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [Some(2), Some(3)]);
        let after =
            recent.reports(&Clock::now(), &Filter { after: Some(2), ..Filter::default() }, 9);
        assert_eq!(after.iter().map(|r| r.seq).collect::<Vec<_>>(), [Some(3)]);
    }
}
