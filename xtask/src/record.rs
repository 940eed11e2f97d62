//! `cargo xtask record`: the integration scenarios, recorded as replay fixtures.

use anyhow::bail;

use crate::{
    bootstrap,
    command::{is_root, workspace_root},
    test,
};

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("recording runs the integration scenarios, which need root");
    }
    let tools = bootstrap::build_tools()?;
    bootstrap::test_tools()?;
    let dir = workspace_root().join("observer/tests/streams");
    test::integration(&tools.bpf_toolchain, &[], Some(&dir))?;
    // The daemon's full event log is only a means to split per scenario.
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|name| name.to_string_lossy().starts_with(".events-")) {
            std::fs::remove_file(path)?;
        }
    }
    println!("xtask: fixtures written under {}", dir.display());
    Ok(())
}
