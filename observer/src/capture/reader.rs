//! The ring-buffer reader: kernel records → decoder → tracker → verdicts.
//!
//! One thread of its own ([`Pipeline::spawn`]) feeds the tracker; `/connections` reads
//! it too, under its lock, between two drains, and keeps that short. The thread wakes
//! when a ring buffer has data, and when the oldest closed socket's evidence window ends
//! (batched, [`DUE_BATCH_NS`]); at every wake-up it drains the rings *before*
//! expiring windows, so an RST reserved just after F is always counted with its
//! connection.
//!
//! Each CPU has its own ring, and one socket's records may be made on different CPUs,
//! so the rings are merged by timestamp ([`super::merge`]). A record is handed on only once nothing that
//! happened before it can still be missing ([`Running::drain`]): one socket's transitions
//! follow each other under the socket's lock, so a record that precedes another of the
//! same socket was committed before the later one was even stamped (the programs read
//! the clock before they reserve). What a drain reads that is younger than that waits
//! in [`Running::held`] for the next one.

use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::{Arc, Mutex, PoisonError},
    task::Poll,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use observer_common::programs::WAKEUP_INTERVAL_NS;
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

use crate::{
    capture::decode::{Decoder, SocketEvent},
    capture::merge::merge,
    clock::monotonic_ns,
    error::Error,
    export::metrics::Metrics,
    kernel::loader::{Attached, KernelLogger, LostEvents},
    track::{ClosedConnection, Tracker},
};

/// Verdicts decided and handed on at a time (see [`Tracker::expire_at_most`]).
const SETTLE_BATCH: usize = 1024;
/// Records read from one ring per pass of a drain: a drain that goes on (producers keep
/// up with it: a mass close) hands records on and decides what is due between passes,
/// so neither read records nor closed sockets pile up until the rings are empty.
const PASS_RECORDS_PER_RING: usize = 1024;
/// How long a record stays held after a pass began before it is handed on, beyond what
/// the merge needs in principle ([`Running::drain`]): a ring is read up to its first record
/// still being written, and records of that CPU behind it (a softirq's, nested in that
/// program run) wait there while another CPU may already go on with their sockets.
/// A softirq runs 2 ms at most before it yields to ksoftirqd.
const HOLD_NS: u64 = 2_000_000;
/// During a drain that does not end, only windows that ended this long before every
/// event was handed on are decided: reading the rings comes first (deciding everything
/// due as soon as it was due lost about twice as many events in a mass close of 100 000
/// sockets, the decisions competing with the drain within the burst).
const DECIDE_DURING_DRAIN_LAG_NS: u64 = 100_000_000;
/// Longest sleep without anything to decide (refreshes the lost-event count).
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// How late the reader may wake for something due (held events to hand on, a socket to
/// decide): everything due within this much is done in one wake-up. At 1 000
/// connections/s, waking at each item's own moment woke the thread hundreds of times a
/// second and cost ~4 % of a core (docs/benchmarks.md, fixed-rate rows); verdicts come at
/// most this much later.
const DUE_BATCH_NS: u64 = 10_000_000;
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
        let state = Running {
            decoder,
            tracker,
            metrics,
            sink,
            decided: Vec::new(),
            lost_read_at: 0,
            held: Vec::new(),
            handed_on_until: 0,
        };
        Self { attached, state }
    }

    /// Runs the pipeline on a thread of its own, with a runtime of its own, until
    /// `shutdown` is cancelled: whatever else the process does (HTTP requests, TLS,
    /// basic auth, the inventory, writing `watch` output) runs elsewhere and cannot delay
    /// draining the rings. Resolves when the pipeline has stopped.
    pub fn spawn(
        self,
        shutdown: CancellationToken,
    ) -> Result<impl Future<Output = Result<(), Error>>, Error>
    where
        S: Send + 'static,
    {
        let (done, stopped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("observer-capture".into())
            .spawn(move || {
                let outcome = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| Error::Io {
                        context: "cannot start the capture runtime",
                        source,
                    })
                    .and_then(|runtime| runtime.block_on(self.run(shutdown)));
                let _ = done.send(outcome);
            })
            .map_err(|source| Error::Io { context: "cannot start the capture thread", source })?;
        Ok(async move {
            stopped.await.unwrap_or_else(|_| {
                Err(Error::Io {
                    context: "the capture thread stopped",
                    source: std::io::Error::other("it panicked"),
                })
            })
        })
    }

    /// Runs until `shutdown` is cancelled, then settles what is already closed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self { attached: Attached { rings, mut lost, logger, .. }, mut state } = self;
        let cannot_poll =
            |source: std::io::Error| Error::Io { context: "cannot poll the ring buffers", source };
        let mut rings = rings
            .into_iter()
            // SAFETY: each ring buffer owns its descriptor and lives inside its AsyncFd,
            // so the descriptor stays open for as long as it is registered.
            .map(|ring| {
                unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                    .map_err(|error| cannot_poll(error.into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
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
                woken = any_readable(&mut rings) => {
                    woken.map_err(cannot_poll)?;
                    follow_up = Some(monotonic_ns() + FOLLOW_UP_NS);
                }
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => break,
            }
            let now = monotonic_ns();
            let drained = state.drain(&mut rings, Hold::Recent);
            if follow_up.is_some_and(|at| now >= at) {
                // Records still coming without wake-ups: look again one interval later.
                follow_up = (drained > 0).then_some(now + FOLLOW_UP_NS);
            }
            state.settle(&mut rings, &mut lost, Hold::Recent);
        }
        state.drain(&mut rings, Hold::Nothing);
        state.settle(&mut rings, &mut lost, Hold::Nothing);
        Ok(())
    }
}

/// Waits until a ring buffer has been signalled, and clears the signal of every ring
/// that has: the drain that follows reads them all.
async fn any_readable(rings: &mut [AsyncFd<RingBuf<MapData>>]) -> std::io::Result<()> {
    poll_fn(|context| {
        let mut woken = false;
        for ring in rings.iter_mut() {
            match ring.poll_read_ready_mut(context) {
                Poll::Ready(Ok(mut guard)) => {
                    guard.clear_ready();
                    woken = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
        }
        if woken { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await
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

/// How much of what a drain reads it may keep for the next one.
#[derive(Clone, Copy)]
enum Hold {
    /// Records too recent to be handed on safely ([`HOLD_NS`]).
    Recent,
    /// Nothing: the rings will not be read again (shutdown).
    Nothing,
}

/// The pipeline's mutable state while running.
struct Running<S> {
    decoder: Decoder,
    tracker: Arc<Mutex<Tracker>>,
    metrics: Arc<Metrics>,
    sink: S,
    decided: Vec<ClosedConnection>,
    lost_read_at: u64,
    /// Per ring: events read and not handed on yet, in the ring's order.
    held: Vec<VecDeque<SocketEvent>>,
    /// Every event stamped up to this instant has been handed on to the tracker (but a
    /// nested hit's, which may wait behind its CPU's previous record: see the merge).
    handed_on_until: u64,
}

impl<S: Sink> Running<S> {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Until the next thing to do: hand on held events, or decide a socket (whose window
    /// is decided once the events of its end are handed on, [`HOLD_NS`] later).
    fn next_wake(&self) -> Duration {
        let due = [
            self.held.iter().filter_map(|ring| ring.front()).map(SocketEvent::timestamp_ns).min(),
            self.tracker().next_deadline_ns(),
        ];
        match due.into_iter().flatten().min() {
            Some(at) => Duration::from_nanos(
                (at + HOLD_NS + DUE_BATCH_NS).saturating_sub(monotonic_ns()).saturating_add(1),
            )
            .min(IDLE_WAKE),
            None => IDLE_WAKE,
        }
    }

    /// Reads the rings until they are empty and hands their events on in timestamp
    /// order, up to what `hold` keeps back; returns how many records were read.
    ///
    /// A pass reads each ring in turn. An event is handed on only if every event that
    /// can have happened before it has been read:
    /// * a ring read to its end held every record committed before the read; one not
    ///   committed then was stamped after the pass began (`started`);
    /// * a ring read only [`PASS_RECORDS_PER_RING`] records into holds unread ones that
    ///   were reserved after the last one read, and so stamped after the newest read.
    ///
    /// An event stamped before both is handed on: anything that happened before it, on
    /// its socket, was committed before it was stamped.
    fn drain(&mut self, rings: &mut [AsyncFd<RingBuf<MapData>>], hold: Hold) -> usize {
        let shared = Arc::clone(&self.tracker);
        let mut tracker = shared.lock().unwrap_or_else(PoisonError::into_inner);
        let mut held = std::mem::take(&mut self.held);
        held.resize_with(rings.len(), VecDeque::new);
        let mut records = 0;
        loop {
            let started = monotonic_ns();
            let mut until = match hold {
                Hold::Recent => started.saturating_sub(HOLD_NS),
                Hold::Nothing => u64::MAX,
            };
            let mut unread = false;
            for (ring, events) in rings.iter_mut().zip(held.iter_mut()) {
                let (read, newest_ns) = self.read_ring(ring.get_mut(), events);
                records += read;
                if read == PASS_RECORDS_PER_RING {
                    unread = true;
                    until = until.min(newest_ns);
                }
            }
            merge(&mut held, until, |event| self.ingest(&mut tracker, event));
            self.handed_on_until = self.handed_on_until.max(until);
            if !unread {
                break;
            }
            // Producers keep up with this drain: decide meanwhile what has long been due,
            // lest closed sockets pile up without bound, but leave the rest for later.
            let long_due = self.handed_on_until.saturating_sub(DECIDE_DURING_DRAIN_LAG_NS);
            while self.decide_batch(&mut tracker, long_due) {}
        }
        for events in &mut held {
            // Steady churn keeps its capacity (no allocation per drain); what a burst
            // grew beyond that is returned.
            if events.capacity() > 8 * PASS_RECORDS_PER_RING
                && events.len() <= PASS_RECORDS_PER_RING
            {
                events.shrink_to(2 * PASS_RECORDS_PER_RING);
            }
        }
        self.held = held;
        drop(tracker);
        self.sink.flush();
        records
    }

    /// Decodes up to [`PASS_RECORDS_PER_RING`] records of `ring` into `held`; returns how
    /// many it read and the newest timestamp among them.
    fn read_ring(
        &mut self,
        ring: &mut RingBuf<MapData>,
        held: &mut VecDeque<SocketEvent>,
    ) -> (usize, u64) {
        let (mut read, mut newest_ns) = (0, 0);
        while read < PASS_RECORDS_PER_RING {
            let Some(record) = ring.next() else { break };
            read += 1;
            let event = self.decoder.decode(&record);
            drop(record);
            match event {
                Ok(event) => {
                    newest_ns = newest_ns.max(event.timestamp_ns());
                    held.push_back(event);
                }
                Err(error) => {
                    log::warn!("dropping ring buffer record: {error}");
                    self.metrics.record_malformed();
                }
            }
        }
        (read, newest_ns)
    }

    fn ingest(&mut self, tracker: &mut Tracker, event: &SocketEvent) {
        self.sink.event(event);
        let effect = tracker.ingest(event, &mut self.decided);
        self.metrics.record(event, effect);
        self.publish();
    }

    /// Decides every socket whose evidence window ended by the time every event is
    /// handed on, a batch at a time, draining the rings between batches: a mass close has
    /// tens of thousands to decide, and the rings would fill meanwhile. (Records drained
    /// in between cannot change a window that ended by then: they were stamped later.)
    fn settle(
        &mut self,
        rings: &mut [AsyncFd<RingBuf<MapData>>],
        lost: &mut LostEvents,
        hold: Hold,
    ) {
        let shared = Arc::clone(&self.tracker);
        let until_ns = self.handed_on_until;
        loop {
            let mut tracker = shared.lock().unwrap_or_else(PoisonError::into_inner);
            let more = self.decide_batch(&mut tracker, until_ns);
            drop(tracker);
            if !more {
                break;
            }
            self.drain(rings, hold);
        }
        let now_ns = match hold {
            Hold::Recent => monotonic_ns(),
            Hold::Nothing => u64::MAX,
        };
        let tracker = shared.lock().unwrap_or_else(PoisonError::into_inner);
        let (stats, tracked) = (tracker.stats(), tracker.len());
        drop(tracker);
        self.publish();
        if now_ns.saturating_sub(self.lost_read_at) >= LOST_REFRESH_NS {
            self.lost_read_at = now_ns;
            let (ring_full, skipped) = lost.by_cause();
            if ring_full + skipped > self.metrics.lost_in_kernel() {
                let (primaries, standbys) = lost.skipped_runs();
                log::warn!(
                    "events lost so far: {ring_full} with the ring buffer full, {skipped} \
                     skipped by the kernel as nested runs on one CPU (runs skipped: \
                     {primaries} of primary programs, {standbys} of their standby twins)"
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
