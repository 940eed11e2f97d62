//! The HTTP server: HTTP/1.1 over plain TCP or TLS, with everything a client can hold
//! bounded — connections, the time to send a request head (or finish a TLS handshake),
//! requests in flight and their duration — so that no client, however hostile, can keep
//! a scraper out for long or exhaust the daemon's descriptors.
//!
//! * At most [`Limits::max_connections`] connections: past it, each new connection closes
//!   the oldest one that has no request in progress. A flood of connections thus never
//!   locks a scraper out, as refusing new ones would until the flood times out, nor cuts
//!   off an answer being served.
//! * A request head (and, over TLS, the handshake before it) must arrive within
//!   [`Limits::header_timeout`]; that includes a keep-alive connection waiting for its
//!   next request, so idle connections are closed after it too.
//! * At most [`Limits::max_requests`] requests in flight, others answered 503 at once
//!   (node_exporter's `--web.max-requests`); each bounded by [`Limits::request_timeout`].

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::export::web_config::LiveConfig;
use tower_service::Service as _;

/// Descriptors kept for everything but client connections (rings, maps, netlink,
/// /proc, the log…).
const RESERVED_DESCRIPTORS: u64 = 128;

/// What a client may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_requests: usize,
    pub request_timeout: Duration,
}

impl Limits {
    /// `max_connections` lowered to what the open-file limit leaves room for.
    pub fn within_open_file_limit(mut self, open_files: u64) -> Self {
        let room = open_files.saturating_sub(RESERVED_DESCRIPTORS).max(16);
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        if self.max_connections > room {
            log::warn!(
                "--web.max-connections lowered to {room}: the open-file limit is {open_files}"
            );
            self.max_connections = room;
        }
        self
    }
}

/// Raises the soft open-file limit to the hard one (systemd gives services 1024 soft,
/// 524288 hard); returns the soft limit in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            } else {
                log::debug!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    limit.rlim_cur
}

/// `router` with the per-request bounds: requests past `max_requests` in flight are
/// answered 503, and a request that takes longer than `request_timeout` 503 too.
pub fn bounded(router: Router, limits: Limits) -> Router {
    let in_flight = Arc::new(RequestBounds {
        slots: Semaphore::new(limits.max_requests.max(1)),
        timeout: limits.request_timeout,
    });
    router.layer(middleware::from_fn_with_state(in_flight, bound_request))
}

struct RequestBounds {
    slots: Semaphore,
    timeout: Duration,
}

async fn bound_request(
    State(bounds): State<Arc<RequestBounds>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_slot) = bounds.slots.try_acquire() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many requests in flight\n").into_response();
    };
    match tokio::time::timeout(bounds.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response(),
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets the requests in progress
/// finish for a moment; over TLS if the web configuration in force has it (each
/// handshake takes the certificate in force then).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: Arc<LiveConfig>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let open = Arc::new(OpenConnections::new(limits.max_connections));
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, or a connection reset before it was accepted: wait
                // a little rather than spin.
                log::debug!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let connection = open.admit();
        let tls = config.current().tls.clone();
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tasks.spawn(async move {
            let closed = connection.closed();
            let requests = Arc::clone(&connection.requests);
            let served = async {
                match tls {
                    None => {
                        serve_connection(TokioIo::new(stream), app, requests, limits, &shutdown)
                            .await;
                    }
                    Some(tls) => {
                        let handshake = TlsAcceptor::from(tls).accept(stream);
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(limits.header_timeout, handshake).await
                        {
                            let io = TokioIo::new(stream);
                            serve_connection(io, app, requests, limits, &shutdown).await;
                        }
                    }
                }
            };
            tokio::select! {
                () = served => {}
                () = closed.cancelled() => {}
            }
            drop(connection);
        });
    }
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await.is_err() {
        log::debug!("HTTP connections still open at shutdown were closed");
    }
}

/// Serves the requests of one connection, counting those in progress in `requests`.
async fn serve_connection<I>(
    io: I,
    app: Router,
    requests: Arc<AtomicUsize>,
    limits: Limits,
    shutdown: &CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let in_progress = InProgress::start(&requests);
        let mut app = app.clone();
        async move {
            let _in_progress = in_progress;
            app.call(request.map(axum::body::Body::new)).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// A request in progress on a connection, counted while it lives.
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn start(requests: &Arc<AtomicUsize>) -> Self {
        requests.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(requests))
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The open connections, oldest first: each with a token that closes it, and its
/// requests in progress.
struct OpenConnections {
    max: usize,
    next_id: AtomicU64,
    open: Mutex<VecDeque<Open>>,
}

struct Open {
    id: u64,
    close: CancellationToken,
    requests: Arc<AtomicUsize>,
}

impl OpenConnections {
    fn new(max: usize) -> Self {
        Self { max: max.max(1), next_id: AtomicU64::new(0), open: Mutex::new(VecDeque::new()) }
    }

    /// Registers a new connection; past the maximum, closes the oldest one without a
    /// request in progress (the oldest of all if every one has a request).
    fn admit(self: &Arc<Self>) -> Admitted {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, requests) = (CancellationToken::new(), Arc::new(AtomicUsize::new(0)));
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        while open.len() >= self.max {
            let idle = open.iter().position(|open| open.requests.load(Ordering::Relaxed) == 0);
            if let Some(evicted) = open.remove(idle.unwrap_or(0)) {
                evicted.close.cancel();
            }
        }
        open.push_back(Open { id, close: close.clone(), requests: Arc::clone(&requests) });
        Admitted { id, close, requests, registry: Arc::clone(self) }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// A connection's place among the open ones; dropping it gives the place back.
struct Admitted {
    id: u64,
    close: CancellationToken,
    requests: Arc<AtomicUsize>,
    registry: Arc<OpenConnections>,
}

impl Admitted {
    /// Resolves when the connection must close to make room for a newer one.
    fn closed(&self) -> CancellationToken {
        self.close.clone()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.registry.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = open.iter().position(|open| open.id == self.id) {
            open.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_past_the_maximum_closes_the_oldest_idle_one() {
        let open = Arc::new(OpenConnections::new(2));
        let serving = open.admit();
        let _request = InProgress::start(&serving.requests);
        let idle = open.admit();
        let _newest = open.admit();
        assert!(idle.closed().is_cancelled(), "the oldest idle connection makes room");
        assert!(!serving.closed().is_cancelled(), "an answer being served is not cut off");
    }

    #[test]
    fn a_new_connection_past_the_maximum_closes_the_oldest() {
        let open = Arc::new(OpenConnections::new(2));
        let first = open.admit();
        let second = open.admit();
        assert_eq!(open.len(), 2);
        let third = open.admit();
        assert!(first.closed().is_cancelled(), "the oldest makes room");
        assert!(!second.closed().is_cancelled() && !third.closed().is_cancelled());
        assert_eq!(open.len(), 2);
        drop(second);
        assert_eq!(open.len(), 1, "a closed connection gives its place back");
        drop(first);
        assert_eq!(open.len(), 1, "an evicted one has no place left to give");
    }

    #[test]
    fn connections_fit_in_the_open_file_limit() {
        let limits = Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(5),
            max_requests: 40,
            request_timeout: Duration::from_secs(30),
        };
        assert_eq!(limits.within_open_file_limit(1024).max_connections, 896);
        assert_eq!(limits.within_open_file_limit(1 << 20).max_connections, 4096);
        assert_eq!(limits.within_open_file_limit(0).max_connections, 16);
    }
}
