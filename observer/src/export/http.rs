//! The HTTP adapter: `/metrics` (or `--web.telemetry-path`), `/connections`, `/healthz`
//! and a landing page. Thin: it gathers the inputs of a request and renders what
//! [`super::connections`] and [`super::metrics`] make of them.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use crate::{
    clock::Clock,
    export::{
        connections::{Filter, MAX_LIMIT, RecentConnections, StatusFilter, open_connections},
        metrics::Metrics,
    },
    inventory::{Inventory, SharedListing, Summary},
    owner::{CgroupNames, Process},
    scan,
    track::Tracker,
};

/// A scrape or a `/connections` request reuses a socket inventory this recent (or
/// more, on hosts where listing the sockets takes long: [`crate::inventory::reuse_time`]).
pub const INVENTORY_FRESHNESS: Duration = Duration::from_secs(1);

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
    /// Full socket listings for `/connections`, shared by concurrent requests.
    pub listing: Arc<SharedListing>,
    pub cgroups: Arc<Mutex<CgroupNames>>,
    /// Who held each socket (by inode) when the daemon started, for sockets older than
    /// it that no system call has touched since.
    pub startup_holders: Arc<HashMap<u32, Process>>,
}

impl AppState {
    /// Brings the live socket counts up to date (see [`INVENTORY_FRESHNESS`]).
    async fn refresh_inventory(&self) {
        let inventory = Arc::clone(&self.inventory);
        let summary = scan::SOCKETS.run(move || inventory.refresh(INVENTORY_FRESHNESS)).await;
        let summary: Arc<Summary> = summary.unwrap_or_else(|| self.inventory.latest());
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

/// Open sockets (when asked for), then closed connections oldest first, at most `limit`
/// records in all (closed ones first: see [`Filter::limit`]). Each part is bounded before
/// anything is built for it, and the tracker is locked only to pick its sockets.
async fn connections(
    State(state): State<AppState>,
    query: Result<Query<Filter>, QueryRejection>,
) -> Response {
    let filter = match query {
        Ok(Query(filter)) => filter,
        Err(rejection) => {
            return (StatusCode::BAD_REQUEST, format!("{}\n", rejection.body_text()))
                .into_response();
        }
    };
    let Some(limit) = filter.limit() else {
        return (StatusCode::BAD_REQUEST, format!("limit is at most {MAX_LIMIT}\n"))
            .into_response();
    };
    let clock = Clock::now();
    let closed = match filter.status {
        StatusFilter::Open => Vec::new(),
        _ => state.recent.reports(&clock, &filter, limit),
    };
    let room = limit - closed.len();
    let mut selected = Vec::new();
    if filter.status != StatusFilter::Closed && filter.after.is_none() && room > 0 {
        // The sockets as they are now, not as the last scrape saw them; concurrent
        // requests share one listing.
        let listing = Arc::clone(&state.listing);
        let listed = scan::SOCKETS.run(move || listing.get()).await.unwrap_or_default();
        let live = state
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live_where(room, |socket| filter.may_select_live(socket));
        let mut cgroups = state.cgroups.lock().unwrap_or_else(PoisonError::into_inner);
        selected = open_connections(
            &live,
            &listed,
            &state.recent,
            &state.startup_holders,
            &mut cgroups,
            &clock,
            (&filter, room),
        );
    }
    selected.extend(closed);
    Json(selected).into_response()
}
