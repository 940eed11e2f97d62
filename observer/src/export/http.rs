//! The HTTP adapter: `/metrics` (or `--web.telemetry-path`), `/connections`, `/healthz`
//! and a landing page. Thin: it only renders what the pipeline produced.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use crate::{
    classify::Role,
    clock::Clock,
    export::metrics::Metrics,
    export::report::{ConnectionReport, OwnerReport, Status},
    inventory::{self, DiagSocket, Inventory, NamespaceSockets, Summary},
    owner::{Cgroup, CgroupNames, Process},
    track::{ClosedConnection, Tracker, service_port},
};

/// A scrape or a `/connections` request reuses a socket inventory this recent (or
/// more, on hosts where listing the sockets takes long: [`crate::inventory::reuse_time`]).
pub const INVENTORY_FRESHNESS: Duration = Duration::from_secs(1);

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
}

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub recent: Arc<RecentConnections>,
    /// True while the ring-buffer reader runs.
    pub healthy: Arc<AtomicBool>,
    pub telemetry_path: String,
    /// The sockets the pipeline follows (open ones are listed by `/connections`).
    pub tracker: Arc<Mutex<Tracker>>,
    pub inventory: Arc<Inventory>,
    pub cgroups: Arc<Mutex<CgroupNames>>,
    /// Who held each socket (by inode) when the daemon started, for sockets older than
    /// it that no system call has touched since.
    pub startup_holders: Arc<HashMap<u32, Process>>,
}

impl AppState {
    /// Brings the live socket counts up to date (see [`INVENTORY_FRESHNESS`]).
    async fn refresh_inventory(&self) {
        let inventory = Arc::clone(&self.inventory);
        let summary =
            tokio::task::spawn_blocking(move || inventory.refresh(INVENTORY_FRESHNESS)).await;
        let summary: Arc<Summary> = summary.unwrap_or_else(|_| self.inventory.latest());
        self.metrics.set_inventory(&summary);
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(landing))
        .route(&state.telemetry_path, get(metrics))
        .route("/healthz", get(healthz))
        .route("/connections", get(connections))
        .with_state(state)
}

async fn landing(State(state): State<AppState>) -> Html<String> {
    Html(format!(
        "<html><head><title>observer</title></head><body><h1>observer</h1>\
         <p>How every TCP connection on this host ended.</p><ul>\
         <li><a href=\"{path}\">{path}</a>: Prometheus metrics</li>\
         <li><a href=\"/connections\">/connections</a>: open sockets and recent closed \
         connections (JSON; filters: status, state, port, netns, pid, class, cause, after, \
         limit)</li>\
         <li><a href=\"/healthz\">/healthz</a></li></ul></body></html>",
        path = state.telemetry_path
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.refresh_inventory().await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.healthy.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "event reader stopped\n")
    }
}

/// Which records `/connections` returns: open sockets, closed connections, or both.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StatusFilter {
    Open,
    Closed,
    #[default]
    All,
}

#[derive(Debug, Default, Deserialize)]
struct Filter {
    #[serde(default)]
    status: StatusFilter,
    /// TCP state name (`established`, `close_wait`, `time_wait`, … `close` for closed).
    state: Option<String>,
    /// Closed connections after this `seq` (open sockets are not numbered).
    after: Option<u64>,
    port: Option<u16>,
    netns: Option<u32>,
    pid: Option<u32>,
    class: Option<String>,
    cause: Option<String>,
    limit: Option<usize>,
}

impl Filter {
    fn matches(&self, report: &ConnectionReport) -> bool {
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

/// Open sockets (when asked for), then recent verdicts oldest first; `limit` keeps the
/// last ones.
async fn connections(
    State(state): State<AppState>,
    Query(filter): Query<Filter>,
) -> Json<Vec<ConnectionReport>> {
    let mut selected = Vec::new();
    let clock = Clock::now();
    if filter.status != StatusFilter::Closed && filter.after.is_none() {
        // Listed afresh: the sockets as they are now, not as the last scrape saw them.
        let listed = tokio::task::spawn_blocking(inventory::list_all).await.unwrap_or_default();
        let open = open_connections(&state, &listed, &clock);
        selected.extend(open.into_iter().filter(|report| filter.matches(report)));
    }
    if filter.status != StatusFilter::Open {
        let items = state.recent.items.lock().unwrap_or_else(PoisonError::into_inner);
        selected.extend(
            items.closes.iter().map(|close| close.report(&clock)).filter(|r| filter.matches(r)),
        );
    }
    if let Some(limit) = filter.limit
        && selected.len() > limit
    {
        selected.drain(..selected.len() - limit);
    }
    Json(selected)
}

/// Every open socket: those the tracker follows (with owner and history), completed
/// with the inventory's counters, then those only the inventory knows (older than the
/// daemon and quiet since, TIME_WAIT).
fn open_connections(
    state: &AppState,
    namespaces: &[NamespaceSockets],
    clock: &Clock,
) -> Vec<ConnectionReport> {
    let live: Vec<_> =
        state.tracker.lock().unwrap_or_else(PoisonError::into_inner).live().collect();
    let mut by_cookie: HashMap<(u32, u64), (&DiagSocket, usize)> = HashMap::new();
    let mut by_tuple: HashMap<(u32, SocketAddr, SocketAddr), (u64, usize)> = HashMap::new();
    let listening: Vec<_> = namespaces.iter().map(|n| n.listening_ports()).collect();
    for (index, namespace) in namespaces.iter().enumerate() {
        for socket in &namespace.sockets {
            by_cookie.insert((namespace.netns, socket.cookie), (socket, index));
            by_tuple.insert((namespace.netns, socket.local, socket.remote), (socket.cookie, index));
        }
    }
    let mut cgroups = state.cgroups.lock().unwrap_or_else(PoisonError::into_inner);
    let mut reports = Vec::with_capacity(live.len());
    let mut listed = std::collections::HashSet::new();
    for socket in &live {
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
        reports.push(ConnectionReport::open(socket, stats, port, clock, &mut cgroups));
    }
    // A TIME_WAIT (or orphaned FIN_WAIT2) socket keeps the cookie of the connection it
    // continues, which already has its verdict: that one knows the role and the owner.
    let recent = state.recent.items.lock().unwrap_or_else(PoisonError::into_inner);
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
                } else if let Some(holder) = state.startup_holders.get(&socket.inode) {
                    report.owner = OwnerReport::new(Some(holder), &mut cgroups);
                }
                reports.push(report);
            }
        }
    }
    debug_assert!(reports.iter().all(|r| r.status == Status::Open));
    reports
}
