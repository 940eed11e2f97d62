//! The ring-buffer reader: kernel records → decoder → tracker → verdicts.
//!
//! One task owns the tracker, so nothing here is locked. It wakes when the ring buffer
//! has data, and when the oldest closed socket's evidence window ends; at every wake-up
//! it drains the ring *before* expiring windows, so an RST reserved just after F is
//! always counted with its connection.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use observer_common::WAKEUP_INTERVAL_NS;
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

use crate::{
    error::Error,
    event::{Decoder, SocketEvent},
    loader::{Attached, KernelLogger, LostEvents},
    metrics::Metrics,
    report::monotonic_ns,
    tracker::{ClosedConnection, Effect, Tracker},
};

/// Verdicts decided and handed on at a time (see [`Tracker::expire_at_most`]).
const SETTLE_BATCH: usize = 1024;
/// A drain that goes on this many records (producers keep up with it: a mass close)
/// also decides what is due, so closed sockets do not pile up until the ring is empty.
const SETTLE_DURING_DRAIN_EVERY: usize = 4096;
/// How long after its reservation in the ring a record's timestamp may be taken, at
/// most: the programs read the clock microseconds after reserving, and this leaves room
/// for interrupts in between. Mid-drain, every record reserved before the newest
/// timestamp seen minus this is known to be drained (the ring is in reservation order).
const RESERVED_BEFORE_TIMESTAMP_NS: u64 = 100_000_000;
/// Longest sleep without anything to decide (refreshes the lost-event count).
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// How often the lost-event count is read from the kernel under load.
const LOST_REFRESH_NS: u64 = 100_000_000;
/// The eBPF side wakes us at most once per [`WAKEUP_INTERVAL_NS`] per CPU; what it
/// records in between is collected by a drain this long after each wake-up (the
/// margin covers records reserved at the end of the interval and not yet committed).
const FOLLOW_UP_NS: u64 = WAKEUP_INTERVAL_NS + 1_000_000;

/// Where events and verdicts go besides the metrics.
pub trait Sink {
    /// Every decoded event (`observer watch --events`).
    fn event(&mut self, _event: &SocketEvent) {}
    /// Every connection verdict.
    fn closed(&mut self, connection: ClosedConnection);
    /// The ring buffer was drained: events seen so far precede any verdict to come.
    fn flush(&mut self) {}
}

pub struct Pipeline<S> {
    attached: Attached,
    state: Running<S>,
}

impl<S: Sink> Pipeline<S> {
    /// `tracker` is shared so `/connections` can list open sockets; the pipeline locks
    /// it once per batch of records.
    pub fn new(
        attached: Attached,
        decoder: Decoder,
        tracker: Arc<Mutex<Tracker>>,
        metrics: Arc<Metrics>,
        sink: S,
    ) -> Self {
        let state =
            Running { decoder, tracker, metrics, sink, decided: Vec::new(), lost_read_at: 0 };
        Self { attached, state }
    }

    /// Runs until `shutdown` is cancelled, then settles what is already closed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self { attached: Attached { events, mut lost, logger }, mut state } = self;
        // SAFETY: the ring buffer owns its descriptor and lives inside the AsyncFd, so the
        // descriptor stays open for as long as it is registered.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }.map_err(
                |error| Error::Io { context: "cannot poll the ring buffer", source: error.into() },
            )?;
        let mut logger = match logger {
            // SAFETY: as above, the logger owns its ring buffer descriptor.
            Some(logger) => unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
                .map_err(|error| {
                    log::warn!("cannot poll the eBPF log: {}", std::io::Error::from(error))
                })
                .ok(),
            None => None,
        };
        // When the drain that collects un-signalled records is due (see FOLLOW_UP_NS).
        let mut follow_up: Option<u64> = None;
        loop {
            let wait = match follow_up {
                Some(at) => {
                    state.next_wake().min(Duration::from_nanos(at.saturating_sub(monotonic_ns())))
                }
                None => state.next_wake(),
            };
            tokio::select! {
                guard = readable(&mut logger), if logger.is_some() => {
                    if let Ok(mut guard) = guard {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(|source| Error::Io {
                        context: "cannot poll the ring buffer",
                        source,
                    })?;
                    state.drain(guard.get_inner_mut());
                    guard.clear_ready();
                    follow_up = Some(monotonic_ns() + FOLLOW_UP_NS);
                }
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => break,
            }
            // Read the clock first: every record reserved before `now` is drained below,
            // so windows that ended by `now` have all their evidence.
            let now = monotonic_ns();
            let drained = state.drain(ring.get_mut());
            if follow_up.is_some_and(|at| now >= at) {
                // Records still coming without wake-ups: look again one interval later.
                follow_up = (drained > 0).then_some(now + FOLLOW_UP_NS);
            }
            state.settle(ring.get_mut(), &mut lost, now);
        }
        state.drain(ring.get_mut());
        state.settle(ring.get_mut(), &mut lost, u64::MAX);
        Ok(())
    }
}

/// Waits for the eBPF log to have messages (never resolves without a logger).
async fn readable(
    logger: &mut Option<AsyncFd<KernelLogger>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, KernelLogger>> {
    match logger {
        Some(logger) => logger.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// The pipeline's mutable state while running.
struct Running<S> {
    decoder: Decoder,
    tracker: Arc<Mutex<Tracker>>,
    metrics: Arc<Metrics>,
    sink: S,
    decided: Vec<ClosedConnection>,
    lost_read_at: u64,
}

impl<S: Sink> Running<S> {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_wake(&self) -> Duration {
        match self.tracker().next_deadline_ns() {
            Some(deadline) => {
                Duration::from_nanos(deadline.saturating_sub(monotonic_ns())).min(IDLE_WAKE)
            }
            None => IDLE_WAKE,
        }
    }

    /// Processes every record in the ring; returns how many there were.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let shared = Arc::clone(&self.tracker);
        let mut tracker = shared.lock().unwrap_or_else(PoisonError::into_inner);
        let mut records = 0;
        let mut newest_ns = 0;
        while let Some(record) = ring.next() {
            records += 1;
            let event = self.decoder.decode(&record);
            drop(record);
            match event {
                Ok(event) => {
                    newest_ns = newest_ns.max(event.timestamp_ns());
                    self.ingest(&mut tracker, &event);
                }
                Err(error) => {
                    log::warn!("dropping ring buffer record: {error}");
                    self.metrics.record_malformed();
                }
            }
            if records % SETTLE_DURING_DRAIN_EVERY == 0 {
                // Windows that ended before the ring's drained part have their evidence.
                let drained_until = newest_ns.saturating_sub(RESERVED_BEFORE_TIMESTAMP_NS);
                while self.decide_batch(&mut tracker, drained_until) {}
            }
        }
        drop(tracker);
        self.sink.flush();
        records
    }

    fn ingest(&mut self, tracker: &mut Tracker, event: &SocketEvent) {
        self.metrics.record_event();
        self.sink.event(event);
        if let SocketEvent::Reset(reset) = event {
            self.metrics.record_reset(reset);
        }
        if let Effect::Transition { from, to } = tracker.ingest(event, &mut self.decided) {
            self.metrics.record_transition(from, to);
        }
        self.publish();
    }

    /// Decides every socket whose evidence window ended by `now_ns`, a batch at a time,
    /// draining the ring between batches: a mass close has tens of thousands to decide,
    /// and the ring would fill meanwhile. (Records drained in between cannot change a
    /// window that ended by `now_ns`: every record reserved before then is already in.)
    fn settle(&mut self, ring: &mut RingBuf<MapData>, lost: &mut LostEvents, now_ns: u64) {
        let shared = Arc::clone(&self.tracker);
        loop {
            let mut tracker = shared.lock().unwrap_or_else(PoisonError::into_inner);
            let more = self.decide_batch(&mut tracker, now_ns);
            drop(tracker);
            if !more {
                break;
            }
            self.drain(ring);
        }
        let tracker = shared.lock().unwrap_or_else(PoisonError::into_inner);
        let (stats, tracked) = (tracker.stats(), tracker.len());
        drop(tracker);
        self.publish();
        if now_ns.saturating_sub(self.lost_read_at) >= LOST_REFRESH_NS {
            self.lost_read_at = now_ns;
            let (ring_full, skipped) = lost.by_cause();
            if ring_full + skipped > self.metrics.lost_in_kernel() {
                log::warn!(
                    "events lost so far: {ring_full} with the ring buffer full, {skipped} \
                     skipped by the kernel as nested runs on one CPU"
                );
            }
            self.metrics.set_lost(ring_full, skipped);
            self.metrics.set_tracker(stats, tracked);
        }
    }

    /// Decides up to [`SETTLE_BATCH`] sockets whose window ended by `until_ns` and hands
    /// their verdicts on; returns whether more are due.
    fn decide_batch(&mut self, tracker: &mut Tracker, until_ns: u64) -> bool {
        let more = tracker.expire_at_most(until_ns, &mut self.decided, SETTLE_BATCH);
        self.publish();
        more
    }

    fn publish(&mut self) {
        for closed in self.decided.drain(..) {
            self.metrics.record_close(&closed);
            self.sink.closed(closed);
        }
    }
}
