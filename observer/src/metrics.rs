//! Every exported metric, declared here and nowhere else, in a registry of its own.
//!
//! Names follow the Prometheus conventions (one `observer_` prefix, base units, `_total`
//! counters, one `_info`); the set and labels of the core ones are part of the product
//! contract (README "Metrics"). Labels are low-cardinality: the only per-connection
//! label is the *service* port, capped by `--metrics.max-ports`.

use std::{
    collections::HashSet,
    sync::{Mutex, PoisonError},
};

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::{
    classify::Class,
    event::{Reset, ResetDirection},
    tcp::TcpState,
    tracker::{ClosedConnection, TrackerStats},
};

/// States a live socket can be in at the tracepoint (TIME_WAIT and NEW_SYN_RECV belong
/// to mini-sockets it never shows).
const LIVE_STATES: [TcpState; 9] = [
    TcpState::Established,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Listen,
    TcpState::Closing,
];

/// `reason` values of `observer_events_lost_total`.
pub const LOST_RING_FULL: &str = "ring_full";
pub const LOST_NESTED: &str = "nested";
pub const LOST_MALFORMED: &str = "malformed";

/// Label value for ports beyond `--metrics.max-ports`.
pub const OTHER_PORT: &str = "other";

pub struct Metrics {
    registry: Registry,
    closes: IntCounterVec,
    transitions: IntCounterVec,
    sockets: IntGaugeVec,
    duration: HistogramVec,
    resets: IntCounterVec,
    events: IntCounter,
    lost: IntCounterVec,
    malformed: IntCounter,
    recent_evicted: IntCounter,
    dropped_sockets: IntCounterVec,
    tracked: IntGauge,
    ports: Mutex<PortLabels>,
}

/// The first `max` distinct service ports get their own label value.
struct PortLabels {
    max: usize,
    seen: HashSet<u16>,
}

impl PortLabels {
    fn label(&mut self, port: u16) -> String {
        if self.seen.contains(&port) || (self.seen.len() < self.max && self.seen.insert(port)) {
            port.to_string()
        } else {
            OTHER_PORT.to_string()
        }
    }
}

/// Brings a counter up to a running total kept elsewhere (it never goes down).
fn advance(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

impl Metrics {
    pub fn new(max_ports: usize) -> Self {
        let registry = Registry::new();
        let closes = counter_vec(
            &registry,
            "observer_tcp_closes_total",
            "TCP connections that ended, by how (class) and why (cause) they ended.",
            &["class", "cause", "role", "port"],
        );
        let transitions = counter_vec(
            &registry,
            "observer_tcp_transitions_total",
            "TCP state transitions seen at the inet_sock_set_state tracepoint.",
            &["from", "to"],
        );
        let sockets = IntGaugeVec::new(
            Opts::new("observer_tcp_sockets", "Live TCP sockets tracked, by current state."),
            &["state"],
        )
        .expect("valid metric");
        registry.register(Box::new(sockets.clone())).expect("unique metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "observer_tcp_connection_duration_seconds",
                "Time from a connection's open to its final transition, by class of ending.",
            )
            .buckets(prometheus::exponential_buckets(0.001, 4.0, 12).expect("valid buckets")),
            &["class"],
        )
        .expect("valid metric");
        registry.register(Box::new(duration.clone())).expect("unique metric");
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
        let tracked = IntGauge::new(
            "observer_tracker_sockets",
            "Sockets in the tracking table, including closed ones awaiting a verdict.",
        )
        .expect("valid metric");
        registry.register(Box::new(tracked.clone())).expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new("observer_build_info", "Build information; the value is always 1."),
            &["version"],
        )
        .expect("valid metric");
        registry.register(Box::new(build_info.clone())).expect("unique metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("unique metric");

        for state in LIVE_STATES {
            sockets.with_label_values(&[state.name()]).set(0);
        }
        for reason in ["capacity", "replaced"] {
            dropped_sockets.with_label_values(&[reason]);
        }
        for reason in [LOST_RING_FULL, LOST_NESTED, LOST_MALFORMED] {
            lost.with_label_values(&[reason]);
        }
        for class in Class::ALL {
            duration.with_label_values(&[class.name()]);
        }

        Self {
            registry,
            closes,
            transitions,
            sockets,
            duration,
            resets,
            events,
            lost,
            malformed,
            recent_evicted,
            dropped_sockets,
            tracked,
            ports: Mutex::new(PortLabels { max: max_ports, seen: HashSet::new() }),
        }
    }

    pub fn record_close(&self, closed: &ClosedConnection) {
        let port = self.ports.lock().unwrap_or_else(PoisonError::into_inner).label(closed.port);
        let class = closed.verdict.class().name();
        self.closes
            .with_label_values(&[class, closed.verdict.cause.name(), closed.role.name(), &port])
            .inc();
        if let Some(duration) = closed.duration_ns {
            self.duration.with_label_values(&[class]).observe(duration as f64 / 1e9);
        }
    }

    pub fn record_transition(&self, from: TcpState, to: TcpState) {
        self.transitions.with_label_values(&[from.name(), to.name()]).inc();
    }

    pub fn record_reset(&self, reset: &Reset) {
        let reason = match (reset.reason, reset.direction) {
            (Some(reason), _) => reason.name(),
            (None, ResetDirection::Sent) => "unknown",
            (None, ResetDirection::Received) => "not_reported",
        };
        self.resets.with_label_values(&[reset.direction.name(), reason]).inc();
    }

    pub fn record_event(&self) {
        self.events.inc();
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

    pub fn set_tracker(
        &self,
        stats: TrackerStats,
        tracked: usize,
        by_state: impl Iterator<Item = (TcpState, i64)>,
    ) {
        advance(&self.dropped_sockets.with_label_values(&["capacity"]), stats.evicted);
        advance(&self.dropped_sockets.with_label_values(&["replaced"]), stats.replaced);
        self.tracked.set(tracked as i64);
        for (state, count) in by_state {
            // Closed sockets are not live; other states only appear if ever used.
            if LIVE_STATES.contains(&state) || count != 0 {
                self.sockets.with_label_values(&[state.name()]).set(count);
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding to memory cannot fail");
        String::from_utf8(buffer).expect("exposition is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_port_labels() {
        let mut ports = PortLabels { max: 2, seen: HashSet::new() };
        assert_eq!(ports.label(80), "80");
        assert_eq!(ports.label(443), "443");
        assert_eq!(ports.label(8080), OTHER_PORT);
        assert_eq!(ports.label(80), "80");
    }

    #[test]
    fn exposition_has_the_contract_metrics() {
        let metrics = Metrics::new(4);
        metrics.record_transition(TcpState::Established, TcpState::FinWait1);
        metrics.set_lost(3, 1);
        metrics.set_lost(2, 1);
        metrics.record_malformed();
        let text = metrics.render();
        for name in [
            "observer_tcp_transitions_total{from=\"established\",to=\"fin_wait1\"} 1",
            "observer_tcp_sockets{state=\"close_wait\"} 0",
            "observer_events_total 0",
            "observer_events_lost_total{reason=\"ring_full\"} 3",
            "observer_events_lost_total{reason=\"nested\"} 1",
            "observer_events_lost_total{reason=\"malformed\"} 1",
            "observer_events_malformed_total 1",
            "observer_connections_evicted_total 0",
            "observer_build_info{version=",
            "# TYPE observer_tcp_connection_duration_seconds histogram",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
