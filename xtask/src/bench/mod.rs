//! `cargo xtask bench`: connection churn with no observer, with observer, and with its
//! peers (a bpftrace one-liner, bcc's libbpf-tools), interleaved round by round, and a
//! table of ratios against "no observer" from the same run (docs/benchmarks.md), with
//! the whole host's CPU per connection; then none and observer again at fixed rates,
//! and what observer adds there in % of one core.
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
use table::{rate_table, table};

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
    /// Fixed rates in connections/s, comma-separated: after the rounds, none, observer
    /// and observer-hooks run once more at each, paced, for --duration (what observer
    /// adds in % of one core, the figure an operator budgets). "0" or "" skips them.
    #[arg(long, default_value = "1000,10000", value_parser = parse_rates)]
    rates: Rates,
}

/// `--rates`: the fixed rates in connections/s, in the order given, zeros left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Rates(Vec<u32>);

fn parse_rates(text: &str) -> Result<Rates, String> {
    let mut rates = Vec::new();
    for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let rate: u32 = item.parse().map_err(|_| {
            format!("{item:?} is not a whole number of connections per second (e.g. 1000,10000)")
        })?;
        if rate > 0 {
            rates.push(rate);
        }
    }
    Ok(Rates(rates))
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

    let mut results = Results::new();
    let tools: Vec<Config> = configs.iter().copied().filter(|&c| c != Config::None).collect();
    let measure = |label: &str, config: Config, rate: Option<u32>| -> anyhow::Result<Measure> {
        system::check_interrupted()?;
        let measure =
            bench.measure(config, rate).with_context(|| format!("{label}, {}", config.name()))?;
        report(label, config, &measure);
        Ok(measure)
    };
    for round in 1..=options.rounds {
        // Each round starts one tool later, so no tool always runs first (or right
        // after a heavier one).
        let start = (round as usize - 1) % tools.len().max(1);
        let order: Vec<Config> = tools[start..].iter().chain(&tools[..start]).copied().collect();
        let label = format!("round {round}/{}", options.rounds);
        interleave(&order, &mut results, |config| measure(&label, config, None))?;
    }
    let at_rates = fixed_rates(&configs, &options.rates, |rate, config| {
        measure(&format!("at {rate}/s"), config, Some(rate))
    })?;
    let after = system::foreign_tracing_programs();
    warn_foreign(&after);
    let disturbed = !foreign.is_empty() || !after.is_empty();
    println!();
    println!("{}\n", system::machine());
    print!("{}", table(&configs, &results, options.idle, disturbed));
    if !at_rates.is_empty() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        print!("\n{}", rate_table(&configs, &at_rates, options.duration, cores, disturbed));
    }
    Ok(())
}

/// Each configuration's runs, by name.
type Results = HashMap<&'static str, Vec<Measure>>;

/// `none`, then each of `tools` followed by `none` again. This machine's speed drifts
/// by ±10 % within minutes: each tool is compared with the mean of the `none` runs
/// either side of it, which are each compared with themselves.
fn interleave(
    tools: &[Config],
    results: &mut Results,
    mut measure: impl FnMut(Config) -> anyhow::Result<Measure>,
) -> anyhow::Result<()> {
    let mut before = measure(Config::None)?;
    before.be_baseline();
    for &config in tools {
        let mut measured = measure(config)?;
        let mut after = measure(Config::None)?;
        after.be_baseline();
        measured.compare_with(&before, &after);
        results.entry(Config::None.name()).or_default().push(before);
        results.entry(config.name()).or_default().push(measured);
        before = after;
    }
    results.entry(Config::None.name()).or_default().push(before);
    Ok(())
}

/// After the rounds: observer and its hooks-only floor (those selected) at each fixed
/// rate, once, interleaved with `none` as the rounds are. At a rate the host is not
/// saturated, so what a tool costs shows as CPU time, not as lost throughput.
fn fixed_rates(
    configs: &[Config],
    rates: &Rates,
    measure: impl Fn(u32, Config) -> anyhow::Result<Measure>,
) -> anyhow::Result<Vec<(u32, Results)>> {
    let tools: Vec<Config> = [Config::Observer, Config::ObserverHooks]
        .into_iter()
        .filter(|config| configs.contains(config))
        .collect();
    if tools.is_empty() {
        if !rates.0.is_empty() {
            eprintln!(
                "bench: --rates: neither observer nor observer-hooks is selected; no fixed-rate rows"
            );
        }
        return Ok(Vec::new());
    }
    let mut at_rates = Vec::new();
    for &rate in &rates.0 {
        let mut results = Results::new();
        interleave(&tools, &mut results, |config| measure(rate, config))?;
        at_rates.push((rate, results));
    }
    Ok(at_rates)
}

/// One line per run, as it ends.
fn report(label: &str, config: Config, measure: &Measure) {
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
    let host = match (measure.host_us_per_connection(), measure.host_core_percent()) {
        (Some(us), Some(core)) => {
            format!(", host CPU {us:.1} µs/connection ({core:.0}% of one core)")
        }
        _ => String::new(),
    };
    println!(
        "bench: {label}: {:<14} {:>9.0} connections/s ({} threads){cost}{host}{lost}",
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }

    fn rates(args: &[&str]) -> Result<Rates, String> {
        let args = std::iter::once("bench").chain(args.iter().copied());
        Cli::try_parse_from(args).map(|cli| cli.options.rates).map_err(|e| e.to_string())
    }

    #[test]
    fn rates_default_to_one_and_ten_thousand_and_zero_or_empty_skips() {
        assert_eq!(rates(&[]), Ok(Rates(vec![1000, 10_000])));
        assert_eq!(rates(&["--rates", "500, 2000"]), Ok(Rates(vec![500, 2000])));
        assert_eq!(rates(&["--rates", "0"]), Ok(Rates(Vec::new())));
        assert_eq!(rates(&["--rates", ""]), Ok(Rates(Vec::new())));
        assert_eq!(rates(&["--rates=0,1000"]), Ok(Rates(vec![1000])));
    }

    #[test]
    fn a_rate_that_does_not_parse_is_a_one_line_error() {
        for bad in ["fast", "1000,-5", "1e3", "99999999999"] {
            let error = rates(&["--rates", bad]).unwrap_err();
            let first = error.lines().next().unwrap_or_default();
            assert!(first.contains("not a whole number"), "{bad}: {error}");
        }
    }
}
