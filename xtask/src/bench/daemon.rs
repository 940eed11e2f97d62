//! The bench's observer daemon as the bench sees it: its `/metrics`, scraped once a
//! second as Prometheus would, and read for the figures.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use super::{measure::Ports, system};

/// The bench's observer daemon, scraped once a second as Prometheus would.
pub struct Daemon {
    pub pid: u32,
    url: String,
    agent: ureq::Agent,
    scraping: Arc<AtomicBool>,
    scraper: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    pub fn new(pid: u32, port: u16) -> Self {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let agent = ureq::Agent::new_with_defaults();
        let scraping = Arc::new(AtomicBool::new(true));
        let scraper = {
            let (url, agent, scraping) = (url.clone(), agent.clone(), scraping.clone());
            std::thread::spawn(move || {
                while scraping.load(Ordering::Relaxed) {
                    let _ = agent.get(&url).call().and_then(|mut r| r.body_mut().read_to_string());
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        };
        Self { pid, url, agent, scraping, scraper: Some(scraper) }
    }

    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        let text = self.agent.get(&self.url).call()?.body_mut().read_to_string()?;
        Ok(Metrics::parse(&text))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.scraping.store(false, Ordering::Relaxed);
        if let Some(scraper) = self.scraper.take() {
            let _ = scraper.join();
        }
    }
}

/// Waits until the daemon's transition count stops moving (its lost count is
/// refreshed every 100 ms, so that is read a little later).
pub fn settle(daemon: &Daemon) {
    let mut last = f64::NAN;
    system::wait_for(Duration::from_secs(30), || {
        let Ok(metrics) = daemon.metrics() else { return false };
        let transitions = metrics.sum("observer_tcp_transitions_total");
        let settled = transitions == last;
        last = transitions;
        settled
    });
    std::thread::sleep(Duration::from_millis(300));
}

/// One line of a Prometheus text exposition.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// The samples of a Prometheus text exposition.
pub struct Metrics(Vec<Sample>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let value: f64 = value.parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split(',')
                    .filter_map(|pair| {
                        let (key, value) = pair.split_once('=')?;
                        Some((key.to_string(), value.trim_matches('"').to_string()))
                    })
                    .collect();
                Some(Sample { name: name.to_string(), labels, value })
            })
            .collect();
        Self(samples)
    }

    pub fn sum(&self, name: &str) -> f64 {
        self.0.iter().filter(|sample| sample.name == name).map(|sample| sample.value).sum()
    }
}

/// Verdicts on connections to the churn's ports (its namespace's, not the host's).
pub fn closes_on(metrics: &Metrics, ports: &Ports) -> f64 {
    let ours: Vec<String> =
        ports.fin.iter().chain(&ports.rst).chain(&ports.refused).map(u16::to_string).collect();
    metrics
        .0
        .iter()
        .filter(|sample| sample.name == "observer_tcp_closes_total")
        .filter(|sample| {
            sample.labels.iter().any(|(key, value)| key == "port" && ours.contains(value))
        })
        .map(|sample| sample.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_metrics_and_counts_closes_on_the_churn_ports_only() {
        let metrics = Metrics::parse(
            "# TYPE observer_events_total counter\n\
             observer_events_total 12\n\
             observer_tcp_closes_total{class=\"fin\",cause=\"active\",role=\"client\",port=\"4000\"} 5\n\
             observer_tcp_closes_total{class=\"rst\",cause=\"refused\",role=\"client\",port=\"4001\"} 2\n\
             observer_tcp_closes_total{class=\"fin\",cause=\"active\",role=\"client\",port=\"22\"} 7\n",
        );
        assert_eq!(metrics.sum("observer_events_total"), 12.0);
        assert_eq!(metrics.sum("observer_tcp_closes_total"), 14.0);
        let ports = Ports { fin: vec![4000], rst: vec![], refused: vec![4001] };
        assert_eq!(closes_on(&metrics, &ports), 7.0);
    }
}
