//! `cargo xtask image`: the container image of deploy/container/Containerfile, built with
//! podman from the static daemon, and saved as an OCI archive to push with any tool
//! (`skopeo copy oci-archive:… docker://…`, `podman push`).

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{
    bootstrap,
    command::{exec, target_dir, workspace_root},
};

#[derive(clap::Args)]
pub struct Options {
    /// The image's name and tag in podman's local store.
    #[arg(long, default_value = DEFAULT_TAG)]
    tag: String,
}

const DEFAULT_TAG: &str = concat!("localhost/observer:", env!("CARGO_PKG_VERSION"));
const CONTAINERFILE: &str = "deploy/container/Containerfile";

pub fn run(options: Options) -> anyhow::Result<()> {
    let tools = bootstrap::build_tools()?;
    bootstrap::container_tools()?;
    let archive = build(&tools.bpf_toolchain, &options.tag)?;
    println!("xtask: image {} saved to {}", options.tag, archive.display());
    Ok(())
}

/// Builds the image as `tag` and saves it as an OCI archive; returns the archive's path.
pub fn build(bpf_toolchain: &str, tag: &str) -> anyhow::Result<PathBuf> {
    let binary = crate::vm::static_daemon(bpf_toolchain)?;
    // A context of two files: podman sends nothing else to the build.
    let context = target_dir().join("image/context");
    if context.exists() {
        std::fs::remove_dir_all(&context)?;
    }
    std::fs::create_dir_all(&context)?;
    std::fs::copy(workspace_root().join(CONTAINERFILE), context.join("Containerfile"))?;
    std::fs::copy(&binary, context.join("observer"))
        .with_context(|| format!("copying {}", binary.display()))?;
    println!("xtask: podman build {tag} ({CONTAINERFILE})");
    exec(
        podman()
            .args(["build", "--quiet", "--tag", tag, "--file"])
            .arg(context.join("Containerfile"))
            .arg(&context),
    )?;
    let archive = target_dir().join(format!(
        "image/observer-{}-{}.oci.tar",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    ));
    if archive.exists() {
        std::fs::remove_file(&archive)?;
    }
    exec(
        podman()
            .args(["save", "--quiet", "--format", "oci-archive", "--output"])
            .arg(&archive)
            .arg(tag),
    )?;
    let size = std::fs::metadata(&archive)?.len();
    println!("xtask: image {tag}: {:.1} MiB (OCI archive)", size as f64 / (1 << 20) as f64);
    Ok(archive)
}

/// podman with runc: these machines mount cgroups in hybrid mode, which podman's default
/// runtime (crun) refuses (docs/operations.md, "The image").
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc"]);
    command
}
