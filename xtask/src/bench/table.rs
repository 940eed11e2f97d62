//! The results table (Markdown, as docs/benchmarks.md shows it): one row per
//! configuration, over all its rounds, then the footnotes; and the fixed-rate table,
//! one row per rate and configuration.

use std::{collections::HashMap, fmt::Write as _, time::Duration};

use super::{
    Config,
    measure::{CostRun, Measure},
    system::ProgramStats,
};

const HEADER: &str = "| configuration | connections/s (median) | ratio (median per round) | host CPU µs/conn | added µs/conn (vs none) | ratio, BPF statistics on | BPF ns/run | BPF ns/transition | events seen/expected | verdicts/expected | lost | daemon CPU s/M events | % core per 100k transitions/s | RSS MiB | peak RSS MiB | getppid() ns |";
const ALIGNMENT: &str =
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

pub fn table(
    configs: &[Config],
    results: &HashMap<&'static str, Vec<Measure>>,
    idle: usize,
    disturbed: bool,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{HEADER}");
    let _ = writeln!(out, "{ALIGNMENT}");
    for &config in configs {
        let Some(measures) = results.get(config.name()) else { continue };
        let _ = writeln!(out, "{}", Row::of(config, measures, idle));
    }
    let all = || results.values().flatten();
    if all().any(|m| m.host_cpu_seconds.is_some()) {
        let _ = writeln!(
            out,
            "\n{HOST_CPU} µs/conn: per connection completed, median over the rounds."
        );
    }
    let setup_lost: Option<u64> = all().filter_map(|m| m.setup_lost).reduce(|a, b| a + b);
    let teardown_lost: Option<u64> = all().filter_map(|m| m.teardown_lost).reduce(|a, b| a + b);
    if let (Some(setup), Some(teardown)) = (setup_lost, teardown_lost) {
        let _ = writeln!(
            out,
            "\nOutside the churn, events lost when the {idle} idle connections were all opened \
             at once: {setup}; when they were all closed at once: {teardown}."
        );
    }
    let failed: u64 = all().map(|m| m.failed).sum();
    if failed > 0 {
        let _ =
            writeln!(out, "\n{failed} connection attempts did not end as intended (not counted).");
    }
    if disturbed {
        let _ = writeln!(out, "\n{DISTURBED}");
    }
    out
}

/// What the host CPU columns are, under both tables.
const HOST_CPU: &str = "Host CPU: the whole host's busy time over the churn window, all CPUs: their \
     wall time less what /proc/stat counts as idle or iowait (so user, nice, system, irq, \
     softirq, steal); \"added\" is a run's figure minus the mean of the `none` runs either \
     side of it.";

const DISTURBED: &str =
    "DISTURBED: other processes' BPF tracing programs were loaded during the run (listed above).";

const RATE_HEADER: &str = "| rate (connections/s) | configuration | achieved connections/s | host CPU % of one core | added % of one core (vs none) | added µs/conn (vs none) |";
const RATE_ALIGNMENT: &str = "|---:|---|---:|---:|---:|---:|";

/// A paced run that made less than this share of its rate did not get the load it asked
/// for (the end of the window alone costs a connection per thread at most).
const KEPT_UP: f64 = 0.97;

/// A run whose host was busier than this share of all its cores was saturated.
const SATURATED: f64 = 0.95;

/// The fixed-rate table: per rate, each configuration's achieved rate and host CPU
/// (one run each, compared with the `none` runs either side of it); `cores` tells a
/// saturated host.
pub fn rate_table(
    configs: &[Config],
    at_rates: &[(u32, HashMap<&'static str, Vec<Measure>>)],
    duration: Duration,
    cores: usize,
    disturbed: bool,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "At fixed rates ({} per run, paced over the generator's threads):\n",
        humantime::format_duration(duration)
    );
    let _ = writeln!(out, "{RATE_HEADER}");
    let _ = writeln!(out, "{RATE_ALIGNMENT}");
    for (rate, results) in at_rates {
        for &config in configs {
            let Some(measures) = results.get(config.name()) else { continue };
            let _ = writeln!(out, "{}", rate_row(*rate, config, measures));
        }
    }
    let _ = writeln!(
        out,
        "\n{HOST_CPU} % of one core: busy time over wall time; µs/conn: per connection completed."
    );
    let saturated: Vec<String> = at_rates
        .iter()
        .filter(|(_, results)| saturated(results.values().flatten(), cores))
        .map(|(rate, _)| format!("{rate}/s"))
        .collect();
    if !saturated.is_empty() {
        let _ = writeln!(
            out,
            "\nSATURATED at {}: every core was busy in some run (other processes' load, or a \
             rate near the maximum), so those rows do not show what a tool adds at that rate.",
            saturated.join(", ")
        );
    }
    if disturbed {
        let _ = writeln!(out, "\n{DISTURBED}");
    }
    out
}

/// Whether any of the runs kept the whole host busy: at a fixed rate below the maximum,
/// only load from outside the bench does that, and it swamps the tool's share.
fn saturated<'a>(mut measures: impl Iterator<Item = &'a Measure>, cores: usize) -> bool {
    let all = 100.0 * cores as f64;
    measures.any(|m| m.host_core_percent().is_some_and(|core| core >= SATURATED * all))
}

/// One configuration at one rate: its cells as printed.
fn rate_row(rate: u32, config: Config, measures: &[Measure]) -> String {
    let achieved = median(measures.iter().map(|m| m.connections_per_second).collect());
    let slowest = measures.iter().map(|m| m.connections_per_second).fold(f64::INFINITY, f64::min);
    let kept_up = if slowest < KEPT_UP * f64::from(rate) {
        format!(
            " (generator could not keep up: {:.0}% of the rate in its slowest run)",
            100.0 * slowest / f64::from(rate)
        )
    } else {
        String::new()
    };
    let core = median_of(measures, Measure::host_core_percent).map(|core| format!("{core:.1}%"));
    let added =
        added(config, measures, |m| Some(m.host_core_percent()? - m.baseline_core_percent?))
            .map(|added| format!("{added:.1}%"));
    let added_us = added_per_connection(config, measures).map(|us| format!("{us:.1}"));
    format!(
        "| {rate} | {} | {achieved:.0}{kept_up} | {} | {} | {} |",
        name(config, measures, 0),
        cell(core),
        cell(added),
        cell(added_us)
    )
}

/// The µs of host CPU per connection a tool adds to its `none` runs'.
fn added_per_connection(config: Config, measures: &[Measure]) -> Option<f64> {
    added(config, measures, |m| Some(m.host_us_per_connection()? - m.baseline_host_us?))
}

/// The median over the runs of what a tool adds to `none` (None for `none` itself, or
/// when no run has the figure).
fn added(
    config: Config,
    measures: &[Measure],
    figure: impl Fn(&Measure) -> Option<f64>,
) -> Option<f64> {
    if config == Config::None {
        return None;
    }
    let values: Vec<f64> = measures.iter().filter_map(figure).collect();
    (!values.is_empty()).then(|| median(values))
}

/// The median over the runs that have the figure, None if none has.
fn median_of(measures: &[Measure], figure: impl Fn(&Measure) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = measures.iter().filter_map(figure).collect();
    (!values.is_empty()).then(|| median(values))
}

/// One configuration's row: its cells, in the header's order, as printed.
struct Row {
    name: String,
    rate: f64,
    ratio: f64,
    host_us: String,
    added_us: String,
    ratio_with_stats: String,
    bpf_ns: String,
    bpf_per_transition: String,
    events: String,
    verdicts: String,
    lost: String,
    cpu_per_m: String,
    core_per_100k: String,
    rss: String,
    peak_rss: String,
    syscall: f64,
}

impl Row {
    fn of(config: Config, measures: &[Measure], idle: usize) -> Self {
        let costs: Vec<CostRun> = measures.iter().filter_map(|m| m.cost).collect();
        let bpf = bpf_stats(&costs);
        let (cpu_per_m, core_per_100k) = cpu(measures);
        Self {
            name: name(config, measures, idle),
            rate: median(measures.iter().map(|m| m.connections_per_second).collect()),
            ratio: ratio(measures),
            host_us: cell(
                median_of(measures, Measure::host_us_per_connection).map(|us| format!("{us:.1}")),
            ),
            added_us: cell(added_per_connection(config, measures).map(|us| format!("{us:.1}"))),
            ratio_with_stats: ratio_with_stats(config, measures, &costs),
            bpf_ns: cell(bpf.map(|s| format!("{:.0}", s.run_time_ns as f64 / s.run_count as f64))),
            bpf_per_transition: cell(bpf_per_transition(bpf, &costs)),
            events: cell(events(config, measures)),
            verdicts: cell(verdicts(measures)),
            lost: cell(total(measures, |m| m.lost).map(|l| l.to_string())),
            cpu_per_m,
            core_per_100k,
            rss: cell(mib(measures.iter().filter_map(|m| m.rss_kib).max())),
            peak_rss: cell(mib(measures.iter().filter_map(|m| m.peak_rss_kib).max())),
            syscall: median(measures.iter().map(|m| m.syscall_ns).collect()),
        }
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            name,
            rate,
            ratio,
            host_us,
            added_us,
            ratio_with_stats,
            bpf_ns,
            bpf_per_transition,
            events,
            verdicts,
            lost,
            cpu_per_m,
            core_per_100k,
            rss,
            peak_rss,
            syscall,
        } = self;
        write!(
            f,
            "| {name} | {rate:.0} | {ratio:.3} | {host_us} | {added_us} | {ratio_with_stats} | {bpf_ns} | {bpf_per_transition} | {events} | {verdicts} | {lost} | {cpu_per_m} | {core_per_100k} | {rss} | {peak_rss} | {syscall:.0} |",
        )
    }
}

/// A figure, or "-" where the configuration has none.
fn cell(figure: Option<String>) -> String {
    figure.unwrap_or_else(|| "-".into())
}

/// A figure summed over the rounds, if every round has it.
fn total(measures: &[Measure], figure: impl Fn(&Measure) -> Option<u64>) -> Option<u64> {
    measures.iter().map(figure).sum()
}

fn name(config: Config, measures: &[Measure], idle: usize) -> String {
    match config {
        Config::ObserverIdle => format!(
            "observer + {idle} idle connections ({} tracked sockets)",
            measures.iter().filter_map(|m| m.tracked_sockets).max().unwrap_or(0)
        ),
        Config::ObserverHooks => "observer's hooks, programs returning at once".to_string(),
        _ => config.name().to_string(),
    }
}

/// Each run's ratio is against the `none` runs either side of it, then the median over
/// the rounds: a neighbour's compile burst spoils one round, not the table.
fn ratio(measures: &[Measure]) -> f64 {
    median(measures.iter().map(|m| m.connections_per_second / m.baseline.max(1.0)).collect())
}

/// The same ratio for the cost runs, if every round had one.
fn ratio_with_stats(config: Config, measures: &[Measure], costs: &[CostRun]) -> String {
    match config {
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
    }
}

/// The cost runs' program statistics added up, None without cost runs or runs.
fn bpf_stats(costs: &[CostRun]) -> Option<ProgramStats> {
    costs
        .iter()
        .fold(None, |acc: Option<ProgramStats>, cost| {
            let mut acc = acc.unwrap_or_default();
            acc.add(cost.bpf);
            Some(acc)
        })
        .filter(|s| s.run_count > 0)
}

/// All programs of the configuration (standby twins and reset programs included) per
/// transition the cost runs made: what one transition costs in the kernel.
fn bpf_per_transition(bpf: Option<ProgramStats>, costs: &[CostRun]) -> Option<String> {
    let cost_transitions: u64 = costs.iter().map(|cost| cost.expected_transitions).sum();
    bpf.map(|s| format!("{:.0}", s.run_time_ns as f64 / cost_transitions.max(1) as f64))
}

/// Events seen of those expected, for the tools that count them.
fn events(config: Config, measures: &[Measure]) -> Option<String> {
    let (seen, expected) = match config {
        // bpftrace counts until it stops: both runs; a round it printed no count for is
        // left out.
        Config::Bpftrace => {
            let counted: Vec<&Measure> = measures.iter().filter(|m| m.events.is_some()).collect();
            if counted.is_empty() {
                return None;
            }
            let seen = counted.iter().filter_map(|m| m.events).sum();
            let expected = counted
                .iter()
                .map(|m| m.expected_transitions + m.cost.map_or(0, |c| c.expected_transitions))
                .sum();
            (seen, expected)
        }
        _ if config.is_observer() => (
            total(measures, |m| m.events)?,
            measures.iter().map(|m| m.expected_events).sum::<u64>(),
        ),
        _ => return None,
    };
    Some(format!("{seen}/{expected} ({:.2}%)", 100.0 * seen as f64 / expected.max(1) as f64))
}

fn verdicts(measures: &[Measure]) -> Option<String> {
    let expected_closes: u64 = measures.iter().map(|m| m.expected_closes).sum();
    total(measures, |m| m.closes)
        .map(|seen| format!("{:.2}%", 100.0 * seen as f64 / expected_closes.max(1) as f64))
}

/// The daemon's CPU seconds per million events, and the share of a core it would take
/// at 100k transitions/s.
fn cpu(measures: &[Measure]) -> (String, String) {
    let cpu: Option<f64> = measures.iter().map(|m| m.cpu_seconds).sum();
    match (cpu, total(measures, |m| m.events), total(measures, |m| m.transitions)) {
        (Some(cpu), Some(events), Some(transitions)) if events > 0 && transitions > 0 => (
            format!("{:.2}", cpu / (events as f64 / 1e6)),
            // CPU seconds for 100k transitions = core fraction at 100k transitions/s.
            format!("{:.1}%", 100.0 * cpu / (transitions as f64 / 1e5)),
        ),
        _ => ("-".into(), "-".into()),
    }
}

fn mib(kib: Option<u64>) -> Option<String> {
    kib.map(|kib| format!("{:.1}", kib as f64 / 1024.0))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
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
        // A saturated 2-core host: 20 CPU-seconds in 10 s whatever the rate.
        let base = |rate: f64, baseline: f64| Measure {
            connections_per_second: rate,
            threads: 2,
            expected_transitions: 1_000_000,
            expected_closes: 200_000,
            expected_events: 1_300_000,
            syscall_ns: 48.4,
            baseline,
            connections: (rate * 10.0) as u64,
            seconds: 10.0,
            host_cpu_seconds: Some(20.0),
            baseline_host_us: Some(2e6 / baseline),
            baseline_core_percent: Some(200.0),
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
            Measure { cost: None, host_cpu_seconds: None, ..base(96_000.0, 100_250.0) },
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
            "| configuration | connections/s (median) | ratio (median per round) | host CPU µs/conn | added µs/conn (vs none) | ratio, BPF statistics on | BPF ns/run | BPF ns/transition | events seen/expected | verdicts/expected | lost | daemon CPU s/M events | % core per 100k transitions/s | RSS MiB | peak RSS MiB | getppid() ns |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | none | 100000 | 1.000 | 20.0 | - | 1.000 | - | - | - | - | - | - | - | - | - | 48 |\n\
             | observer | 90500 | 0.908 | 22.1 | 2.0 | 0.881 | 216 | 460 | 2599000/2600000 (99.96%) | 100.00% | 7 | 1.06 | 13.8% | 17.6 | 20.5 | 50 |\n\
             | observer's hooks, programs returning at once | 96500 | 0.969 | 20.6 | 0.4 | - | 45 | 90 | - | - | - | - | - | - | - | 48 |\n\
             | bpftrace | 80500 | 0.808 | 24.8 | 4.8 | 0.708 | 305 | 305 | 1990000/2000000 (99.50%) | - | - | - | - | - | - | 48 |\n\
             | libbpf-tools | 65500 | 0.657 | 30.5 | 10.5 | 0.607 | 202 | 605 | - | - | 719 | - | - | - | - | 48 |\n\
             | observer + 50000 idle connections (100012 tracked sockets) | 89000 | 0.899 | 22.5 | 2.3 | 0.859 | 227 | 500 | 1300000/1300000 (100.00%) | 100.00% | 0 | 1.35 | 17.5% | 56.6 | 58.6 | 48 |\n\
             \n\
             Host CPU: the whole host's busy time over the churn window, all CPUs: their wall time less what /proc/stat counts as idle or iowait (so user, nice, system, irq, softirq, steal); \"added\" is a run's figure minus the mean of the `none` runs either side of it. µs/conn: per connection completed, median over the rounds.\n\
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
        for measure in results.values_mut().flatten() {
            measure.host_cpu_seconds = None;
        }
        let text = table(&Config::ALL, &results, 0, false);
        assert_eq!(
            text,
            "| configuration | connections/s (median) | ratio (median per round) | host CPU µs/conn | added µs/conn (vs none) | ratio, BPF statistics on | BPF ns/run | BPF ns/transition | events seen/expected | verdicts/expected | lost | daemon CPU s/M events | % core per 100k transitions/s | RSS MiB | peak RSS MiB | getppid() ns |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | none | 100000 | 1.000 | - | - | 1.000 | - | - | - | - | - | - | - | - | - | 48 |\n"
        );
    }

    /// One fixed rate with every row kind: `none` around two tools, one of which the
    /// generator could not pace.
    #[test]
    fn rate_table_text_is_pinned() {
        // `core` % of one core over 10 s at `rate`; compared with `none` at 5 % (1000/s).
        let run = |rate: f64, core: f64| Measure {
            connections_per_second: rate,
            connections: (rate * 10.0) as u64,
            seconds: 10.0,
            host_cpu_seconds: Some(core / 10.0),
            baseline_host_us: Some(50.0),
            baseline_core_percent: Some(5.0),
            ..Measure::default()
        };
        let results = HashMap::from([
            ("none", vec![run(1000.2, 5.2), run(999.1, 4.8), run(1000.0, 5.0)]),
            ("observer", vec![run(1000.1, 5.9)]),
            ("observer-hooks", vec![Measure { host_cpu_seconds: None, ..run(950.0, 5.0) }]),
        ]);
        let text = rate_table(&Config::ALL, &[(1000, results)], Duration::from_secs(10), 2, false);
        assert_eq!(
            text,
            "At fixed rates (10s per run, paced over the generator's threads):\n\
             \n\
             | rate (connections/s) | configuration | achieved connections/s | host CPU % of one core | added % of one core (vs none) | added µs/conn (vs none) |\n\
             |---:|---|---:|---:|---:|---:|\n\
             | 1000 | none | 1000 | 5.0% | - | - |\n\
             | 1000 | observer | 1000 | 5.9% | 0.9% | 9.0 |\n\
             | 1000 | observer's hooks, programs returning at once | 950 (generator could not keep up: 95% of the rate in its slowest run) | - | - | - |\n\
             \n\
             Host CPU: the whole host's busy time over the churn window, all CPUs: their wall time less what /proc/stat counts as idle or iowait (so user, nice, system, irq, softirq, steal); \"added\" is a run's figure minus the mean of the `none` runs either side of it. % of one core: busy time over wall time; µs/conn: per connection completed.\n"
        );
    }

    /// A host kept busy by something else is called out under the table.
    #[test]
    fn rate_table_calls_out_a_saturated_host() {
        let run = |core: f64| Measure {
            connections_per_second: 1000.0,
            connections: 10_000,
            seconds: 10.0,
            host_cpu_seconds: Some(core / 10.0),
            ..Measure::default()
        };
        let quiet = HashMap::from([("none", vec![run(5.0)]), ("observer", vec![run(6.0)])]);
        let busy = HashMap::from([("none", vec![run(196.0)]), ("observer", vec![run(199.0)])]);
        let text = rate_table(
            &Config::ALL,
            &[(1000, quiet), (10_000, busy)],
            Duration::from_secs(10),
            2,
            true,
        );
        assert!(
            text.ends_with(
                "\n\nSATURATED at 10000/s: every core was busy in some run (other processes' load, \
                 or a rate near the maximum), so those rows do not show what a tool adds at that \
                 rate.\n\nDISTURBED: other processes' BPF tracing programs were loaded during the \
                 run (listed above).\n"
            ),
            "{text}"
        );
    }
}
