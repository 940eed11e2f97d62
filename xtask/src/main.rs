//! `cargo xtask`: what cargo alone cannot do for observer.
//!
//! * `cargo xtask run -- <observer flags>`: set up the toolchain, build the release
//!   daemon and run it.
//! * `cargo xtask test`: set up the toolchain and test tools, check formatting and
//!   lints, run the unit tests, then the integration scenarios as root.
//!
//! * `cargo xtask vm-test [--kernel 5.10,6.1,6.12|all|PATH]`: the same scenarios inside
//!   QEMU guests running other kernels.
//! * `cargo xtask soak`: memory under a socket flood and a 30-minute churn.
//! * `cargo xtask record`: rerun the scenarios, saving their kernel events as fixtures
//!   for the classifier's replay tests.
//! * `cargo xtask package`: build and check the Debian package (cargo-deb).
//! * `cargo xtask image`: build the container image with podman (an OCI archive).
//! * `cargo xtask bench`: connection churn with no observer, observer, bpftrace and
//!   libbpf-tools (docs/benchmarks.md); `--pipeline` for the userspace pipeline alone.
//!
//! All start with [`bootstrap`], which installs only what is missing and says so.

mod apt;
mod bench;
mod bootstrap;
mod command;
mod deploy;
mod deployed;
mod image;
mod package;
mod record;
mod run;
mod soak;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test observer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the release daemon and run it (flags after `--` go to observer).
    Run(run::Options),
    /// Lint, unit-test, and run the integration scenarios (needs root).
    Test(test::Options),
    /// Run the integration scenarios in QEMU guests booting other kernels.
    VmTest(vm::Options),
    /// Connection churn with no observer, observer, bpftrace and libbpf-tools: a table
    /// of throughput, BPF cost, completeness, losses, CPU and memory (needs root).
    Bench(bench::Options),
    /// Memory under a 200k-socket flood and a long steady churn (needs root, slow).
    Soak(soak::Options),
    /// Rerun the integration scenarios, saving their kernel events as replay fixtures
    /// under observer/tests/streams/<kernel release>/ (needs root).
    Record,
    /// Build the Debian package (cargo-deb): binary, systemd unit, flags file, man page.
    Package,
    /// Build the container image (deploy/container/Containerfile) with podman and save
    /// it as an OCI archive under target/image/.
    Image(image::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(options) => run::run(options),
        Command::Test(options) => test::run(options),
        Command::Record => record::run(),
        Command::Bench(options) => bench::run(options),
        Command::Soak(options) => soak::run(options),
        Command::VmTest(options) => vm::run(options),
        Command::Package => package::run(),
        Command::Image(options) => image::run(options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}
