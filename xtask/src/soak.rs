//! `cargo xtask soak`: the bounded-memory benchmarks (tests/src/tests/soak.rs), which are
//! too slow for `cargo xtask test`: a 200,000-socket flood, then a steady churn of
//! connections for `--seconds` (30 minutes by default) with RSS sampled every minute.
//! Figures are printed and appended to `--report`; docs/reliability.md records them.

use std::path::PathBuf;

use anyhow::bail;

use crate::{bootstrap, command::is_root, test};

#[derive(clap::Args)]
pub struct Options {
    /// Length of the steady-churn run, in seconds.
    #[arg(long, default_value_t = 1800)]
    seconds: u64,
    /// Only the socket flood.
    #[arg(long, conflicts_with = "churn_only")]
    flood_only: bool,
    /// Only the steady churn.
    #[arg(long)]
    churn_only: bool,
    /// Also append the figures to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the soak needs root (network namespaces, eBPF)");
    }
    let tools = bootstrap::build_tools()?;
    bootstrap::test_tools()?;
    // SAFETY: single-threaded at this point; the child processes inherit it.
    unsafe {
        std::env::set_var("OBSERVER_SOAK_SECONDS", options.seconds.to_string());
        if let Some(report) = &options.report {
            std::env::set_var("OBSERVER_SOAK_REPORT", report);
        }
    }
    let mut tests = Vec::new();
    if !options.churn_only {
        tests.push("tests::soak::socket_flood");
    }
    if !options.flood_only {
        tests.push("tests::soak::steady_churn");
    }
    let mut args = vec!["--ignored".to_string(), "--nocapture".to_string(), "--exact".to_string()];
    args.extend(tests.iter().map(ToString::to_string));
    test::integration(&tools.bpf_toolchain, &args, None)
}
