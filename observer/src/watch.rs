//! `observer watch`: one line (or JSON object) per connection as it closes.

use std::{
    io::Write as _,
    sync::{Arc, Mutex},
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

/// Prints verdicts (or raw events) to stdout.
struct WatchSink {
    args: WatchArgs,
    cgroups: CgroupNames,
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

    fn closed(&mut self, connection: ClosedConnection) {
        if self.args.events
            || (!self.args.ports.is_empty() && !self.args.ports.contains(&connection.port))
        {
            return;
        }
        let report = ConnectionReport::new(&connection, &Clock::now(), &mut self.cgroups);
        report::log_unknown(&report);
        if self.args.json {
            self.print(&serde_json::to_string(&report).unwrap_or_default());
        } else {
            self.print(&report.line());
        }
    }
}

/// `observer watch`: one line per closed connection until `shutdown` is cancelled.
pub async fn run(
    args: WatchArgs,
    common: CommonArgs,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (layout, attached) = kernel::attach(&common, kernel::privileges::check()?)?;
    let metrics = Arc::new(Metrics::new(0, CloseLabels::default()));
    let sink =
        WatchSink { args: args.clone(), cgroups: CgroupNames::new(), stop: shutdown.clone() };
    log::info!("attached; printing connections as they close (Ctrl-C to stop)");
    if !args.json && !args.events {
        sink.print(&ConnectionReport::header());
    }
    let tracker = Arc::new(Mutex::new(Tracker::new(common.max_sockets)));
    Pipeline::new(attached, Decoder::new(&layout), tracker, metrics, sink).run(shutdown).await
}
