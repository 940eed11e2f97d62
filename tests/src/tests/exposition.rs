//! The exposition format, checked by Prometheus' own tools.

use std::{
    io::Write as _,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::assert_verdict;
use crate::{
    daemon::{daemon, free_port, wait_until},
    net::Pair,
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

/// A real Prometheus server, started on loopback, scrapes the daemon.
struct Prometheus {
    child: Child,
    url: String,
    _data: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("observer-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = TempDir(dir.clone());
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: observer\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package prometheus)");
        Self { child, url: format!("http://127.0.0.1:{port}"), _data: data }
    }

    /// The value of an instant query returning one series, if it does yet.
    fn query(&self, expression: &str) -> Option<f64> {
        let mut response = ureq::get(&format!("{}/api/v1/query", self.url))
            .query("query", expression)
            .call()
            .ok()?;
        let body: serde_json::Value =
            serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
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
