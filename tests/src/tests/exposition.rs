//! The exposition format, checked by Prometheus' own tools.

use std::time::Duration;

use super::assert_verdict;
use crate::{
    daemon::{daemon, wait_until},
    net::Pair,
    prometheus::Prometheus,
};

#[test]
fn promtool_accepts_the_exposition() {
    // Make sure every kind of series exists (counters with labels, histogram buckets).
    let pair = Pair::new();
    let (client, server) = pair.connect(7501);
    drop((client, server));
    daemon().verdicts(&pair.client, 1);
    let exposition = daemon().get("/metrics");
    let checked = crate::prometheus::check_metrics(&exposition);
    assert!(checked.as_ref().is_ok_and(|said| said.trim().is_empty()), "promtool: {checked:?}");
    for name in [
        "observer_tcp_closes_total",
        "observer_tcp_transitions_total",
        "observer_tcp_sockets",
        "observer_tcp_connection_duration_seconds_bucket",
        "observer_events_total",
        "observer_events_lost_total",
        "observer_build_info",
    ] {
        assert!(exposition.contains(&format!("\n{name}")), "{name} missing");
    }
}

#[test]
fn prometheus_scrapes_the_daemon() {
    let target = daemon().base_url.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&target);
    let pair = Pair::new();
    let (client, server) = pair.connect(7502);
    drop(client);
    assert_verdict(&daemon().verdict(&pair.client), "client", "fin", "active");
    drop(server);
    daemon().verdicts(&pair.server, 1);
    let mut seen = None;
    let scraped = wait_until(Duration::from_secs(60), || {
        seen = prometheus.query(r#"sum(observer_tcp_closes_total{port="7502",class="fin"})"#);
        seen == Some(2.0)
    });
    assert!(scraped, "Prometheus saw {seen:?} closes on port 7502");
    assert_eq!(prometheus.query("observer_build_info"), Some(1.0));
    assert_eq!(prometheus.query(r#"up{job="observer"}"#), Some(1.0));
}
