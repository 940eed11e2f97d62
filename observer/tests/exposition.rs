//! The whole `/metrics` exposition for recorded kernel event streams, compared byte for
//! byte with `tests/golden/metrics.prom` (node_exporter's fixture habit): a renamed
//! metric, a changed help text, label or bucket, or a verdict that moves shows here as a
//! diff. The process collector's own metrics (CPU, memory, descriptors) change from run
//! to run and are left out.
//!
//! Regenerate after an intended change, then review the diff:
//! `OBSERVER_BLESS=1 cargo test -p observer --test exposition`.

use std::{collections::BTreeMap, fs, num::NonZeroUsize, path::Path};

use observer::{
    capture::decode::SocketEvent,
    export::metrics::{CloseLabels, Metrics},
    inventory::{NamespaceSummary, Summary},
    tcp::TcpState,
    track::Tracker,
};

/// The streams of one kernel: every close path the scenarios make, in a fixed order.
const KERNEL: &str = "6.12.117+deb13-cloud-amd64";
/// Small enough that the recorded ports overflow it (the "other" port label shows).
const MAX_PORTS: usize = 8;

fn replay(metrics: &Metrics) {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/streams").join(KERNEL);
    let mut files: Vec<_> =
        fs::read_dir(&directory).unwrap().map(|entry| entry.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no recorded streams under {}", directory.display());
    let mut tracker = Tracker::new(NonZeroUsize::new(1 << 16).unwrap());
    let mut decided = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        // The first line lists the expected verdicts (see replay.rs); events follow.
        for line in text.lines().skip(1) {
            let event: SocketEvent = serde_json::from_str(line).unwrap();
            let effect = tracker.ingest(&event, &mut decided);
            metrics.record(&event, effect);
            for closed in decided.drain(..) {
                metrics.record_close(&closed);
            }
        }
    }
    tracker.flush(&mut decided);
    for closed in decided.drain(..) {
        metrics.record_close(&closed);
    }
    metrics.set_tracker(tracker.stats(), tracker.len());
    metrics.set_lost(3, 1);
}

/// An inventory of two namespaces, CLOSE_WAIT ages on two ports among them.
fn inventory() -> Summary {
    let namespace = |netns, states: &[(TcpState, u64, f64)], close_wait_ages: Vec<(u16, f64)>| {
        NamespaceSummary {
            netns,
            states: states
                .iter()
                .map(|&(state, count, oldest)| (state, (count, oldest)))
                .collect::<BTreeMap<_, _>>(),
            close_wait_ages,
            listening: Vec::new(),
        }
    };
    Summary {
        namespaces: vec![
            namespace(
                4026531840,
                &[
                    (TcpState::Established, 12, 3600.5),
                    (TcpState::Listen, 3, 86400.0),
                    (TcpState::TimeWait, 40, 59.0),
                ],
                vec![],
            ),
            namespace(
                4026532001,
                &[(TcpState::CloseWait, 3, 7200.0)],
                vec![(8080, 0.5), (8080, 7200.0), (5432, 42.0)],
            ),
        ],
        failures: 1,
    }
}

fn without_process_metrics(exposition: &str) -> String {
    exposition
        .lines()
        .filter(|line| {
            let name = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
                .unwrap_or(line);
            !name.starts_with("process_")
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

#[test]
fn the_exposition_of_recorded_streams_is_unchanged() {
    let metrics = Metrics::new(MAX_PORTS, CloseLabels::default());
    replay(&metrics);
    metrics.set_inventory(&inventory());
    let exposition = without_process_metrics(&metrics.render());
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/metrics.prom");
    if std::env::var_os("OBSERVER_BLESS").is_some() {
        fs::write(&golden, &exposition).unwrap();
        return;
    }
    let expected = fs::read_to_string(&golden).unwrap_or_else(|error| {
        panic!("{}: {error}; create it with OBSERVER_BLESS=1", golden.display())
    });
    if exposition != expected {
        let first = exposition
            .lines()
            .zip(expected.lines())
            .position(|(got, want)| got != want)
            .unwrap_or_else(|| exposition.lines().count().min(expected.lines().count()));
        panic!(
            "the exposition differs from {} from line {} on:\n got: {:?}\nwant: {:?}\n\
             (intended? regenerate with OBSERVER_BLESS=1 cargo test -p observer --test exposition)",
            golden.display(),
            first + 1,
            exposition.lines().nth(first),
            expected.lines().nth(first),
        );
    }
}
