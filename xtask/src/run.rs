//! `cargo xtask run -- <observer flags>`: bootstrap, build the release daemon, run it.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::Context as _;

use crate::{
    bootstrap,
    command::{cargo, exec, is_root, on_path, target_dir},
};

#[derive(clap::Args)]
pub struct Options {
    /// Flags for observer, e.g. `-- --web.listen-address 0.0.0.0:9977`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let Options { args } = options;
    let tools = bootstrap::build_tools()?;
    exec(
        cargo()
            .args(["build", "--release", "--package", "observer"])
            .env("OBSERVER_BPF_TOOLCHAIN", &tools.bpf_toolchain),
    )?;
    bootstrap::tracefs()?;
    let binary = target_dir().join("release/observer");
    let mut command = if is_root() || !on_path("sudo") {
        Command::new(&binary)
    } else {
        println!("xtask: running observer with sudo (loading eBPF programs needs privileges)");
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&binary);
        sudo
    };
    // Replace this process, so signals (Ctrl-C, SIGTERM) reach the daemon directly.
    let error = command.args(&args).exec();
    Err(error).with_context(|| format!("failed to run {}", binary.display()))
}
