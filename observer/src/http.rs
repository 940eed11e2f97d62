//! The HTTP adapter: `/metrics` (or `--web.telemetry-path`), `/connections`, `/healthz`
//! and a landing page. Thin: it only renders what the pipeline produced.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use crate::{metrics::Metrics, report::ConnectionReport};

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
    reports: VecDeque<ConnectionReport>,
}

impl RecentConnections {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            items: Mutex::new(Recent { next_seq: 1, reports: VecDeque::new() }),
            metrics: None,
        }
    }

    /// Counts overflow in `observer_connections_evicted_total`.
    pub fn counting_evictions(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn push(&self, mut report: ConnectionReport) {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        report.seq = items.next_seq;
        items.next_seq += 1;
        let evicted = if self.max == 0 {
            true
        } else if items.reports.len() >= self.max {
            items.reports.pop_front();
            items.reports.push_back(report);
            true
        } else {
            items.reports.push_back(report);
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
         <li><a href=\"/connections\">/connections</a>: recent closed connections (JSON; \
         filters: after, port, netns, class, cause, limit)</li>\
         <li><a href=\"/healthz\">/healthz</a></li></ul></body></html>",
        path = state.telemetry_path
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
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

#[derive(Debug, Default, Deserialize)]
struct Filter {
    after: Option<u64>,
    port: Option<u16>,
    netns: Option<u32>,
    class: Option<String>,
    cause: Option<String>,
    limit: Option<usize>,
}

impl Filter {
    fn matches(&self, report: &ConnectionReport) -> bool {
        self.after.is_none_or(|after| report.seq > after)
            && self.port.is_none_or(|port| report.port == port)
            && self.netns.is_none_or(|netns| report.netns == netns)
            && self.class.as_deref().is_none_or(|class| report.class.name() == class)
            && self.cause.as_deref().is_none_or(|cause| report.cause.name() == cause)
    }
}

/// Recent verdicts, oldest first, optionally filtered; `limit` keeps the newest.
async fn connections(
    State(state): State<AppState>,
    Query(filter): Query<Filter>,
) -> Json<Vec<ConnectionReport>> {
    let items = state.recent.items.lock().unwrap_or_else(PoisonError::into_inner);
    let mut selected: Vec<ConnectionReport> =
        items.reports.iter().filter(|report| filter.matches(report)).cloned().collect();
    drop(items);
    if let Some(limit) = filter.limit
        && selected.len() > limit
    {
        selected.drain(..selected.len() - limit);
    }
    Json(selected)
}
