//! `observer watch`: one line (or JSON object) per connection as it closes.

use std::{
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
};

use tokio_util::sync::CancellationToken;

use crate::{
    capture::{
        decode::{Decoder, SocketEvent},
        reader::{Pipeline, Sink},
    },
    cli::{CommonArgs, WatchArgs},
    clock::Clock,
    error::Error,
    export::{
        metrics::{CloseLabels, Metrics},
        report::{self, ConnectionReport},
    },
    kernel,
    owner::CgroupNames,
    track::{ClosedConnection, Tracker},
};

/// Hands verdicts (or raw events) to the printer thread: the capture thread never
/// waits for a slow terminal or pipe.
struct WatchSink {
    args: WatchArgs,
    cgroups: CgroupNames,
    lines: SyncSender<String>,
    /// Lines the printer had no room for (stdout slower than the verdicts), reported at
    /// the end.
    dropped: Arc<AtomicU64>,
}

/// Lines waiting for stdout at most.
const PRINT_QUEUE: usize = 65_536;

impl WatchSink {
    fn print(&self, line: String) {
        match self.lines.try_send(line) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes lines to stdout until the sink is gone; stops the watch if stdout closes (e.g.
/// piped into `head`).
fn spawn_printer(
    lines: Receiver<String>,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("observer-print".into()).spawn(move || {
        let mut stdout = std::io::stdout().lock();
        while let Ok(line) = lines.recv() {
            let mut written = writeln!(stdout, "{line}");
            // Flush once the queue is empty: a burst is written in one go.
            while written.is_ok()
                && let Ok(line) = lines.try_recv()
            {
                written = writeln!(stdout, "{line}");
            }
            if written.and_then(|()| stdout.flush()).is_err() {
                stop.cancel();
                return;
            }
        }
    })
}

impl Sink for WatchSink {
    fn event(&mut self, event: &SocketEvent) {
        if self.args.events {
            self.print(serde_json::to_string(event).unwrap_or_default());
        }
    }

    fn closed(&mut self, connection: ClosedConnection) {
        if self.args.events
            || (!self.args.ports.is_empty() && !self.args.ports.contains(&connection.port))
        {
            return;
        }
        let report = ConnectionReport::new(&connection, &Clock::now(), &mut self.cgroups);
        report::log_unknown(&report);
        if self.args.json {
            self.print(serde_json::to_string(&report).unwrap_or_default());
        } else {
            self.print(report.line());
        }
    }
}

/// `observer watch`: one line per closed connection until `shutdown` is cancelled.
pub async fn run(
    args: WatchArgs,
    common: CommonArgs,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let cgroup_root = crate::owner::cgroup::hierarchy(common.cgroupfs.as_deref())?;
    let (layout, attached) = kernel::attach(&common, kernel::privileges::check()?)?;
    let metrics = Arc::new(Metrics::new(0, CloseLabels::default()));
    let (lines, printed) = std::sync::mpsc::sync_channel(PRINT_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let sink = WatchSink {
        args: args.clone(),
        cgroups: CgroupNames::new(cgroup_root),
        lines,
        dropped: Arc::clone(&dropped),
    };
    log::info!("attached; printing connections as they close (Ctrl-C to stop)");
    if !args.json && !args.events {
        sink.print(ConnectionReport::header());
    }
    let tracker = Arc::new(Mutex::new(Tracker::new(common.max_sockets)));
    let pipeline = Pipeline::new(attached, Decoder::new(&layout), tracker, metrics, sink);
    // The pipeline (and with it the sink) is gone once it has stopped: the printer then
    // writes what is queued and ends.
    let stopped = pipeline.spawn(shutdown.clone())?;
    // The capture thread keeps what it needs; this one and the printer hold nothing.
    kernel::privileges::drop_all_on_this_thread();
    let printer = spawn_printer(printed, shutdown)
        .map_err(|source| Error::Io { context: "cannot start the printer thread", source })?;
    let result = stopped.await;
    let _ = printer.join();
    let dropped = dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        log::warn!("{dropped} lines were not printed: stdout did not keep up");
    }
    result
}
