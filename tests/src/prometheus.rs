//! A real Prometheus server (Debian package `prometheus`) scraping the daemon under test,
//! queried through its HTTP API the way Grafana and operators query it.
//!
//! It listens on a free loopback port, keeps its configuration and data in a temporary
//! directory, scrapes every second, and is killed (its directory removed) on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use serde_json::Value;

use crate::daemon::{free_port, wait_until};

/// The scrape job name; the alerting rules and dashboard expect "observer".
pub const JOB: &str = "observer";
/// Scrape (and rule evaluation) interval: short, so tests need not wait long.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Prometheus {
    child: Child,
    pub url: String,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Prometheus answers bad queries with 400 and a JSON error: read it rather than fail.
fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| ureq::Agent::config_builder().http_status_as_error(false).build().into())
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (host:port) as job [`JOB`] and waits until it
    /// answers queries.
    pub fn start(target: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "observer-prometheus-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        let interval = format!("{}s", SCRAPE_INTERVAL.as_secs());
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n"
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
        let prometheus = Self { child, url: format!("http://127.0.0.1:{port}"), dir };
        let ready = wait_until(Duration::from_secs(30), || {
            agent()
                .get(&format!("{}/-/ready", prometheus.url))
                .call()
                .is_ok_and(|response| response.status().is_success())
        });
        assert!(ready, "Prometheus did not become ready:\n{}", prometheus.log());
        prometheus
    }

    /// Calls an API endpoint (`/api/v1/...`): the `data` of a success, or Prometheus'
    /// own error (`errorType: error`) as text.
    pub fn api(&self, path: &str, parameters: &[(&str, &str)]) -> Result<Value, String> {
        let mut response = agent()
            .get(&format!("{}{path}", self.url))
            .query_pairs(parameters.iter().copied())
            .call()
            .map_err(|error| format!("GET {path}: {error}"))?;
        let text = response.body_mut().read_to_string().map_err(|error| error.to_string())?;
        let body: Value =
            serde_json::from_str(&text).map_err(|error| format!("bad JSON ({error}): {text}"))?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// The value of an instant query returning one series, if it does (yet).
    pub fn query(&self, expression: &str) -> Option<f64> {
        let data = self.api("/api/v1/query", &[("query", expression)]).ok()?;
        data["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `count` more scrapes of the target have been stored, so that what the
    /// daemon exports now is in Prometheus (with enough samples for rate()).
    pub fn wait_for_scrapes(&self, count: u32) {
        let newest = || self.query(&format!("timestamp(up{{job=\"{JOB}\"}})"));
        let mut first = None;
        let started = wait_until(SCRAPE_INTERVAL * 30, || {
            first = newest();
            first.is_some()
        });
        assert!(started, "Prometheus never scraped the daemon:\n{}", self.log());
        let start = first.unwrap_or_default();
        let wanted = start + f64::from(count) * SCRAPE_INTERVAL.as_secs_f64();
        let mut seen = None;
        let scraped = wait_until(SCRAPE_INTERVAL * (count + 10), || {
            seen = newest();
            seen.is_some_and(|timestamp| timestamp >= wanted)
        });
        assert!(
            scraped,
            "Prometheus did not scrape {count} times (last scrape at {seen:?}, wanted {wanted}):\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

/// What `promtool check metrics` says of an exposition: stdout and stderr together,
/// empty when it has nothing to complain about, or `Err` with them if it failed.
pub fn check_metrics(exposition: &str) -> Result<String, String> {
    use std::io::Write as _;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() { Ok(said) } else { Err(said) }
}
