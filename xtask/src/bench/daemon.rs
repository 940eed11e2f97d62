//! The bench's observer daemon as the bench sees it: its `/metrics`, scraped once a
//! second as Prometheus would, and read for the figures (observer-exposition parses
//! them).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use observer_exposition::Exposition;

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

    pub fn metrics(&self) -> anyhow::Result<Exposition> {
        let text = self.agent.get(&self.url).call()?.body_mut().read_to_string()?;
        Ok(Exposition::parse(&text))
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
        let transitions = metrics.sum("observer_tcp_transitions_total", &[]);
        let settled = transitions == last;
        last = transitions;
        settled
    });
    std::thread::sleep(Duration::from_millis(300));
}

/// Verdicts on connections to the churn's ports (its namespace's, not the host's).
pub fn closes_on(metrics: &Exposition, ports: &Ports) -> f64 {
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
        let metrics = Exposition::parse(
            "# TYPE observer_events_total counter\n\
             observer_events_total 12\n\
             observer_tcp_closes_total{class=\"fin\",cause=\"active\",role=\"client\",port=\"4000\"} 5\n\
             observer_tcp_closes_total{class=\"rst\",cause=\"refused\",role=\"client\",port=\"4001\"} 2\n\
             observer_tcp_closes_total{class=\"fin\",cause=\"active\",role=\"client\",port=\"22\"} 7\n",
        );
        assert_eq!(metrics.sum("observer_events_total", &[]), 12.0);
        assert_eq!(metrics.sum("observer_tcp_closes_total", &[]), 14.0);
        let ports = Ports { fin: vec![4000], rst: vec![], refused: vec![4001] };
        assert_eq!(closes_on(&metrics, &ports), 7.0);
    }
}
