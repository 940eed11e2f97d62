//! `cargo xtask bench`: connection churn with no observer, with observer, and with its
//! peers (a bpftrace one-liner, bcc's libbpf-tools), interleaved round by round, and a
//! table of ratios against "no observer" from the same run (docs/benchmarks.md).
//!
//! `cargo xtask bench --pipeline` runs the userspace pipeline's own figures instead
//! (observer/benches/tracker.rs).

mod peers;
mod system;

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::Read as _,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::{
    bootstrap,
    command::{cargo, exec, is_root, target_dir},
};
use system::{BpfStats, Namespace, Process, ProgramStats};

#[derive(clap::Args)]
pub struct Options {
    /// Only the userspace pipeline's figures (cargo bench, no root needed).
    #[arg(long)]
    pipeline: bool,
    /// Churn time per configuration and round, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rounds; each runs every configuration once, in turn.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Load generator threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Weights of the connection endings: fin, rst (SO_LINGER {1,0}), refused.
    #[arg(long, default_value = "fin=1,rst=1,refused=1")]
    mix: String,
    /// Idle connections held open in the "observer + idle" runs; both ends are
    /// tracked, so the default gives the memory target's 100 000 live tracked sockets.
    /// 0 skips them.
    #[arg(long, default_value_t = 50_000)]
    idle: usize,
    /// Configurations besides "none", comma-separated: observer, observer-hooks,
    /// bpftrace, libbpf-tools, observer-idle (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Extra flag for the observer daemon (repeatable), e.g. --daemon-arg=--bpf.ring-buffer-bytes=1048576.
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    None,
    Observer,
    /// The daemon with every program attached but returning at once: what the
    /// attachments alone cost, the floor under any program on these hooks.
    ObserverHooks,
    Bpftrace,
    LibbpfTools,
    ObserverIdle,
}

impl Config {
    const ALL: [Config; 6] = [
        Config::None,
        Config::Observer,
        Config::ObserverHooks,
        Config::Bpftrace,
        Config::LibbpfTools,
        Config::ObserverIdle,
    ];

    fn name(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Observer => "observer",
            Config::ObserverHooks => "observer-hooks",
            Config::Bpftrace => "bpftrace",
            Config::LibbpfTools => "libbpf-tools",
            Config::ObserverIdle => "observer-idle",
        }
    }

    fn is_observer(self) -> bool {
        matches!(self, Config::Observer | Config::ObserverIdle)
    }
}

/// The load generator's report (tests/src/bin/churn.rs).
#[derive(Debug, Deserialize)]
struct Churn {
    connections_per_second: f64,
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
struct Ports {
    fin: Vec<u16>,
    rst: Vec<u16>,
    refused: Vec<u16>,
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
struct CostRun {
    connections_per_second: f64,
    expected_transitions: u64,
    bpf: ProgramStats,
}

/// What the kernel must have reported for one run of the load.
#[derive(Debug, Clone, Copy)]
struct Expected {
    transitions: u64,
    /// Transitions, RSTs and accepts: observer_events_total.
    events: u64,
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
        Self {
            transitions,
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
struct Measure {
    connections_per_second: f64,
    threads: usize,
    failed: u64,
    expected_transitions: u64,
    expected_closes: u64,
    /// observer: observer_events_total over the main run; bpftrace: its count over
    /// both runs.
    events: Option<u64>,
    expected_events: u64,
    transitions: Option<u64>,
    closes: Option<u64>,
    /// observer: over the main run; libbpf-tools: over both runs.
    lost: Option<u64>,
    /// The cost run's figures, for configurations with BPF programs.
    cost: Option<CostRun>,
    cpu_seconds: Option<f64>,
    peak_rss_kib: Option<u64>,
    /// Resident at the end of the churn (idle connections still open).
    rss_kib: Option<u64>,
    tracked_sockets: Option<u64>,
    /// Lost while the idle connections were all opened at once, before the churn.
    setup_lost: Option<u64>,
    /// Lost while the idle connections all closed at once, after the churn.
    teardown_lost: Option<u64>,
    /// What a `getppid()` costs while the tool runs (every process on the host pays it
    /// for every system call).
    syscall_ns: f64,
    /// The no-observer rate this one is compared with: the mean of the `none` runs just
    /// before and just after it (a `none` run's own rate).
    baseline: f64,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let tools = bootstrap::build_tools()?;
    if options.pipeline {
        return exec(
            cargo()
                .args(["bench", "--package", "observer", "--bench", "tracker"])
                .env("OBSERVER_BPF_TOOLCHAIN", &tools.bpf_toolchain),
        );
    }
    if !is_root() {
        bail!(
            "the churn bench needs root (network namespace, eBPF); rerun as root, or use --pipeline"
        );
    }
    let configs = selected(&options)?;
    bootstrap::bench_tools()?;
    system::catch_interrupts();
    exec(
        cargo()
            .args(["build", "--release", "--package", "observer", "--bin", "observer"])
            .env("OBSERVER_BPF_TOOLCHAIN", &tools.bpf_toolchain),
    )?;
    exec(cargo().args(["build", "--release", "--package", "observer-tests", "--bin", "churn"]))?;
    let libbpf_tools = if configs.contains(&Config::LibbpfTools) {
        Some(peers::LibbpfTools::install(&target_dir().join("bench"))?)
    } else {
        None
    };

    let foreign = system::foreign_tracing_programs();
    warn_foreign(&foreign);
    let namespace = Namespace::create()?;
    let bench =
        Bench { options: &options, namespace: &namespace, libbpf_tools: libbpf_tools.as_ref() };

    let mut results: HashMap<&'static str, Vec<Measure>> = HashMap::new();
    let tools: Vec<Config> = configs.iter().copied().filter(|&c| c != Config::None).collect();
    let measure = |round: u32, config: Config| -> anyhow::Result<Measure> {
        system::check_interrupted()?;
        let measure =
            bench.measure(config).with_context(|| format!("round {round}, {}", config.name()))?;
        report(round, options.rounds, config, &measure);
        Ok(measure)
    };
    for round in 1..=options.rounds {
        // This machine's speed drifts by ±10 % within minutes: each tool runs between
        // two `none` runs and is compared with their mean. Each round also starts one
        // tool later, so no tool always runs first (or right after a heavier one).
        let start = (round as usize - 1) % tools.len().max(1);
        let mut before = measure(round, Config::None)?;
        before.baseline = before.connections_per_second;
        for &config in tools[start..].iter().chain(&tools[..start]) {
            let mut measured = measure(round, config)?;
            let mut after = measure(round, Config::None)?;
            after.baseline = after.connections_per_second;
            measured.baseline =
                (before.connections_per_second + after.connections_per_second) / 2.0;
            results.entry(Config::None.name()).or_default().push(before);
            results.entry(config.name()).or_default().push(measured);
            before = after;
        }
        results.entry(Config::None.name()).or_default().push(before);
    }
    let after = system::foreign_tracing_programs();
    warn_foreign(&after);
    println!();
    println!("{}\n", system::machine());
    print!("{}", table(&configs, &results, options.idle, !foreign.is_empty() || !after.is_empty()));
    Ok(())
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

/// One line per run, as it ends.
fn report(round: u32, rounds: u32, config: Config, measure: &Measure) {
    let lost = match (measure.lost, measure.cost) {
        (Some(lost), Some(cost)) if lost > 0 => format!(
            ", {lost} events lost ({} runs skipped by the kernel as nested)",
            cost.bpf.recursion_misses
        ),
        (Some(lost), _) if lost > 0 => format!(", {lost} events lost"),
        _ => String::new(),
    };
    let cost = measure
        .cost
        .map(|cost| format!(", {:.0} with BPF statistics on", cost.connections_per_second))
        .unwrap_or_default();
    println!(
        "bench: round {round}/{rounds}: {:<14} {:>9.0} connections/s ({} threads){cost}{lost}",
        config.name(),
        measure.connections_per_second,
        measure.threads
    );
}

fn selected(options: &Options) -> anyhow::Result<Vec<Config>> {
    let mut configs = vec![Config::None];
    for config in Config::ALL.into_iter().skip(1) {
        let wanted =
            options.only.is_empty() || options.only.iter().any(|name| name == config.name());
        if wanted && !(config == Config::ObserverIdle && options.idle == 0) {
            configs.push(config);
        }
    }
    for name in &options.only {
        if !Config::ALL.iter().any(|config| config.name() == name) {
            bail!(
                "--only {name}: unknown configuration (observer, observer-hooks, bpftrace, libbpf-tools, observer-idle)"
            );
        }
    }
    Ok(configs)
}

fn warn_foreign(programs: &[String]) {
    if programs.is_empty() {
        return;
    }
    eprintln!(
        "bench: WARNING: BPF tracing programs of other processes are loaded; they run on the \
         bench's transitions too (the \"none\" baseline included), so the figures are disturbed:"
    );
    for program in programs {
        eprintln!("bench:   {program}");
    }
}

struct Bench<'a> {
    options: &'a Options,
    namespace: &'a Namespace,
    libbpf_tools: Option<&'a peers::LibbpfTools>,
}

/// The tool under test, running.
struct Running {
    processes: Vec<Process>,
    daemon: Option<Daemon>,
    /// libbpf-tools report lost events on stderr; these threads add them up.
    lost_counters: Vec<std::thread::JoinHandle<u64>>,
    /// With observer-idle: the idle connections, open while the daemon runs.
    idle: Option<IdleConnections>,
}

impl Bench<'_> {
    fn measure(&self, config: Config) -> anyhow::Result<Measure> {
        let mut running = self.start(config)?;
        let pids: Vec<u32> = running.processes.iter().map(Process::pid).collect();
        let metrics_before = match &running.daemon {
            Some(daemon) => Some(daemon.metrics()?),
            None => None,
        };
        let cpu_before = running.daemon.as_ref().and_then(|d| system::cpu_seconds(d.pid));

        let churn = self.churn()?;
        system::check_interrupted()?;

        let mut measure = Measure {
            connections_per_second: churn.connections_per_second,
            syscall_ns: syscall_ns(),
            threads: churn.threads,
            failed: churn.failed.total(),
            ..Measure::default()
        };
        let expected = Expected::of(&churn);
        measure.expected_transitions = expected.transitions;
        measure.expected_events = expected.events;
        measure.expected_closes = expected.closes;
        if let Some(error) = &churn.first_error {
            eprintln!(
                "bench: {}: {} connections failed, first: {error}",
                config.name(),
                measure.failed
            );
        }

        if let (Some(daemon), Some(before)) = (&running.daemon, &metrics_before) {
            // Verdicts come 100 ms after each close; wait until the churn's are all in
            // (or stop coming), then read everything.
            let churn_closes = |metrics: &Metrics| {
                closes_on(metrics, &churn.ports) - closes_on(before, &churn.ports)
            };
            let mut last = 0.0;
            let mut stable = 0;
            system::wait_for(Duration::from_secs(15), || {
                let Ok(metrics) = daemon.metrics() else { return false };
                let closes = churn_closes(&metrics);
                stable = if closes == last { stable + 1 } else { 0 };
                last = closes;
                closes >= measure.expected_closes as f64 || stable >= 10
            });
            let after = daemon.metrics()?;
            let delta = |name: &str| (after.sum(name) - before.sum(name)).max(0.0) as u64;
            measure.events = Some(delta("observer_events_total"));
            measure.transitions = Some(delta("observer_tcp_transitions_total"));
            measure.lost = Some(delta("observer_events_lost_total"));
            measure.closes = Some(churn_closes(&after) as u64);
            measure.cpu_seconds = match (cpu_before, system::cpu_seconds(daemon.pid)) {
                (Some(before), Some(after)) => Some(after - before),
                _ => None,
            };
            measure.tracked_sockets = Some(after.sum("observer_tracker_sockets") as u64);
            measure.rss_kib = system::rss_kib(daemon.pid);
            measure.peak_rss_kib = system::peak_rss_kib(daemon.pid);
        }
        if !pids.is_empty() {
            measure.cost = Some(self.cost_run(&pids)?);
            if let Some(daemon) = &running.daemon {
                settle(daemon);
            }
        }
        if let (Some(daemon), Some(idle)) = (&running.daemon, running.idle.take()) {
            measure.setup_lost = Some(idle.setup_lost);
            measure.tracked_sockets = measure.tracked_sockets.max(Some(idle.tracked));
            measure.teardown_lost = Some(idle.release(daemon)?);
            measure.peak_rss_kib = system::peak_rss_kib(daemon.pid);
        }
        for process in &mut running.processes {
            if !process.is_running() {
                bail!("{} exited during the run", process.name);
            }
        }
        if config == Config::Bpftrace {
            measure.events = running.stop_bpftrace();
            if measure.events.is_none() {
                eprintln!("bench: bpftrace printed no count; this round has no events figure");
            }
        }
        for process in &mut running.processes {
            process.stop(libc::SIGINT);
        }
        let peer_lost: Option<u64> =
            running.lost_counters.drain(..).map(|counter| counter.join().ok()).sum();
        if config == Config::LibbpfTools {
            measure.lost = peer_lost;
        }
        drop(running);
        Ok(measure)
    }

    fn start(&self, config: Config) -> anyhow::Result<Running> {
        let mut running =
            Running { processes: Vec::new(), daemon: None, lost_counters: Vec::new(), idle: None };
        match config {
            Config::None => {}
            Config::Observer | Config::ObserverIdle | Config::ObserverHooks => {
                let port = free_port()?;
                let mut command = std::process::Command::new(target_dir().join("release/observer"));
                command
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                    // Losses are in the table; one warning per lost record would flood it.
                    .arg("--log.level=error")
                    .args(&self.options.daemon_args)
                    .args((config == Config::ObserverHooks).then_some("--debug.empty-programs"))
                    .stdout(system::null());
                let mut process = Process::spawn("observer", &mut command)?;
                let daemon = Daemon::new(process.pid(), port);
                if !system::wait_for(Duration::from_secs(30), || {
                    process.is_running() && daemon.metrics().is_ok()
                }) {
                    system::check_interrupted()?;
                    bail!("the observer daemon did not start serving metrics (see its log above)");
                }
                if config == Config::ObserverIdle {
                    running.idle = Some(self.hold_idle(&daemon)?);
                }
                // Its programs record nothing: only the throughput and their run time count.
                if config.is_observer() {
                    running.daemon = Some(daemon);
                }
                running.processes.push(process);
            }
            Config::Bpftrace => {
                let mut command =
                    system::with_tracefs("bpftrace".as_ref(), &["-e", peers::BPFTRACE_PROGRAM]);
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
                running.processes.push(Process::spawn("bpftrace", &mut command)?);
            }
            Config::LibbpfTools => {
                let tools = self.libbpf_tools.context("libbpf-tools not installed")?;
                for name in ["tcpstates", "tcplife"] {
                    let (loader, args) = tools.command(name);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let mut command = system::with_tracefs(&loader, &args);
                    command.stdout(system::null()).stderr(Stdio::piped());
                    let mut process = Process::spawn(name, &mut command)?;
                    if let Some(stderr) = process.child().stderr.take() {
                        running.lost_counters.push(std::thread::spawn(move || {
                            peers::count_lost(std::io::BufReader::new(stderr))
                        }));
                    }
                    running.processes.push(process);
                }
            }
        }
        for process in &mut running.processes {
            let pid = process.pid();
            if !system::wait_for(Duration::from_secs(30), || {
                !process.is_running() || system::has_attached(pid)
            }) || !process.is_running()
            {
                system::check_interrupted()?;
                bail!("{} did not attach (or exited)", process.name);
            }
        }
        Ok(running)
    }

    /// The load again, with BPF run-time statistics on for exactly that run (the
    /// descriptor that enables them is closed at its end): what `pids`' programs cost.
    fn cost_run(&self, pids: &[u32]) -> anyhow::Result<CostRun> {
        let stats = BpfStats::enable()?;
        let before = program_stats(pids);
        let churn = self.churn()?;
        let bpf = program_stats(pids).since(before);
        drop(stats);
        system::check_interrupted()?;
        Ok(CostRun {
            connections_per_second: churn.connections_per_second,
            expected_transitions: Expected::of(&churn).transitions,
            bpf,
        })
    }

    /// Runs the load and returns its report.
    fn churn(&self) -> anyhow::Result<Churn> {
        let mut command =
            self.namespace.command(&target_dir().join("release/churn").display().to_string());
        command
            .arg(format!("--duration={}s", self.options.duration.as_secs_f64()))
            .arg(format!("--mix={}", self.options.mix))
            .stdout(Stdio::piped());
        if let Some(threads) = self.options.threads {
            command.arg(format!("--threads={threads}"));
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

    /// Opens the idle connections (in the bench namespace, tracked by `daemon`) and
    /// waits until the daemon has taken them all in.
    fn hold_idle(&self, daemon: &Daemon) -> anyhow::Result<IdleConnections> {
        let before = daemon.metrics()?.sum("observer_events_lost_total");
        let mut command =
            self.namespace.command(&target_dir().join("release/churn").display().to_string());
        command
            .arg(format!("--idle={}", self.options.idle))
            .arg("--idle-only")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut holder = Process::spawn("churn --idle-only", &mut command)?;
        let mut line = String::new();
        if let Some(stdout) = holder.child().stdout.take() {
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        }
        if line.trim().is_empty() {
            bail!("opening {} idle connections failed", self.options.idle);
        }
        settle(daemon);
        let metrics = daemon.metrics()?;
        let setup_lost = (metrics.sum("observer_events_lost_total") - before).max(0.0) as u64;
        let tracked = metrics.sum("observer_tracker_sockets") as u64;
        Ok(IdleConnections { holder, setup_lost, tracked })
    }
}

/// Waits until the daemon's transition count stops moving (its lost count is
/// refreshed every 100 ms, so that is read a little later).
fn settle(daemon: &Daemon) {
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

/// Idle connections held open by a `churn --idle-only` process.
struct IdleConnections {
    holder: Process,
    /// Events lost while they were all opened at once.
    setup_lost: u64,
    /// observer_tracker_sockets once they were all open.
    tracked: u64,
}

impl IdleConnections {
    /// Closes them all at once; returns the events lost meanwhile.
    fn release(mut self, daemon: &Daemon) -> anyhow::Result<u64> {
        let before = daemon.metrics()?.sum("observer_events_lost_total");
        drop(self.holder.child().stdin.take());
        let status = self.holder.child().wait()?;
        if !status.success() {
            bail!("the idle connection holder failed ({status})");
        }
        settle(daemon);
        Ok((daemon.metrics()?.sum("observer_events_lost_total") - before).max(0.0) as u64)
    }
}

impl Running {
    /// Stops bpftrace with SIGINT, which makes it print its count. It usually exits in
    /// 0.2 s, but once in a bench run took over 10 s: it gets a minute.
    fn stop_bpftrace(&mut self) -> Option<u64> {
        let process = self.processes.first_mut()?;
        process.stop_within(libc::SIGINT, Duration::from_secs(60));
        let mut text = String::new();
        process.child().stdout.as_mut()?.read_to_string(&mut text).ok()?;
        peers::bpftrace_count(&text)
    }
}

fn program_stats(pids: &[u32]) -> ProgramStats {
    let mut total = ProgramStats::default();
    for &pid in pids {
        total.add(ProgramStats::of_process(pid));
    }
    total
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The bench's observer daemon, scraped once a second as Prometheus would.
struct Daemon {
    pid: u32,
    url: String,
    agent: ureq::Agent,
    scraping: Arc<AtomicBool>,
    scraper: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn new(pid: u32, port: u16) -> Self {
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

    fn metrics(&self) -> anyhow::Result<Metrics> {
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

/// One line of a Prometheus text exposition.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// The samples of a Prometheus text exposition.
struct Metrics(Vec<Sample>);

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

    fn sum(&self, name: &str) -> f64 {
        self.0.iter().filter(|sample| sample.name == name).map(|sample| sample.value).sum()
    }
}

/// Verdicts on connections to the churn's ports (its namespace's, not the host's).
fn closes_on(metrics: &Metrics, ports: &Ports) -> f64 {
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn table(
    configs: &[Config],
    results: &HashMap<&'static str, Vec<Measure>>,
    idle: usize,
    disturbed: bool,
) -> String {
    let rates = |config: Config| -> Vec<f64> {
        results
            .get(config.name())
            .map(|m| m.iter().map(|m| m.connections_per_second).collect())
            .unwrap_or_default()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| configuration | connections/s (median) | ratio (median per round) | ratio, BPF statistics on | BPF ns/run | BPF ns/transition | events seen/expected | verdicts/expected | lost | daemon CPU s/M events | % core per 100k transitions/s | RSS MiB | peak RSS MiB | getppid() ns |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &config in configs {
        let Some(measures) = results.get(config.name()) else { continue };
        let total = |f: &dyn Fn(&Measure) -> Option<u64>| -> Option<u64> {
            measures.iter().map(f).sum::<Option<u64>>()
        };
        let costs: Vec<CostRun> = measures.iter().filter_map(|m| m.cost).collect();
        let bpf = costs.iter().fold(None, |acc: Option<ProgramStats>, cost| {
            let mut acc = acc.unwrap_or_default();
            acc.add(cost.bpf);
            Some(acc)
        });
        let bpf_ns = bpf
            .filter(|s| s.run_count > 0)
            .map(|s| format!("{:.0}", s.run_time_ns as f64 / s.run_count as f64))
            .unwrap_or_else(|| "-".into());
        let expected_events: u64 = measures.iter().map(|m| m.expected_events).sum();
        let cost_transitions: u64 = costs.iter().map(|cost| cost.expected_transitions).sum();
        // All programs of the configuration (standby twins and reset programs included)
        // per transition the cost runs made: what one transition costs in the kernel.
        let bpf_per_transition = bpf
            .filter(|s| s.run_count > 0)
            .map(|s| format!("{:.0}", s.run_time_ns as f64 / cost_transitions.max(1) as f64))
            .unwrap_or_else(|| "-".into());
        let events = match config {
            // bpftrace counts until it stops: both runs; a round it printed no count for
            // is left out.
            Config::Bpftrace => {
                let counted: Vec<&Measure> =
                    measures.iter().filter(|m| m.events.is_some()).collect();
                (!counted.is_empty()).then(|| {
                    let seen = counted.iter().filter_map(|m| m.events).sum();
                    let expected = counted
                        .iter()
                        .map(|m| {
                            m.expected_transitions + m.cost.map_or(0, |c| c.expected_transitions)
                        })
                        .sum();
                    (seen, expected)
                })
            }
            _ if config.is_observer() => total(&|m| m.events).map(|seen| (seen, expected_events)),
            _ => None,
        };
        let events = events
            .map(|(seen, expected)| {
                format!("{seen}/{expected} ({:.2}%)", 100.0 * seen as f64 / expected.max(1) as f64)
            })
            .unwrap_or_else(|| "-".into());
        let expected_closes: u64 = measures.iter().map(|m| m.expected_closes).sum();
        let verdicts = total(&|m| m.closes)
            .map(|seen| format!("{:.2}%", 100.0 * seen as f64 / expected_closes.max(1) as f64))
            .unwrap_or_else(|| "-".into());
        let lost = total(&|m| m.lost).map(|l| l.to_string()).unwrap_or_else(|| "-".into());
        let cpu: Option<f64> = measures.iter().map(|m| m.cpu_seconds).sum();
        let transitions = total(&|m| m.transitions);
        let (cpu_per_m, core_per_100k) = match (cpu, total(&|m| m.events), transitions) {
            (Some(cpu), Some(events), Some(transitions)) if events > 0 && transitions > 0 => (
                format!("{:.2}", cpu / (events as f64 / 1e6)),
                // CPU seconds for 100k transitions = core fraction at 100k transitions/s.
                format!("{:.1}%", 100.0 * cpu / (transitions as f64 / 1e5)),
            ),
            _ => ("-".into(), "-".into()),
        };
        let mib = |kib: Option<u64>| {
            kib.map(|kib| format!("{:.1}", kib as f64 / 1024.0)).unwrap_or_else(|| "-".into())
        };
        let rss = mib(measures.iter().filter_map(|m| m.rss_kib).max());
        let peak_rss = mib(measures.iter().filter_map(|m| m.peak_rss_kib).max());
        // Each run's ratio is against the `none` runs either side of it, then the median
        // over the rounds: a neighbour's compile burst spoils one round, not the table.
        let rate = median(rates(config));
        let syscall = median(measures.iter().map(|m| m.syscall_ns).collect());
        let ratio = median(
            measures.iter().map(|m| m.connections_per_second / m.baseline.max(1.0)).collect(),
        );
        let ratio_with_stats = match config {
            Config::None => "1.000".to_string(),
            _ if !costs.is_empty() && costs.len() == measures.len() => format!(
                "{:.3}",
                median(
                    measures
                        .iter()
                        .filter_map(|m| Some(m.cost?.connections_per_second / m.baseline.max(1.0)))
                        .collect()
                )
            ),
            _ => "-".to_string(),
        };
        let name = match config {
            Config::ObserverIdle => format!(
                "observer + {idle} idle connections ({} tracked sockets)",
                measures.iter().filter_map(|m| m.tracked_sockets).max().unwrap_or(0)
            ),
            Config::ObserverHooks => "observer's hooks, programs returning at once".to_string(),
            _ => config.name().to_string(),
        };
        let _ = writeln!(
            out,
            "| {name} | {rate:.0} | {ratio:.3} | {ratio_with_stats} | {bpf_ns} | {bpf_per_transition} | {events} | {verdicts} | {lost} | {cpu_per_m} | {core_per_100k} | {rss} | {peak_rss} | {syscall:.0} |",
        );
    }
    let teardown_lost: Option<u64> =
        results.values().flatten().filter_map(|m| m.teardown_lost).reduce(|a, b| a + b);
    let setup_lost: Option<u64> =
        results.values().flatten().filter_map(|m| m.setup_lost).reduce(|a, b| a + b);
    if let (Some(setup), Some(teardown)) = (setup_lost, teardown_lost) {
        let _ = writeln!(
            out,
            "\nOutside the churn, events lost when the {idle} idle connections were all opened \
             at once: {setup}; when they were all closed at once: {teardown}."
        );
    }
    let failed: u64 = results.values().flatten().map(|m| m.failed).sum();
    if failed > 0 {
        let _ =
            writeln!(out, "\n{failed} connection attempts did not end as intended (not counted).");
    }
    if disturbed {
        let _ = writeln!(
            out,
            "\nDISTURBED: other processes' BPF tracing programs were loaded during the run (listed above)."
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    fn cost(connections_per_second: f64, expected_transitions: u64, ns: u64, runs: u64) -> CostRun {
        CostRun {
            connections_per_second,
            expected_transitions,
            bpf: ProgramStats {
                programs: 4,
                run_time_ns: ns,
                run_count: runs,
                recursion_misses: 3,
            },
        }
    }

    /// Two rounds of every configuration, with every optional figure present in some
    /// and missing in others.
    fn fixture() -> HashMap<&'static str, Vec<Measure>> {
        let base = |rate: f64, baseline: f64| Measure {
            connections_per_second: rate,
            threads: 2,
            expected_transitions: 1_000_000,
            expected_closes: 200_000,
            expected_events: 1_300_000,
            syscall_ns: 48.4,
            baseline,
            ..Measure::default()
        };
        let none =
            vec![base(100_000.0, 100_000.0), base(98_000.0, 98_000.0), base(102_500.0, 102_500.0)];
        let observer = vec![
            Measure {
                events: Some(1_299_000),
                transitions: Some(999_500),
                closes: Some(199_990),
                lost: Some(0),
                cost: Some(cost(88_000.0, 990_000, 450_000_000, 2_100_000)),
                cpu_seconds: Some(1.25),
                peak_rss_kib: Some(20_480),
                rss_kib: Some(18_000),
                tracked_sockets: Some(12),
                ..base(91_000.0, 99_000.0)
            },
            Measure {
                events: Some(1_300_000),
                transitions: Some(1_000_000),
                closes: Some(200_000),
                lost: Some(7),
                cost: Some(cost(87_500.0, 1_010_000, 470_000_000, 2_150_000)),
                cpu_seconds: Some(1.5),
                peak_rss_kib: Some(21_000),
                rss_kib: Some(17_500),
                tracked_sockets: Some(10),
                failed: 3,
                syscall_ns: 51.0,
                ..base(90_000.0, 100_250.0)
            },
        ];
        let hooks = vec![
            Measure {
                cost: Some(cost(95_000.0, 1_000_000, 90_000_000, 2_000_000)),
                ..base(97_000.0, 99_000.0)
            },
            Measure { cost: None, ..base(96_000.0, 100_250.0) },
        ];
        let bpftrace = vec![
            Measure {
                events: Some(1_990_000),
                cost: Some(cost(70_000.0, 1_000_000, 300_000_000, 1_000_000)),
                ..base(80_000.0, 99_000.0)
            },
            Measure {
                events: None,
                cost: Some(cost(71_000.0, 1_000_000, 310_000_000, 1_000_000)),
                ..base(81_000.0, 100_250.0)
            },
        ];
        let libbpf_tools = vec![
            Measure {
                lost: Some(107),
                cost: Some(cost(60_000.0, 1_000_000, 600_000_000, 3_000_000)),
                ..base(65_000.0, 99_000.0)
            },
            Measure {
                lost: Some(612),
                cost: Some(cost(61_000.0, 1_000_000, 610_000_000, 3_000_000)),
                ..base(66_000.0, 100_250.0)
            },
        ];
        let idle = vec![Measure {
            events: Some(1_300_000),
            transitions: Some(1_000_000),
            closes: Some(200_000),
            lost: Some(0),
            cost: Some(cost(85_000.0, 1_000_000, 500_000_000, 2_200_000)),
            cpu_seconds: Some(1.75),
            peak_rss_kib: Some(60_000),
            rss_kib: Some(58_000),
            tracked_sockets: Some(100_012),
            setup_lost: Some(5),
            teardown_lost: Some(9),
            ..base(89_000.0, 99_000.0)
        }];
        HashMap::from([
            ("none", none),
            ("observer", observer),
            ("observer-hooks", hooks),
            ("bpftrace", bpftrace),
            ("libbpf-tools", libbpf_tools),
            ("observer-idle", idle),
        ])
    }

    #[test]
    fn table_text_is_pinned() {
        let text = table(&Config::ALL, &fixture(), 50_000, true);
        assert_eq!(
            text,
            "| configuration | connections/s (median) | ratio (median per round) | ratio, BPF statistics on | BPF ns/run | BPF ns/transition | events seen/expected | verdicts/expected | lost | daemon CPU s/M events | % core per 100k transitions/s | RSS MiB | peak RSS MiB | getppid() ns |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | none | 100000 | 1.000 | 1.000 | - | - | - | - | - | - | - | - | - | 48 |\n\
             | observer | 90500 | 0.908 | 0.881 | 216 | 460 | 2599000/2600000 (99.96%) | 100.00% | 7 | 1.06 | 13.8% | 17.6 | 20.5 | 50 |\n\
             | observer's hooks, programs returning at once | 96500 | 0.969 | - | 45 | 90 | - | - | - | - | - | - | - | 48 |\n\
             | bpftrace | 80500 | 0.808 | 0.708 | 305 | 305 | 1990000/2000000 (99.50%) | - | - | - | - | - | - | 48 |\n\
             | libbpf-tools | 65500 | 0.657 | 0.607 | 202 | 605 | - | - | 719 | - | - | - | - | 48 |\n\
             | observer + 50000 idle connections (100012 tracked sockets) | 89000 | 0.899 | 0.859 | 227 | 500 | 1300000/1300000 (100.00%) | 100.00% | 0 | 1.35 | 17.5% | 56.6 | 58.6 | 48 |\n\
             \n\
             Outside the churn, events lost when the 50000 idle connections were all opened at once: 5; when they were all closed at once: 9.\n\
             \n\
             3 connection attempts did not end as intended (not counted).\n\
             \n\
             DISTURBED: other processes' BPF tracing programs were loaded during the run (listed above).\n"
        );
    }

    #[test]
    fn table_skips_configurations_without_runs() {
        let mut results = fixture();
        results.retain(|&name, _| name == "none");
        let text = table(&Config::ALL, &results, 0, false);
        assert_eq!(
            text,
            "| configuration | connections/s (median) | ratio (median per round) | ratio, BPF statistics on | BPF ns/run | BPF ns/transition | events seen/expected | verdicts/expected | lost | daemon CPU s/M events | % core per 100k transitions/s | RSS MiB | peak RSS MiB | getppid() ns |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | none | 100000 | 1.000 | 1.000 | - | - | - | - | - | - | - | - | - | 48 |\n"
        );
    }

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
