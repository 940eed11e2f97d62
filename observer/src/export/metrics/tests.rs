use super::*;

/// Sets `summary` as the inventory and checks that each of `lines` is in the exposition.
fn assert_inventory_exposes(metrics: &Metrics, summary: &Summary, lines: &[&str]) {
    metrics.set_inventory(summary);
    let text = metrics.render();
    for line in lines {
        assert!(text.lines().any(|l| l == *line), "{line} missing from\n{text}");
    }
}

#[test]
fn namespaces_past_the_label_cap_are_summed_as_other_and_counted() {
    use crate::inventory::NamespaceSummary;
    let metrics = Metrics::new(8, CloseLabels { max_values: 1, ..CloseLabels::default() });
    let namespace = |netns, count, oldest| NamespaceSummary {
        netns,
        states: [(TcpState::Established, (count, oldest))].into_iter().collect(),
        ..NamespaceSummary::default()
    };
    let summary = Summary {
        namespaces: vec![namespace(7, 3, 5.0), namespace(8, 4, 9.0), namespace(9, 1, 2.0)],
        failures: 0,
    };
    let lines = [
        "observer_tcp_sockets{netns=\"7\",state=\"established\"} 3",
        "observer_tcp_sockets{netns=\"other\",state=\"established\"} 5",
        "observer_tcp_socket_oldest_age_seconds{netns=\"other\",state=\"established\"} 9",
        "observer_label_values_refused_total{label=\"netns\"} 2",
    ];
    assert_inventory_exposes(&metrics, &summary, &lines);
}

#[test]
fn inventory_gives_counts_oldest_ages_and_close_wait_histogram() {
    use crate::inventory::{DiagSocket, NamespaceSockets, NamespaceSummary};
    use std::collections::HashMap;
    let socket = |state, local: &str, remote: &str, cookie| DiagSocket {
        state,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        cookie,
        inode: 0,
        stats: None,
        time_wait_left: None,
    };
    let namespace = NamespaceSockets {
        netns: 7,
        sockets: vec![
            socket(TcpState::Listen, "10.0.0.1:8080", "0.0.0.0:0", 1),
            socket(TcpState::CloseWait, "10.0.0.1:8080", "10.0.0.2:5000", 2),
            socket(TcpState::CloseWait, "10.0.0.1:8080", "10.0.0.2:5001", 3),
            socket(TcpState::CloseWait, "10.0.0.1:40000", "10.0.0.3:5432", 4),
            socket(TcpState::TimeWait, "10.0.0.1:40001", "10.0.0.3:5432", 5),
        ],
    };
    let ages: HashMap<u64, f64> = [(2, 30.0), (3, 7200.0), (4, 0.5), (5, 12.0)].into();
    let summary = Summary {
        namespaces: vec![NamespaceSummary::of(&namespace, |socket| {
            ages.get(&socket.cookie).copied().unwrap_or(0.0)
        })],
        failures: 0,
    };
    let metrics = Metrics::new(8, CloseLabels::default());
    let lines = [
        "observer_tcp_sockets{netns=\"7\",state=\"close_wait\"} 3",
        "observer_tcp_sockets{netns=\"7\",state=\"listen\"} 1",
        "observer_tcp_sockets{netns=\"7\",state=\"time_wait\"} 1",
        "observer_tcp_socket_oldest_age_seconds{netns=\"7\",state=\"close_wait\"} 7200",
        "observer_tcp_close_wait_age_seconds_bucket{port=\"8080\",le=\"60\"} 1",
        "observer_tcp_close_wait_age_seconds_bucket{port=\"8080\",le=\"+Inf\"} 2",
        "observer_tcp_close_wait_age_seconds_count{port=\"5432\"} 1",
    ];
    assert_inventory_exposes(&metrics, &summary, &lines);
    // A namespace that disappeared takes its series with it.
    metrics.set_inventory(&Summary::default());
    let text = metrics.render();
    assert!(!text.contains("netns=\"7\""), "stale series in\n{text}");
}

#[test]
fn exposition_has_the_contract_metrics() {
    let metrics = Metrics::new(4, CloseLabels::default());
    metrics.record_transition(TcpState::Established, TcpState::FinWait1);
    metrics.set_lost(3, 1);
    metrics.set_lost(2, 1);
    metrics.record_malformed();
    let text = metrics.render();
    for name in [
        "observer_tcp_transitions_total{from=\"established\",to=\"fin_wait1\"} 1",
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
