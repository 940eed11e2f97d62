//! `cargo xtask test`: bootstrap, lint, unit tests, then the integration scenarios.
//!
//! The integration tests (crate `observer-tests`) create network namespaces, run the
//! real daemon and compare its verdicts with the kernel's own counters, so they need
//! root. They find the daemon through `OBSERVER_BIN`.

use std::process::Command;

use anyhow::bail;

use crate::{
    bootstrap,
    command::{cargo, exec, is_root, target_dir, workspace_root},
};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    no_lint: bool,
    /// Skip the integration scenarios (no root needed).
    #[arg(long)]
    unit_only: bool,
    /// Arguments for the integration test harness, e.g. a test name filter.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    harness_args: Vec<String>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let Options { no_lint, unit_only, harness_args } = options;
    let tools = bootstrap::build_tools()?;
    if !unit_only {
        if !is_root() {
            bail!(
                "the integration tests need root (network namespaces, eBPF); rerun as root or with --unit-only"
            );
        }
        bootstrap::test_tools()?;
        bootstrap::tracefs()?;
    }
    let with_toolchain = |command: &mut std::process::Command| {
        command.env("OBSERVER_BPF_TOOLCHAIN", &tools.bpf_toolchain);
    };

    if !no_lint {
        println!("xtask: cargo fmt --check");
        exec(cargo().args(["fmt", "--all", "--check"]))?;
        println!("xtask: cargo clippy");
        let mut clippy = cargo();
        clippy.args([
            "clippy",
            "--workspace",
            "--exclude",
            "observer-ebpf",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]);
        with_toolchain(&mut clippy);
        exec(&mut clippy)?;
        println!("xtask: cargo clippy (eBPF programs, for bpfel-unknown-none)");
        exec(
            Command::new("rustup")
                .args(["run", &tools.bpf_toolchain, "cargo", "clippy", "--quiet", "--release"])
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .arg("--target-dir")
                .arg(target_dir().join("ebpf-clippy"))
                .args(["--", "-D", "warnings"])
                .current_dir(workspace_root().join("observer-ebpf"))
                .env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"")
                .env_remove("RUSTC")
                .env_remove("RUSTC_WORKSPACE_WRAPPER"),
        )?;
    }

    println!("xtask: unit tests");
    let mut unit = cargo();
    unit.args(["test", "--workspace", "--exclude", "observer-ebpf", "--exclude", "observer-tests"]);
    with_toolchain(&mut unit);
    exec(&mut unit)?;
    if unit_only {
        return Ok(());
    }
    crate::deploy::run(&tools.bpf_toolchain)?;

    println!("xtask: integration scenarios (real kernel, network namespaces)");
    integration(&tools.bpf_toolchain, &harness_args, None)
}

/// Builds the daemon and runs the integration scenarios, one at a time (they share the
/// daemon, and some check host-wide gauges).
pub fn integration(
    bpf_toolchain: &str,
    harness_args: &[String],
    record_dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    exec(
        cargo()
            .args(["build", "--release", "--package", "observer"])
            .env("OBSERVER_BPF_TOOLCHAIN", bpf_toolchain),
    )?;
    let mut command = cargo();
    command
        .args(["test", "--release", "--package", "observer-tests", "--", "--test-threads=1"])
        .args(harness_args)
        .env("OBSERVER_BIN", target_dir().join("release/observer"))
        .env("OBSERVER_BPF_TOOLCHAIN", bpf_toolchain);
    if let Some(dir) = record_dir {
        command.env("OBSERVER_RECORD_DIR", dir);
    }
    exec(&mut command)
}
