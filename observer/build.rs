//! Builds the eBPF object (observer-ebpf) for bpfel-unknown-none with aya-build; the
//! daemon embeds it with `include_bytes_aligned!`.
//!
//! The BPF build needs a nightly toolchain with rust-src and bpf-linker; `cargo xtask`
//! installs both and names the toolchain in OBSERVER_BPF_TOOLCHAIN (default "nightly").
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=OBSERVER_BPF_TOOLCHAIN");
    let metadata =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "observer-ebpf")
        .ok_or_else(|| anyhow!("observer-ebpf is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("observer-ebpf manifest has no parent directory"))?;
    let toolchain = std::env::var("OBSERVER_BPF_TOOLCHAIN").ok();
    let toolchain = match toolchain.as_deref() {
        None | Some("") | Some("nightly") => aya_build::Toolchain::Nightly,
        Some(custom) => aya_build::Toolchain::Custom(custom),
    };
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], toolchain)
}
