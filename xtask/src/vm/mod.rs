//! `cargo xtask vm-test [--kernel LIST]`: the integration scenarios inside QEMU guests
//! running other kernels (Debian 11's 5.10, 12's 6.1, 13's 6.12, unstable's 7.2,
//! experimental's 7.3, or any vmlinuz).
//!
//! The plan, per run:
//! 1. resolve the kernels: fetch each Debian cloud kernel with a private apt
//!    configuration into `target/vm/kernels/` (once; later runs use the cache), or check
//!    that a given path really is a kernel image;
//! 2. build the daemon and the scenario binary statically (glibc, `+crt-static`), so the
//!    guest needs no libraries of ours;
//! 3. per kernel, write an initramfs: busybox, both binaries, iproute2 and Prometheus
//!    with their libraries, the kernel's veth and tcp_diag modules, and an `/init` that
//!    runs the scenarios and prints one result line;
//! 4. boot it under TCG with a timeout, echoing the console, and fail on a panic, a
//!    missing result line or a timeout;
//! 5. print `vm-test: <kernel release> <passed>/<total> passed` per kernel, and fail if
//!    any kernel did.

mod initramfs;
mod kernels;
mod qemu;

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};

use crate::{
    bootstrap,
    command::{cargo, is_root, target_dir},
};

#[derive(clap::Args)]
pub struct Options {
    /// Kernels to boot, comma-separated: 5.10, 6.1, 6.12 (Debian's stable suites), 7.2
    /// (unstable's kernel), 7.3 (experimental's), all (those five), or a path to a
    /// vmlinuz (`boot/vmlinuz-*` or `usr/lib/modules/*/vmlinuz` of an unpacked package).
    #[arg(long, value_name = "LIST", default_value = "all")]
    kernel: String,
    /// Give up on a guest after this many minutes.
    #[arg(long, value_name = "MINUTES", default_value_t = 30)]
    timeout_minutes: u64,
    /// Record each scenario's kernel events as replay fixtures under
    /// observer/tests/streams/<kernel release>/ (replacing that kernel's old ones).
    #[arg(long)]
    record: bool,
    /// Arguments for the scenario harness in the guest, e.g. a test name filter.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    harness_args: Vec<String>,
}

/// Guest memory: the initramfs (≈ 130 MiB, mostly Prometheus) lives in RAM.
const GUEST_MEMORY_MIB: u32 = 2048;
/// The host's own target triple: an explicit --target keeps build scripts dynamic while
/// `+crt-static` makes the binaries static.
const TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn run(options: Options) -> anyhow::Result<()> {
    let Options { kernel, timeout_minutes, record, harness_args } = options;
    let streams = crate::command::workspace_root().join("observer/tests/streams");
    let cache = target_dir().join("vm");
    // Resolve first: a wrong --kernel fails before anything is built.
    let kernels = kernels::resolve(&kernel, &cache)?;
    // A kernel given by path downloads nothing, so nothing has made the folder yet.
    std::fs::create_dir_all(&cache)?;
    if !is_root() {
        println!("vm-test: note: not root; installing missing host tools will fail");
    }
    let tools = bootstrap::build_tools()?;
    bootstrap::test_tools()?;
    bootstrap::vm_tools()?;

    println!("vm-test: building static binaries for the guest");
    let (observer, scenarios) = static_binaries(&tools.bpf_toolchain)?;

    let mut results = Vec::new();
    for kernel in &kernels {
        let initrd = cache.join(format!("initramfs-{}.cpio", sanitize(&kernel.label)));
        let image = initramfs::Initramfs::for_guest(
            &which("busybox")?,
            &observer,
            &scenarios,
            kernel.modules.as_deref(),
            &harness_args,
            record,
        )?;
        if record && let Some(release) = &kernel.release {
            let _ = std::fs::remove_dir_all(streams.join(release));
        }
        let size = image.write(&initrd)?;
        println!(
            "vm-test: {}: initramfs {} MiB; booting {} under QEMU (TCG)",
            kernel.label,
            size >> 20,
            kernel.vmlinuz.display()
        );
        let outcome = qemu::boot(
            &kernel.label,
            &kernel.vmlinuz,
            &initrd,
            GUEST_MEMORY_MIB,
            Duration::from_secs(timeout_minutes * 60),
            record.then_some(streams.as_path()),
        );
        let release = outcome
            .release
            .clone()
            .or_else(|| kernel.release.clone())
            .unwrap_or_else(|| kernel.label.clone());
        match &outcome.failure {
            Some(failure) => println!("vm-test: {}: FAILED: {failure}", kernel.label),
            None => println!("vm-test: {}: done in {} s", kernel.label, outcome.elapsed.as_secs()),
        }
        results.push((release, outcome));
    }

    for (release, outcome) in &results {
        println!("vm-test: {release} {}/{} passed", outcome.passed, outcome.total);
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, outcome)| outcome.failure.is_some())
        .map(|(release, _)| release.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

fn sanitize(label: &str) -> String {
    label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect()
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    crate::command::output(
        std::process::Command::new("sh").args(["-c", &format!("command -v {program}")]),
    )
    .map(|path| PathBuf::from(path.trim()))
    .filter(|path| path.is_file())
    .with_context(|| format!("{program} is not installed"))
}

fn static_build(command: &mut std::process::Command, bpf_toolchain: &str) {
    command
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("OBSERVER_BPF_TOOLCHAIN", bpf_toolchain);
}

/// Builds the release daemon as a static executable (what the guests and the container
/// image run); returns its path.
pub fn static_daemon(bpf_toolchain: &str) -> anyhow::Result<PathBuf> {
    let mut build = cargo();
    build.args(["build", "--release", "--package", "observer", "--target", TARGET]);
    static_build(&mut build, bpf_toolchain);
    crate::command::exec(&mut build)?;
    Ok(target_dir().join(TARGET).join("release/observer"))
}

/// Builds the daemon and the scenario binary as static executables; returns their paths.
fn static_binaries(bpf_toolchain: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let observer = static_daemon(bpf_toolchain)?;
    let mut tests = cargo();
    tests
        .args(["test", "--release", "--package", "observer-tests", "--no-run", "--target", TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    static_build(&mut tests, bpf_toolchain);
    let output = tests.output().context("building the scenario binary")?;
    if !output.status.success() {
        bail!("building the scenario binary failed");
    }
    let scenarios = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact"
                && message["profile"]["test"] == true
                && message["target"]["name"] == "observer_tests"
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the scenario binary")?;
    Ok((observer, scenarios))
}
