//! The observer daemon under test: one real process for the whole test run (loading and
//! attaching eBPF is the slow part), queried over HTTP like an operator would.
//!
//! Scenarios tell their connections apart by network namespace (`/connections?netns=`)
//! and by service port in the metrics, so they never see each other's verdicts.

use std::{
    collections::HashMap,
    fs::File,
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    time::{Duration, Instant},
};

use observer_exposition::Exposition;
use serde::Deserialize;

use crate::net::Namespace;

/// How long a verdict may take to appear (the daemon waits 100 ms after a close).
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(20);

/// The daemon binary, built by `cargo xtask test`.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("OBSERVER_BIN")
        .map(PathBuf::from)
        .expect("OBSERVER_BIN is not set: run the integration tests with `cargo xtask test`");
    assert!(path.exists(), "OBSERVER_BIN={} does not exist", path.display());
    path
}

/// One HTTP client for the run: it keeps its connection to the daemon open, so polling
/// does not add a TCP connection (and a verdict) per request.
fn http_agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(ureq::Agent::new_with_defaults)
}

/// How long a test may allow for something the issue bounds at `real` on this machine:
/// `real` itself, but ten times it in a guest under emulation (vm-test sets
/// `OBSERVER_TEST_EMULATED`), where every instruction costs 10–50 times more. Only
/// latencies are scaled; counts (events lost, closes counted) are checked as they are.
pub fn latency_budget(real: Duration) -> Duration {
    if std::env::var_os("OBSERVER_TEST_EMULATED").is_some() { real * 10 } else { real }
}

/// Resident set size of a process, in KiB: (current, peak).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A free TCP port on the host's loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Daemon {
    pub base_url: String,
    pub log: PathBuf,
    pub pid: u32,
    /// Set when the process has exited.
    pub exit: std::sync::Arc<OnceLock<std::process::ExitStatus>>,
}

/// The shared daemon, started on first use and killed when the test process exits.
pub fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        // Every scenario of the run has ports of its own, and some fill a port cap on
        // purpose (labels::squatted_ports…): room for them all.
        let mut args = vec![
            "--connections.max-recent".to_string(),
            "100000".to_string(),
            "--metrics.max-ports".to_string(),
            "4096".to_string(),
        ];
        if let Some(events) = crate::record::events_file() {
            args.push("--debug.events-file".into());
            args.push(events.display().to_string());
        }
        Daemon::start("shared", &args)
    })
}

impl Daemon {
    /// Starts an observer daemon with extra flags and waits until it is healthy.
    pub fn start(name: &str, extra_args: &[String]) -> Daemon {
        Self::start_binary(&binary(), name, extra_args)
    }

    /// [`Daemon::start`] with another executable (a wrapper that execs the daemon).
    pub fn start_binary(binary: &std::path::Path, name: &str, extra_args: &[String]) -> Daemon {
        let daemon = Self::spawn(binary, name, extra_args);
        let ready = wait_until(Duration::from_secs(30), || {
            http_agent().get(&format!("{}/healthz", daemon.base_url)).call().is_ok()
        });
        assert!(ready, "observer did not become healthy:\n{}", daemon.log_tail());
        daemon
    }

    /// Starts the process without waiting for it to serve (HTTPS, authentication).
    pub fn spawn(binary: &std::path::Path, name: &str, extra_args: &[String]) -> Daemon {
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("observer-tests-{}-{name}.log", std::process::id()));
        let (sender, receiver) = mpsc::channel();
        let binary = binary.to_path_buf();
        let exit = std::sync::Arc::new(OnceLock::new());
        let exit_status = std::sync::Arc::clone(&exit);
        let log_path = log.clone();
        let mut args = vec![
            "--web.listen-address".to_string(),
            format!("127.0.0.1:{port}"),
            "--log.level".to_string(),
            "info".to_string(),
        ];
        args.extend_from_slice(extra_args);
        // The child is told to die with its parent *thread* (PR_SET_PDEATHSIG), so it is
        // spawned from a thread that waits for it.
        std::thread::spawn(move || {
            let log_file = File::create(&log_path).expect("daemon log");
            let mut command = Command::new(binary);
            command.args(&args).stdout(Stdio::null()).stderr(log_file);
            // SAFETY: prctl is async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let mut child: Child = command.spawn().expect("start observer");
            sender.send(child.id()).unwrap();
            let status = child.wait();
            eprintln!("observer daemon exited: {status:?}");
            if let Ok(status) = status {
                let _ = exit_status.set(status);
            }
        });
        let pid = receiver.recv().unwrap();
        Daemon { base_url: format!("http://127.0.0.1:{port}"), log, pid, exit }
    }

    /// Stops a daemon started with [`Daemon::start`] (SIGTERM, as systemd would).
    pub fn stop(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.exit.get().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_until(timeout, || self.exit.get().is_some());
        self.exit.get().copied()
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One closed connection as `/connections` reports it (the fields tests look at).
#[derive(Clone, Debug, Deserialize)]
pub struct Connection {
    /// Absent outside the daemon (`observer watch --json`).
    #[serde(default)]
    pub seq: u64,
    pub closed_at: String,
    pub netns: u64,
    pub family: String,
    pub local: String,
    pub remote: String,
    pub role: String,
    pub port: u16,
    pub class: String,
    pub cause: String,
    #[serde(default)]
    pub detail: Option<String>,
    pub states: Vec<String>,
    pub sk_err: i32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    #[serde(default)]
    pub duration_seconds: Option<f64>,
    /// `{"pid", "comm", "cgroup", "container_id"}` or `"unknown"`.
    #[serde(default)]
    pub owner: serde_json::Value,
}

impl Connection {
    pub fn verdict(&self) -> (&str, &str) {
        (self.class.as_str(), self.cause.as_str())
    }

    /// Closed after `namespace` was made: a verdict of an older namespace that had the
    /// same inode is not.
    fn closed_after(&self, namespace: &Namespace) -> bool {
        humantime::parse_rfc3339(&self.closed_at).expect("closed_at") >= namespace.created_at
    }

    /// (pid, comm) of the owner, or None for "unknown".
    pub fn owner(&self) -> Option<(u32, String)> {
        let pid = self.owner.get("pid")?.as_u64()? as u32;
        Some((pid, self.owner.get("comm")?.as_str()?.to_string()))
    }
}

impl Daemon {
    pub fn get(&self, path: &str) -> String {
        http_agent()
            .get(&format!("{}{path}", self.base_url))
            .call()
            .unwrap_or_else(|error| panic!("GET {path}: {error}\n{}", self.log_tail()))
            .body_mut()
            .read_to_string()
            .expect("response body")
    }

    /// Verdicts on connections of `namespace`, oldest first.
    pub fn connections(&self, namespace: &Namespace) -> Vec<Connection> {
        self.connections_in(namespace).into_iter().filter(|c| c.closed_after(namespace)).collect()
    }

    /// Verdicts with the namespace's inode since it was made, its own or not.
    /// Paged as a client following the verdicts would: each answer holds at most
    /// `limit`, the first ones after `after`.
    fn connections_in(&self, namespace: &Namespace) -> Vec<Connection> {
        const PAGE: usize = 10_000;
        let mut all: Vec<Connection> = Vec::new();
        loop {
            // A namespace's first_seq is the shared daemon's numbering; a daemon of its
            // own numbers from 1, and the namespace's inode tells its verdicts apart.
            let first = if std::ptr::eq(self, daemon()) { namespace.first_seq } else { 0 };
            let after = all.last().map_or(first, |last| last.seq);
            let body = self.get(&format!(
                "/connections?status=closed&netns={}&after={after}&limit={PAGE}",
                namespace.inode(),
            ));
            let page: Vec<Connection> = serde_json::from_str(&body)
                .unwrap_or_else(|error| panic!("bad JSON ({error}): {body}"));
            let full = page.len() == PAGE;
            all.extend(page);
            if !full {
                return all;
            }
        }
    }

    /// What a failed count should say besides the verdicts: the sockets the daemon gave
    /// up on, the events it lost, and verdicts it made in this namespace's inode that
    /// are older than the namespace.
    fn missing_verdicts_report(&self, namespace: &Namespace) -> String {
        let older: Vec<String> = self
            .connections_in(namespace)
            .into_iter()
            .filter(|c| !c.closed_after(namespace))
            .map(|c| format!("seq {} closed at {} {} -> {}", c.seq, c.closed_at, c.local, c.remote))
            .collect();
        let open: Vec<serde_json::Value> = serde_json::from_str(
            &self.get(&format!("/connections?status=open&netns={}", namespace.inode())),
        )
        .unwrap_or_default();
        let open: Vec<String> = open
            .iter()
            .map(|c| format!("{} -> {} {} {}", c["local"], c["remote"], c["state"], c["states"]))
            .collect();
        format!(
            "namespace made at {}; verdicts on its inode closed before that: {older:?}; \
             open sockets there now: {open:?}; \
             sockets dropped: {} replaced, {} over capacity; events lost: {}; \
             the kernel's view (ss -tino):\n{}",
            humantime::format_rfc3339_micros(namespace.created_at),
            self.metric_sum("observer_tracker_dropped_sockets_total", &[("reason", "replaced")]),
            self.metric_sum("observer_tracker_dropped_sockets_total", &[("reason", "capacity")]),
            self.metric_sum("observer_events_lost_total", &[]),
            namespace.exec(&["ss", "-t", "-i", "-n", "-o", "-a"]),
        )
    }

    /// `seq` of the newest verdict so far.
    pub fn last_seq(&self) -> u64 {
        let body = self.get("/connections?status=closed&limit=1");
        let newest: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON");
        newest.first().and_then(|c| c["seq"].as_u64()).unwrap_or(0)
    }

    /// Waits until `namespace` has `count` verdicts and returns them; fails if it gets
    /// more, or not that many in time.
    pub fn verdicts(&self, namespace: &Namespace, count: usize) -> Vec<Connection> {
        self.verdicts_within(namespace, count, VERDICT_TIMEOUT)
    }

    pub fn verdicts_within(
        &self,
        namespace: &Namespace,
        count: usize,
        timeout: Duration,
    ) -> Vec<Connection> {
        let mut seen = Vec::new();
        wait_until(timeout, || {
            seen = self.connections(namespace);
            seen.len() >= count
        });
        if seen.len() != count {
            panic!(
                "expected {count} verdict(s) in {}, got {}: {seen:#?}\n{}\ndaemon log:\n{}",
                namespace.name(),
                seen.len(),
                self.missing_verdicts_report(namespace),
                self.log_tail()
            );
        }
        seen
    }

    /// The single verdict of `namespace`.
    pub fn verdict(&self, namespace: &Namespace) -> Connection {
        self.verdicts(namespace, 1).remove(0)
    }

    /// The daemon's `/metrics`, parsed.
    fn exposition(&self) -> Exposition {
        Exposition::parse(&self.get("/metrics"))
    }

    /// Samples of the exposition, keyed by `name{labels}` as printed.
    pub fn metrics(&self) -> HashMap<String, f64> {
        self.exposition().0.into_iter().map(|sample| (sample.series, sample.value)).collect()
    }

    /// Sum of the samples of `name` whose labels include every `label="value"` given.
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.exposition().sum(name, labels)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("DEBUG")).collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}
