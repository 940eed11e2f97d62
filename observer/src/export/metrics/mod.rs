//! Every exported metric, declared here and nowhere else, in a registry of its own.
//!
//! Names follow the Prometheus conventions (one `observer_` prefix, base units, `_total`
//! counters, one `_info`); the set and labels of the core ones are part of the product
//! contract (README "Metrics"). Labels are low-cardinality: the only per-connection
//! label is the *service* port, capped by `--metrics.max-ports` ([`labels`]: no label
//! whose values come from the host can be squatted).

mod labels;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Mutex, OnceLock, PoisonError},
};

use prometheus::{
    Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
    core::Collector,
    proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    capture::decode::{Reset, ResetDirection, SocketEvent},
    classify::{Cause, Class, Role},
    inventory::Summary,
    tcp::TcpState,
    track::{ClosedConnection, Effect, TrackerStats},
};

use self::labels::{CappedLabel, OTHER, PortLabels};

/// `reason` values of `observer_events_lost_total`.
pub const LOST_RING_FULL: &str = "ring_full";
pub const LOST_NESTED: &str = "nested";
pub const LOST_MALFORMED: &str = "malformed";

/// Label value for ports (and other capped labels) beyond their cap.
pub const OTHER_PORT: &str = OTHER;

/// Upper bounds of the CLOSE_WAIT age buckets: a second to a day.
const CLOSE_WAIT_AGE_BUCKETS: [f64; 8] = [1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];

const CLOSE_WAIT_AGE: &str = "observer_tcp_close_wait_age_seconds";

/// Optional labels of `observer_tcp_closes_total` (off by default: each multiplies the
/// number of series).
#[derive(Clone, Copy, Debug)]
pub struct CloseLabels {
    pub netns: bool,
    pub comm: bool,
    /// Distinct values of each (and of the inventory's `netns`) before further ones
    /// become "other".
    pub max_values: usize,
}

impl Default for CloseLabels {
    /// Both off; `--metrics.max-label-values`' default.
    fn default() -> Self {
        Self { netns: false, comm: false, max_values: 64 }
    }
}

/// The labels of a `observer_tcp_closes_total` child without the optional ones (the
/// class follows from the cause; a port of `None` is "other").
type CloseKey = (Cause, Role, Option<u16>);

/// For the per-verdict lookups below (std's SipHash showed in profiles); seeded per
/// daemon, and their keys are bounded label values.
type FastHash = foldhash::fast::RandomState;

pub struct Metrics {
    registry: Registry,
    /// `observer_capture_info`: how this kernel's events are captured.
    capture_info: IntGaugeVec,
    closes: IntCounterVec,
    close_labels: CloseLabels,
    /// Children of `closes` already looked up (without the optional labels): the label
    /// lookup hashes and allocates, and a verdict storm makes hundreds of thousands a
    /// second. Bounded by causes × roles × (`--metrics.max-ports` + 1).
    close_counters: Mutex<HashMap<CloseKey, IntCounter, FastHash>>,
    transitions: IntCounterVec,
    /// Children of `transitions`, created on first use (so only transitions that happen
    /// are exported), then reused for every event.
    transition_counters: [[OnceLock<IntCounter>; TcpState::COUNT]; TcpState::COUNT],
    sockets: IntGaugeVec,
    oldest: GaugeVec,
    namespaces: IntGauge,
    namespace_errors: IntGauge,
    close_wait_ages: Mutex<Option<MetricFamily>>,
    duration_by_class: [prometheus::Histogram; Class::ALL.len()],
    resets: IntCounterVec,
    /// Children of `resets` already looked up, by direction and reason label.
    reset_counters: Mutex<HashMap<(ResetDirection, &'static str), IntCounter, FastHash>>,
    events: IntCounter,
    lost: IntCounterVec,
    malformed: IntCounter,
    recent_evicted: IntCounter,
    dropped_sockets: IntCounterVec,
    tracked: IntGauge,
    ports: Mutex<PortLabels>,
    netns_values: Mutex<CappedLabel<u32>>,
    comm_values: Mutex<CappedLabel<String>>,
    /// The cap of the inventory's `netns` label, and the namespaces labelled at the
    /// previous inventory (kept first, so that series stay put).
    max_inventory_namespaces: usize,
    inventory_namespaces: Mutex<HashSet<u32>>,
    refused_namespaces: IntCounter,
}

/// Brings a counter up to a running total kept elsewhere (it never goes down).
fn advance(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

/// Registers `metric` in `registry` and returns it. Names and help texts are constants
/// of this module, so a failure is a bug here, not a runtime condition.
fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help))
}

impl Metrics {
    pub fn new(max_ports: usize, close_labels: CloseLabels) -> Self {
        let registry = Registry::new();
        let mut labels = vec!["class", "cause", "role", "port"];
        if close_labels.netns {
            labels.push("netns");
        }
        if close_labels.comm {
            labels.push("comm");
        }
        let closes = counter_vec(
            &registry,
            "observer_tcp_closes_total",
            "TCP connections that ended, by how (class) and why (cause) they ended.",
            &labels,
        );
        let transitions = counter_vec(
            &registry,
            "observer_tcp_transitions_total",
            "TCP state transitions seen at the inet_sock_set_state tracepoint.",
            &["from", "to"],
        );
        let sockets = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "observer_tcp_sockets",
                    "TCP sockets by network namespace and state, as `ss -tan` lists them \
                     (socket-diag), TIME_WAIT included.",
                ),
                &["netns", "state"],
            ),
        );
        let oldest = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "observer_tcp_socket_oldest_age_seconds",
                    "Time the oldest socket of each namespace and state has been in that state \
                     (since the daemon first saw it there, for sockets older than the daemon; \
                     for TIME_WAIT, from the kernel's timewait timer).",
                ),
                &["netns", "state"],
            ),
        );
        let namespaces = gauge(
            &registry,
            "observer_inventory_namespaces",
            "Network namespaces whose sockets the last inventory listed.",
        );
        let namespace_errors = gauge(
            &registry,
            "observer_inventory_namespace_errors",
            "Network namespaces the last inventory could not enter or list (privileges).",
        );
        let duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "observer_tcp_connection_duration_seconds",
                    "Time from a connection's open to its final transition, by class of ending.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 4.0, 12).expect("valid buckets")),
                &["class"],
            ),
        );
        let resets = counter_vec(
            &registry,
            "observer_tcp_resets_total",
            "TCP resets sent or received by sockets, by the kernel's reason where it has one.",
            &["direction", "reason"],
        );
        let events = counter(
            &registry,
            "observer_events_total",
            "Events received from the kernel through the ring buffer.",
        );
        let lost = counter_vec(
            &registry,
            "observer_events_lost_total",
            "Events lost before the tracker: ring buffer full, nested run the kernel \
             skipped, or record that could not be decoded.",
            &["reason"],
        );
        let recent_evicted = counter(
            &registry,
            "observer_connections_evicted_total",
            "Verdicts pushed out of the /connections buffer (--connections.max-recent) \
             by newer ones; they are still counted in observer_tcp_closes_total.",
        );
        let malformed = counter(
            &registry,
            "observer_events_malformed_total",
            "Ring buffer records that could not be decoded.",
        );
        let dropped_sockets = counter_vec(
            &registry,
            "observer_tracker_dropped_sockets_total",
            "Sockets dropped without a verdict (table full, or final event lost).",
            &["reason"],
        );
        let refused = counter_vec(
            &registry,
            "observer_label_values_refused_total",
            "Label values exported as \"other\" because their label's cap was reached \
             (--metrics.max-ports, --metrics.max-label-values), by label.",
            &["label"],
        );
        for label in ["port", "netns", "comm"] {
            refused.with_label_values(&[label]);
        }
        let tracked = gauge(
            &registry,
            "observer_tracker_sockets",
            "Sockets in the tracking table, including closed ones awaiting a verdict.",
        );
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("observer_build_info", "Build information; the value is always 1."),
                &["version"],
            ),
        );
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let capture_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "observer_capture_info",
                    "How this kernel's events are captured; the value is always 1. \
                     accept_owner: where the owner of an accepted socket comes from \
                     (inet_accept: a trampoline on inet_accept(); accept_syscalls: the \
                     accept() system-call tracepoints; listener: its listener's owner).",
                ),
                &["accept_owner"],
            ),
        );
        let process = prometheus::process_collector::ProcessCollector::for_self();
        registry.register(Box::new(process)).expect("unique metric");

        for reason in ["capacity", "replaced"] {
            dropped_sockets.with_label_values(&[reason]);
        }
        for reason in [LOST_RING_FULL, LOST_NESTED, LOST_MALFORMED] {
            lost.with_label_values(&[reason]);
        }
        let duration_by_class = Class::ALL.map(|class| duration.with_label_values(&[class.name()]));

        Self {
            registry,
            capture_info,
            closes,
            close_labels,
            close_counters: Mutex::new(HashMap::default()),
            transitions,
            transition_counters: Default::default(),
            sockets,
            oldest,
            namespaces,
            namespace_errors,
            close_wait_ages: Mutex::new(None),
            duration_by_class,
            resets,
            reset_counters: Mutex::new(HashMap::default()),
            events,
            lost,
            malformed,
            recent_evicted,
            dropped_sockets,
            tracked,
            ports: Mutex::new(PortLabels::new(max_ports, refused.with_label_values(&["port"]))),
            netns_values: Mutex::new(CappedLabel::new(
                close_labels.max_values,
                refused.with_label_values(&["netns"]),
            )),
            comm_values: Mutex::new(CappedLabel::new(
                close_labels.max_values,
                refused.with_label_values(&["comm"]),
            )),
            max_inventory_namespaces: close_labels.max_values,
            inventory_namespaces: Mutex::new(HashSet::new()),
            refused_namespaces: refused.with_label_values(&["netns"]),
        }
    }

    fn port_label(&self, port: u16) -> String {
        self.ports.lock().unwrap_or_else(PoisonError::into_inner).label(port)
    }

    /// The port's label value: `Some(port)`, or `None` for "other" past the cap.
    fn capped_port(&self, port: u16) -> Option<u16> {
        self.ports.lock().unwrap_or_else(PoisonError::into_inner).admit(port).then_some(port)
    }

    pub fn record_close(&self, closed: &ClosedConnection) {
        let class = closed.verdict.class();
        if let Some(duration) = closed.duration_ns {
            self.duration_by_class[class as usize].observe(duration as f64 / 1e9);
        }
        let port = self.capped_port(closed.port);
        if !self.close_labels.netns && !self.close_labels.comm {
            let key = (closed.verdict.cause, closed.role, port);
            let mut counters = self.close_counters.lock().unwrap_or_else(PoisonError::into_inner);
            counters
                .entry(key)
                .or_insert_with(|| {
                    let port = port.map_or_else(|| OTHER_PORT.to_string(), |p| p.to_string());
                    let cause = closed.verdict.cause.name();
                    self.closes.with_label_values(&[class.name(), cause, closed.role.name(), &port])
                })
                .inc();
            return;
        }
        let mut values = vec![
            class.name().to_string(),
            closed.verdict.cause.name().into(),
            closed.role.name().into(),
            port.map_or_else(|| OTHER_PORT.to_string(), |p| p.to_string()),
        ];
        if self.close_labels.netns {
            let mut netns = self.netns_values.lock().unwrap_or_else(PoisonError::into_inner);
            values.push(netns.label(&closed.netns));
        }
        if self.close_labels.comm {
            let comm = closed.owner.map_or_else(|| "unknown".into(), |o| o.comm.to_string());
            values
                .push(self.comm_values.lock().unwrap_or_else(PoisonError::into_inner).label(&comm));
        }
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        self.closes.with_label_values(&values).inc();
    }

    /// Counts an event the reader handed to the tracker, and what the tracker made of
    /// it (`effect`).
    pub fn record(&self, event: &SocketEvent, effect: Effect) {
        self.record_event();
        match event {
            SocketEvent::Reset(reset) => self.record_reset(reset),
            SocketEvent::State(change) if change.new == TcpState::Listen => {
                self.ports
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .learn_listening(change.local.port());
            }
            _ => {}
        }
        if let Effect::Transition { from, to } = effect {
            self.record_transition(from, to);
        }
    }

    fn record_transition(&self, from: TcpState, to: TcpState) {
        self.transition_counters[from as usize][to as usize]
            .get_or_init(|| self.transitions.with_label_values(&[from.name(), to.name()]))
            .inc();
    }

    fn record_reset(&self, reset: &Reset) {
        let reason = match (reset.reason, reset.direction) {
            (Some(reason), _) => reason.name(),
            (None, ResetDirection::Sent) => "unknown",
            (None, ResetDirection::Received) => "not_reported",
        };
        let mut counters = self.reset_counters.lock().unwrap_or_else(PoisonError::into_inner);
        counters
            .entry((reset.direction, reason))
            .or_insert_with(|| self.resets.with_label_values(&[reset.direction.name(), reason]))
            .inc();
    }

    fn record_event(&self) {
        self.events.inc();
    }

    /// Says how the owners of accepted sockets are captured (`observer_capture_info`).
    pub fn set_accept_owner(&self, source: &str) {
        self.capture_info.with_label_values(&[source]).set(1);
    }

    /// A record that could not be decoded: malformed, and lost to the tracker.
    pub fn record_malformed(&self) {
        self.malformed.inc();
        self.lost.with_label_values(&[LOST_MALFORMED]).inc();
    }

    /// Brings the kernel-side lost counters up to the kernel's running totals.
    pub fn set_lost(&self, ring_full: u64, nested: u64) {
        advance(&self.lost.with_label_values(&[LOST_RING_FULL]), ring_full);
        advance(&self.lost.with_label_values(&[LOST_NESTED]), nested);
    }

    /// Events lost in the kernel so far (ring buffer full and nested runs).
    pub fn lost_in_kernel(&self) -> u64 {
        self.lost.with_label_values(&[LOST_RING_FULL]).get()
            + self.lost.with_label_values(&[LOST_NESTED]).get()
    }

    /// A verdict left the /connections buffer to make room for a newer one.
    pub fn record_recent_evicted(&self) {
        self.recent_evicted.inc();
    }

    pub fn set_tracker(&self, stats: TrackerStats, tracked: usize) {
        advance(&self.dropped_sockets.with_label_values(&["capacity"]), stats.evicted);
        advance(&self.dropped_sockets.with_label_values(&["replaced"]), stats.replaced);
        self.tracked.set(tracked as i64);
    }

    /// Socket counts, oldest ages and CLOSE_WAIT ages from a socket inventory. Series of
    /// namespaces and states that no longer exist disappear.
    pub fn set_inventory(&self, summary: &Summary) {
        self.sockets.reset();
        self.oldest.reset();
        self.namespaces.set(summary.namespaces.len() as i64);
        self.namespace_errors.set(summary.failures as i64);
        self.ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_listening(summary.namespaces.iter().flat_map(|n| n.listening.iter().copied()));
        let labelled = self.labelled_namespaces(summary);
        // state → (sockets, oldest) of the namespaces past the cap, as "other".
        let mut other: BTreeMap<TcpState, (u64, f64)> = BTreeMap::new();
        let mut close_wait_ages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for namespace in &summary.namespaces {
            if labelled.contains(&namespace.netns) {
                let netns = namespace.netns.to_string();
                for (state, (count, oldest)) in &namespace.states {
                    self.sockets.with_label_values(&[&netns, state.name()]).set(*count as i64);
                    self.oldest.with_label_values(&[&netns, state.name()]).set(*oldest);
                }
            } else {
                for (state, (count, oldest)) in &namespace.states {
                    let entry = other.entry(*state).or_default();
                    entry.0 += count;
                    entry.1 = entry.1.max(*oldest);
                }
            }
            for (port, age) in &namespace.close_wait_ages {
                close_wait_ages.entry(self.port_label(*port)).or_default().push(*age);
            }
        }
        for (state, (count, oldest)) in other {
            self.sockets.with_label_values(&[OTHER, state.name()]).set(count as i64);
            self.oldest.with_label_values(&[OTHER, state.name()]).set(oldest);
        }
        *self.close_wait_ages.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(close_wait_histogram(&close_wait_ages));
    }

    /// The namespaces of an inventory that get a `netns` value of their own: those
    /// labelled last time first, then new ones by inode, up to the cap; the others are
    /// counted as refused.
    fn labelled_namespaces(&self, summary: &Summary) -> HashSet<u32> {
        let mut previous = self.inventory_namespaces.lock().unwrap_or_else(PoisonError::into_inner);
        let mut present: Vec<u32> = summary.namespaces.iter().map(|n| n.netns).collect();
        present.sort_unstable_by_key(|netns| (!previous.contains(netns), *netns));
        let kept: HashSet<u32> =
            present.iter().copied().take(self.max_inventory_namespaces).collect();
        self.refused_namespaces.inc_by(present.len().saturating_sub(kept.len()) as u64);
        previous.clone_from(&kept);
        kept
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        if let Some(ages) = &*self.close_wait_ages.lock().unwrap_or_else(PoisonError::into_inner)
            && !ages.get_metric().is_empty()
        {
            families.push(ages.clone());
            families.sort_by(|a, b| a.name().cmp(b.name()));
        }
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buffer)
            .expect("text encoding to memory cannot fail");
        String::from_utf8(buffer).expect("exposition is UTF-8")
    }
}

/// The ages of the CLOSE_WAIT sockets that exist *now*, per service port.
///
/// A snapshot distribution (an OpenMetrics gauge histogram), written as a histogram in
/// the text format as the official Python client does: buckets can go down between
/// scrapes, so query it directly (`histogram_quantile(0.5, ..._bucket)`, or a bucket
/// count: "CLOSE_WAIT sockets older than an hour on port 8080"), never with `rate()`.
fn close_wait_histogram(ages_by_port: &BTreeMap<String, Vec<f64>>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(CLOSE_WAIT_AGE.into());
    family.set_help(
        "Ages of the CLOSE_WAIT sockets that exist now, per service port (a snapshot: \
         buckets go down as sockets close; do not rate() it)."
            .into(),
    );
    family.set_field_type(MetricType::HISTOGRAM);
    let metrics = ages_by_port
        .iter()
        .map(|(port, ages)| {
            let mut histogram = Histogram::default();
            histogram.set_sample_count(ages.len() as u64);
            histogram.set_sample_sum(ages.iter().sum());
            histogram.set_bucket(
                CLOSE_WAIT_AGE_BUCKETS
                    .iter()
                    .map(|&bound| {
                        let mut bucket = Bucket::default();
                        bucket.set_upper_bound(bound);
                        bucket.set_cumulative_count(
                            ages.iter().filter(|&&age| age <= bound).count() as u64,
                        );
                        bucket
                    })
                    .collect(),
            );
            let mut label = LabelPair::default();
            label.set_name("port".into());
            label.set_value(port.clone());
            let mut metric = Metric::default();
            metric.set_label(vec![label]);
            metric.set_histogram(histogram);
            metric
        })
        .collect();
    family.set_metric(metrics);
    family
}

#[cfg(test)]
mod tests;
