//! `cargo xtask bench`: connection churn with no observer, with observer, and with its
//! peers (a bpftrace one-liner, bcc's libbpf-tools), interleaved round by round, and a
//! table of ratios against "no observer" from the same run (docs/benchmarks.md).
//!
//! `cargo xtask bench --pipeline` runs the userspace pipeline's own figures instead
//! (observer/benches/tracker.rs).

mod daemon;
mod measure;
mod peers;
mod running;
mod system;
mod table;

use std::{collections::HashMap, time::Duration};

use anyhow::{Context as _, bail};

use crate::{
    bootstrap,
    command::{cargo, exec, is_root, target_dir},
};
use measure::Measure;
use system::Namespace;
use table::table;

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

/// What every measurement of a run shares.
struct Bench<'a> {
    options: &'a Options,
    namespace: &'a Namespace,
    libbpf_tools: Option<&'a peers::LibbpfTools>,
}
