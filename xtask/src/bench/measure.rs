//! One measurement: a configuration's tool started, the load run against it, its
//! figures read, the load run again with BPF run-time statistics on (tools with BPF
//! programs only, at maximum churn only), the tool stopped.

use std::{io::Read as _, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use observer_exposition::Exposition;
use serde::Deserialize;

use super::{
    Bench, Config,
    daemon::{Daemon, closes_on, settle},
    running::{IdleConnections, Running},
    system::{self, BpfStats, Process, ProgramStats},
};
use crate::command::target_dir;

/// The load generator's report (tests/src/bin/churn.rs).
#[derive(Debug, Deserialize)]
pub struct Churn {
    seconds: f64,
    connections_per_second: f64,
    /// The whole host's busy CPU seconds over the churn window: all CPUs' time less
    /// /proc/stat's idle and iowait.
    host_cpu_seconds: Option<f64>,
    connections: Kinds,
    failed: Kinds,
    threads: usize,
    ports: Ports,
    first_error: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
struct Kinds {
    fin: u64,
    rst: u64,
    refused: u64,
}

impl Kinds {
    fn total(self) -> u64 {
        self.fin + self.rst + self.refused
    }
}

#[derive(Debug, Deserialize)]
pub struct Ports {
    pub fin: Vec<u16>,
    pub rst: Vec<u16>,
    pub refused: Vec<u16>,
}

// What each ending produces at the tracepoints, measured on loopback (docs/benchmarks.md):
// fin: client 7>2>1>4>5>7, server child 10>3>1>8>9>7 = 10 transitions;
// rst: client 7>2>1>7, server 10>3>1>7 = 6, plus the RST sent and the RST received;
// refused: 7>2>7 = 2, plus the RST received (the RST sent answers no socket: not recorded).
const TRANSITIONS: Kinds = Kinds { fin: 10, rst: 6, refused: 2 };
const RESETS: Kinds = Kinds { fin: 0, rst: 2, refused: 1 };
/// The server's accept() of each child (names its owner).
const ACCEPTS: Kinds = Kinds { fin: 1, rst: 1, refused: 0 };
/// Every listener: CLOSE > LISTEN at start and LISTEN > CLOSE at exit.
const LISTENER_TRANSITIONS: u64 = 2;
/// Verdicts (observer_tcp_closes_total) per connection: both ends, or the refused client.
const CLOSES: Kinds = Kinds { fin: 2, rst: 2, refused: 1 };

/// The BPF cost of a configuration: the same load again, right after the main run, with
/// the kernel's BPF run-time statistics on. Those cost two clock reads per program run
/// (5–7 % of observer's throughput on a 2-core host, more for tools that run more
/// programs per transition), a price no production host pays: the main run, which
/// gives the throughput, runs without them.
#[derive(Debug, Clone, Copy)]
pub struct CostRun {
    pub connections_per_second: f64,
    pub expected_transitions: u64,
    pub bpf: ProgramStats,
}

/// What the kernel must have reported for one run of the load.
#[derive(Debug, Clone, Copy)]
struct Expected {
    transitions: u64,
    /// Transitions, RSTs and accepts: observer_events_total.
    events: u64,
    /// The accept records among `events`: none where the daemon captures no accept()
    /// (`observer_capture_info{accept_owner="listener"}`).
    accepts: u64,
    /// Verdicts.
    closes: u64,
}

impl Expected {
    fn of(churn: &Churn) -> Self {
        let listeners = (churn.ports.fin.len() + churn.ports.rst.len()) as u64;
        let c = churn.connections;
        let transitions = c.fin * TRANSITIONS.fin
            + c.rst * TRANSITIONS.rst
            + c.refused * TRANSITIONS.refused
            + listeners * LISTENER_TRANSITIONS;
        let accepts = c.fin * ACCEPTS.fin + c.rst * ACCEPTS.rst + c.refused * ACCEPTS.refused;
        Self {
            transitions,
            accepts,
            events: transitions
                + c.fin * (RESETS.fin + ACCEPTS.fin)
                + c.rst * (RESETS.rst + ACCEPTS.rst)
                + c.refused * (RESETS.refused + ACCEPTS.refused),
            closes: c.fin * CLOSES.fin + c.rst * CLOSES.rst + c.refused * CLOSES.refused,
        }
    }
}

/// One configuration's figures in one round.
#[derive(Debug, Default, Clone)]
pub struct Measure {
    pub connections_per_second: f64,
    pub threads: usize,
    pub failed: u64,
    pub expected_transitions: u64,
    pub expected_closes: u64,
    /// observer: observer_events_total over the main run; bpftrace: its count over
    /// both runs.
    pub events: Option<u64>,
    pub expected_events: u64,
    /// Accept records among `expected_events` (see [`Expected::accepts`]).
    pub expected_accepts: u64,
    pub transitions: Option<u64>,
    pub closes: Option<u64>,
    /// observer: over the main run; libbpf-tools: over both runs.
    pub lost: Option<u64>,
    /// The cost run's figures, for configurations with BPF programs.
    pub cost: Option<CostRun>,
    pub cpu_seconds: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    /// Resident at the end of the churn (idle connections still open).
    pub rss_kib: Option<u64>,
    pub tracked_sockets: Option<u64>,
    /// Lost while the idle connections were all opened at once, before the churn.
    pub setup_lost: Option<u64>,
    /// Lost while the idle connections all closed at once, after the churn.
    pub teardown_lost: Option<u64>,
    /// What a `getppid()` costs while the tool runs (every process on the host pays it
    /// for every system call).
    pub syscall_ns: f64,
    /// The no-observer rate this one is compared with: the mean of the `none` runs just
    /// before and just after it (a `none` run's own rate).
    pub baseline: f64,
    /// Connections completed in the churn window, and its length.
    pub connections: u64,
    pub seconds: f64,
    /// The whole host's busy CPU seconds (all CPUs) over the churn window: the kernel's
    /// share (softirq included) and every process's, the daemon's wake-ups too.
    pub host_cpu_seconds: Option<f64>,
    /// The `none` runs' host CPU µs per connection and % of one core, compared with as
    /// `baseline` is (a `none` run's own).
    pub baseline_host_us: Option<f64>,
    pub baseline_core_percent: Option<f64>,
}

/// The daemon's figures as the churn starts, which its own are counted from.
struct DaemonBefore {
    metrics: Exposition,
    cpu_seconds: Option<f64>,
}

impl DaemonBefore {
    fn read(daemon: &Daemon) -> anyhow::Result<Self> {
        let metrics = daemon.metrics()?;
        Ok(Self { metrics, cpu_seconds: system::cpu_seconds(daemon.pid) })
    }
}

impl Bench<'_> {
    /// `config` under maximum churn (`rate` None) or at `rate` connections/s; the BPF
    /// cost run only at maximum churn, where the per-transition figures come from.
    pub fn measure(&self, config: Config, rate: Option<u32>) -> anyhow::Result<Measure> {
        let mut running = self.start(config)?;
        let pids = running.pids();
        let before = running.daemon.as_ref().map(DaemonBefore::read).transpose()?;

        let churn = self.churn(rate)?;
        system::check_interrupted()?;
        let mut measure = Measure::of(&churn, syscall_ns());
        warn_failed(config, &churn, &measure);

        if let (Some(daemon), Some(before)) = (&running.daemon, &before) {
            measure.read_daemon(daemon, before, &churn.ports)?;
        }
        if !pids.is_empty() && rate.is_none() {
            measure.cost = Some(self.cost_run(&pids)?);
            if let Some(daemon) = &running.daemon {
                settle(daemon);
            }
        }
        if let (Some(daemon), Some(idle)) = (&running.daemon, running.idle.take()) {
            measure.release_idle(daemon, idle)?;
        }
        running.check_still_running()?;
        measure.stop(config, running);
        Ok(measure)
    }

    /// The load again, with BPF run-time statistics on for exactly that run (the
    /// descriptor that enables them is closed at its end): what `pids`' programs cost.
    fn cost_run(&self, pids: &[u32]) -> anyhow::Result<CostRun> {
        let stats = BpfStats::enable()?;
        let before = program_stats(pids);
        let churn = self.churn(None)?;
        let bpf = program_stats(pids).since(before);
        drop(stats);
        system::check_interrupted()?;
        Ok(CostRun {
            connections_per_second: churn.connections_per_second,
            expected_transitions: Expected::of(&churn).transitions,
            bpf,
        })
    }

    /// Runs the load, paced to `rate` connections/s if given, and returns its report.
    fn churn(&self, rate: Option<u32>) -> anyhow::Result<Churn> {
        let mut command =
            self.namespace.command(&target_dir().join("release/churn").display().to_string());
        command
            .arg(format!("--duration={}s", self.options.duration.as_secs_f64()))
            .arg(format!("--mix={}", self.options.mix))
            .stdout(Stdio::piped());
        if let Some(threads) = self.options.threads {
            command.arg(format!("--threads={threads}"));
        }
        if let Some(rate) = rate {
            command.arg(format!("--rate={rate}"));
        }
        let mut process = Process::spawn("churn", &mut command)?;
        let mut text = String::new();
        if let Some(stdout) = process.child().stdout.as_mut() {
            stdout.read_to_string(&mut text)?;
        }
        let status = process.child().wait()?;
        if !status.success() {
            bail!("the load generator failed ({status})");
        }
        serde_json::from_str(text.trim())
            .with_context(|| format!("unreadable load generator report: {text}"))
    }
}

impl Measure {
    /// The load generator's own figures, and what the kernel must have seen of them.
    fn of(churn: &Churn, syscall_ns: f64) -> Self {
        let expected = Expected::of(churn);
        Self {
            connections_per_second: churn.connections_per_second,
            syscall_ns,
            threads: churn.threads,
            failed: churn.failed.total(),
            expected_transitions: expected.transitions,
            expected_events: expected.events,
            expected_accepts: expected.accepts,
            expected_closes: expected.closes,
            connections: churn.connections.total(),
            seconds: churn.seconds,
            host_cpu_seconds: churn.host_cpu_seconds,
            ..Self::default()
        }
    }

    /// The whole host's CPU per connection completed, in µs. At maximum churn the host
    /// is saturated in every configuration, so a costlier tool shows here as fewer
    /// connections for the same CPU time; at a fixed rate, as more CPU time.
    pub fn host_us_per_connection(&self) -> Option<f64> {
        let cpu = self.host_cpu_seconds?;
        (self.connections > 0).then(|| cpu * 1e6 / self.connections as f64)
    }

    /// The whole host's busy CPU time over the churn window, in % of one core.
    pub fn host_core_percent(&self) -> Option<f64> {
        let cpu = self.host_cpu_seconds?;
        (self.seconds > 0.0).then(|| 100.0 * cpu / self.seconds)
    }

    /// A `none` run is compared with itself.
    pub fn be_baseline(&mut self) {
        self.baseline = self.connections_per_second;
        self.baseline_host_us = self.host_us_per_connection();
        self.baseline_core_percent = self.host_core_percent();
    }

    /// A tool's run is compared with the mean of the `none` runs either side of it:
    /// this machine's speed drifts within minutes.
    pub fn compare_with(&mut self, before: &Measure, after: &Measure) {
        self.baseline = (before.connections_per_second + after.connections_per_second) / 2.0;
        self.baseline_host_us =
            mean(before.host_us_per_connection(), after.host_us_per_connection());
        self.baseline_core_percent = mean(before.host_core_percent(), after.host_core_percent());
    }

    /// The daemon's figures for the churn: counters since `before`, its CPU time and
    /// memory, once the churn's verdicts are in.
    fn read_daemon(
        &mut self,
        daemon: &Daemon,
        before: &DaemonBefore,
        ports: &Ports,
    ) -> anyhow::Result<()> {
        let churn_closes =
            |metrics: &Exposition| closes_on(metrics, ports) - closes_on(&before.metrics, ports);
        wait_for_verdicts(daemon, self.expected_closes, &churn_closes);
        let after = daemon.metrics()?;
        // Without a trampoline on inet_accept() (and without the opt-in accept() system-
        // call tracepoints), the daemon records no accept: nothing to expect of them.
        if after.sum("observer_capture_info", &[("accept_owner", "listener")]) > 0.0 {
            self.expected_events -= self.expected_accepts;
        }
        let delta =
            |name: &str| (after.sum(name, &[]) - before.metrics.sum(name, &[])).max(0.0) as u64;
        self.events = Some(delta("observer_events_total"));
        self.transitions = Some(delta("observer_tcp_transitions_total"));
        self.lost = Some(delta("observer_events_lost_total"));
        self.closes = Some(churn_closes(&after) as u64);
        self.cpu_seconds = match (before.cpu_seconds, system::cpu_seconds(daemon.pid)) {
            (Some(before), Some(after)) => Some(after - before),
            _ => None,
        };
        self.tracked_sockets = Some(after.sum("observer_tracker_sockets", &[]) as u64);
        self.rss_kib = system::rss_kib(daemon.pid);
        self.peak_rss_kib = system::peak_rss_kib(daemon.pid);
        Ok(())
    }

    /// Closes the idle connections; what they cost on the way in and out.
    fn release_idle(&mut self, daemon: &Daemon, idle: IdleConnections) -> anyhow::Result<()> {
        self.setup_lost = Some(idle.setup_lost);
        self.tracked_sockets = self.tracked_sockets.max(Some(idle.tracked));
        self.teardown_lost = Some(idle.release(daemon)?);
        self.peak_rss_kib = system::peak_rss_kib(daemon.pid);
        Ok(())
    }

    /// Stops the tool; bpftrace prints its count as it stops, libbpf-tools their losses.
    fn stop(&mut self, config: Config, mut running: Running) {
        if config == Config::Bpftrace {
            self.events = running.stop_bpftrace();
            if self.events.is_none() {
                eprintln!("bench: bpftrace printed no count; this round has no events figure");
            }
        }
        let peer_lost = running.stop();
        if config == Config::LibbpfTools {
            self.lost = peer_lost;
        }
    }
}

/// Verdicts come 100 ms after each close; waits until the churn's are all in (or stop
/// coming).
fn wait_for_verdicts(daemon: &Daemon, expected: u64, churn_closes: &dyn Fn(&Exposition) -> f64) {
    let mut last = 0.0;
    let mut stable = 0;
    system::wait_for(Duration::from_secs(15), || {
        let Ok(metrics) = daemon.metrics() else { return false };
        let closes = churn_closes(&metrics);
        stable = if closes == last { stable + 1 } else { 0 };
        last = closes;
        closes >= expected as f64 || stable >= 10
    });
}

fn warn_failed(config: Config, churn: &Churn, measure: &Measure) {
    if let Some(error) = &churn.first_error {
        eprintln!(
            "bench: {}: {} connections failed, first: {error}",
            config.name(),
            measure.failed
        );
    }
}

/// What one system call costs a process while the tool runs: the best of three batches
/// of `getppid()`, the cheapest call there is. A tool that enables any syscall
/// tracepoint sends every call of every task through the tracing slow path.
fn syscall_ns() -> f64 {
    const CALLS: u32 = 1_000_000;
    (0..3)
        .map(|_| {
            let started = std::time::Instant::now();
            for _ in 0..CALLS {
                // SAFETY: getppid has no arguments and cannot fail.
                std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
            }
            started.elapsed().as_nanos() as f64 / f64::from(CALLS)
        })
        .fold(f64::INFINITY, f64::min)
}

/// The mean of two figures, None unless both are there.
fn mean(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some((a? + b?) / 2.0)
}

fn program_stats(pids: &[u32]) -> ProgramStats {
    let mut total = ProgramStats::default();
    for &pid in pids {
        total.add(ProgramStats::of_process(pid));
    }
    total
}
