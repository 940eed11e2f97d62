//! `cargo xtask bench`: the userspace pipeline's speed and memory figures
//! (observer/benches/tracker.rs). The kernel side is measured by the burst scenario of
//! the integration tests (events per burst, events lost).

use crate::{
    bootstrap,
    command::{cargo, exec},
};

pub fn run() -> anyhow::Result<()> {
    let tools = bootstrap::build_tools()?;
    exec(
        cargo()
            .args(["bench", "--package", "observer", "--bench", "tracker"])
            .env("OBSERVER_BPF_TOOLCHAIN", &tools.bpf_toolchain),
    )
}
