//! The exposition format, checked by Prometheus' own tools.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

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
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success() && complaints.trim().is_empty(), "promtool: {complaints}");
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
