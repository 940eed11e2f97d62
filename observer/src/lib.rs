//! observer: tells how every TCP connection on a Linux host ended — graceful FIN
//! (active, passive, simultaneous), RST (sent or received, and why), timeout
//! (retransmission, keepalive, SYN, zero window) or something else — and exports the
//! counts to Prometheus.
//!
//! # Layout
//!
//! The kernel side (`observer-ebpf`) only captures evidence. Here:
//!
//! * [`kernel_layout`]: where `struct sock` fields live in the running kernel (BTF).
//! * [`loader`]: loads and attaches the eBPF programs; owns the drop counters.
//! * [`event`]: decodes ring-buffer records into [`event::SocketEvent`]s.
//! * [`tracker`]: follows each socket to its final transition, in bounded memory, and
//!   waits until the evidence is complete.
//! * [`classify`]: the pure decision — one [`classify::Verdict`] per connection.
//! * [`pipeline`]: the ring-buffer reader task wiring the three above together.
//! * [`metrics`], [`http`], [`report`], [`cli`]: thin adapters.
//!
//! [`run_daemon`] and [`run_watch`] are the two entry points; both take their shutdown
//! trigger as a token so tests and the binary decide when to stop.

pub mod classify;
pub mod cli;
pub mod error;
pub mod event;
pub mod http;
pub mod kernel_layout;
pub mod loader;
pub mod metrics;
pub mod pipeline;
pub mod report;
pub mod shutdown;
pub mod tcp;
pub mod tracker;

use std::{
    fs::File,
    io::{BufWriter, Write as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

use crate::{
    classify::Cause,
    cli::{CommonArgs, DaemonArgs, WatchArgs},
    error::Error,
    event::{Decoder, SocketEvent},
    http::{AppState, RecentConnections},
    kernel_layout::KernelLayout,
    metrics::Metrics,
    pipeline::{Pipeline, Sink},
    report::{Clock, ConnectionReport},
    tracker::ClosedConnection,
};

/// The kernel's BTF, parsed at start, is freed by now; glibc would keep those pages
/// (17 MiB of the daemon's 48 MiB resident on 6.18) for an allocation burst that never
/// comes. Hand them back (docs/benchmarks.md).
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Checks privileges and the kernel, then loads and attaches the programs.
fn attach(common: &CommonArgs) -> Result<(KernelLayout, loader::Attached), Error> {
    loader::check_privileges()?;
    let layout = KernelLayout::from_running_kernel()?;
    if !layout.missing.is_empty() {
        log::warn!("this kernel lacks {}; those fields read as 0", layout.missing.join(", "));
    }
    let attached = loader::load(&layout, common.ring_buffer_bytes)?;
    release_freed_heap();
    Ok((layout, attached))
}

/// Logs verdicts nobody could explain, with everything we knew.
fn log_unknown(report: &ConnectionReport) {
    if report.cause == Cause::Unknown {
        let evidence = serde_json::to_string(report).unwrap_or_default();
        log::warn!("connection ended in an unrecognised way: {evidence}");
    }
}

/// Feeds `/connections`, the log, and `--debug.events-file`.
struct DaemonSink {
    recent: Arc<RecentConnections>,
    clock: Clock,
    events_file: Option<BufWriter<File>>,
}

impl Sink for DaemonSink {
    fn event(&mut self, event: &SocketEvent) {
        if let Some(file) = &mut self.events_file {
            let written = serde_json::to_writer(&mut *file, event)
                .map_err(std::io::Error::from)
                .and_then(|()| file.write_all(b"\n"));
            if let Err(error) = written {
                log::error!("cannot write to the events file, no longer recording: {error}");
                self.events_file = None;
            }
        }
    }

    fn closed(&mut self, connection: &ClosedConnection) {
        let report = ConnectionReport::new(connection, &self.clock);
        log_unknown(&report);
        self.recent.push(report);
    }

    fn flush(&mut self) {
        if let Some(file) = &mut self.events_file
            && let Err(error) = file.flush()
        {
            log::error!("cannot write to the events file, no longer recording: {error}");
            self.events_file = None;
        }
    }
}

/// The exporter: serves metrics until `shutdown` is cancelled.
pub async fn run_daemon(
    args: DaemonArgs,
    common: CommonArgs,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let events_file =
        match &args.events_file {
            Some(path) => Some(BufWriter::new(File::create(path).map_err(|source| Error::Io {
                context: "cannot create the events file",
                source,
            })?)),
            None => None,
        };
    let (layout, attached) = attach(&common)?;
    let listener = tokio::net::TcpListener::bind(args.listen_address)
        .await
        .map_err(|source| Error::Listen { address: args.listen_address, source })?;
    let address = listener.local_addr().unwrap_or(args.listen_address);

    let metrics = Arc::new(Metrics::new(args.max_ports));
    let recent = Arc::new(RecentConnections::new(args.max_recent));
    let healthy = Arc::new(AtomicBool::new(true));
    let app = http::router(AppState {
        metrics: Arc::clone(&metrics),
        recent: Arc::clone(&recent),
        healthy: Arc::clone(&healthy),
        telemetry_path: args.telemetry_path.clone(),
    });
    let server_stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await
    });
    log::info!("listening on http://{address}{}", args.telemetry_path);

    let sink = DaemonSink { recent, clock: Clock::now(), events_file };
    let pipeline =
        Pipeline::new(attached, Decoder::new(&layout), common.max_sockets, metrics, sink);
    let result = pipeline.run(shutdown.clone()).await;
    healthy.store(false, Ordering::Relaxed);
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(source)) => log::error!("HTTP server failed: {source}"),
        Err(join) => log::error!("HTTP server task failed: {join}"),
    }
    result
}

/// Prints verdicts (or raw events) to stdout.
struct WatchSink {
    args: WatchArgs,
    clock: Clock,
    stop: CancellationToken,
}

impl WatchSink {
    fn print(&self, line: &str) {
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
            // stdout closed (e.g. piped into `head`): stop quietly.
            self.stop.cancel();
        }
    }
}

impl Sink for WatchSink {
    fn event(&mut self, event: &SocketEvent) {
        if self.args.events {
            self.print(&serde_json::to_string(event).unwrap_or_default());
        }
    }

    fn closed(&mut self, connection: &ClosedConnection) {
        if self.args.events
            || (!self.args.ports.is_empty() && !self.args.ports.contains(&connection.port))
        {
            return;
        }
        let report = ConnectionReport::new(connection, &self.clock);
        log_unknown(&report);
        if self.args.json {
            self.print(&serde_json::to_string(&report).unwrap_or_default());
        } else {
            self.print(&report.line());
        }
    }
}

/// `observer watch`: one line per closed connection until `shutdown` is cancelled.
pub async fn run_watch(
    args: WatchArgs,
    common: CommonArgs,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (layout, attached) = attach(&common)?;
    let metrics = Arc::new(Metrics::new(0));
    let sink = WatchSink { args: args.clone(), clock: Clock::now(), stop: shutdown.clone() };
    log::info!("attached; printing connections as they close (Ctrl-C to stop)");
    if !args.json && !args.events {
        sink.print(&ConnectionReport::header());
    }
    Pipeline::new(attached, Decoder::new(&layout), common.max_sockets, metrics, sink)
        .run(shutdown)
        .await
}
