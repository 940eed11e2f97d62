//! `cargo xtask package`: the Debian package, built with cargo-deb from
//! `[package.metadata.deb]` in observer/Cargo.toml, then checked before anyone installs
//! it: its files, its conffile and maintainer scripts, its man page, and its systemd unit
//! (`systemd-analyze verify` inside the unpacked package).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    bootstrap,
    command::{cargo, exec, target_dir},
    deploy,
};

/// Files the package must install.
const PACKAGED: [&str; 7] = [
    "./usr/bin/observer",
    "./usr/lib/systemd/system/observer.service",
    "./etc/default/observer",
    "./usr/share/man/man1/observer.1.gz",
    "./usr/share/doc/observer/README.md",
    "./usr/share/observer/grafana/observer.json",
    "./usr/share/observer/prometheus/rules.yml",
];

pub fn run() -> anyhow::Result<()> {
    let tools = bootstrap::build_tools()?;
    bootstrap::package_tools()?;
    exec(
        cargo()
            .args(["build", "--release", "--package", "observer"])
            .env("OBSERVER_BPF_TOOLCHAIN", &tools.bpf_toolchain),
    )?;
    let binary = target_dir().join("release/observer");
    man_page(&binary)?;

    println!("xtask: cargo deb");
    let built = cargo()
        .args(["deb", "--package", "observer", "--no-build"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo deb")?;
    if !built.status.success() {
        bail!("cargo deb failed ({})", built.status);
    }
    let stdout = String::from_utf8_lossy(&built.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| line.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb did not name the package it built: {stdout}"))?;
    check_package(&deb)?;
    println!("xtask: built and checked {}", deb.display());
    println!("xtask: install it with: dpkg -i {}", deb.display());
    Ok(())
}

/// `observer.1.gz` from `--help` and `--version` (help2man), where the package's assets
/// expect it.
fn man_page(binary: &Path) -> anyhow::Result<()> {
    let page = target_dir().join("release/observer.1");
    exec(
        Command::new("help2man")
            .args(["--no-info", "--section=1", "--name"])
            .arg("tell how every TCP connection ended and export it to Prometheus")
            .arg("--output")
            .arg(&page)
            .arg(binary),
    )?;
    // -n: no name or timestamp in the gzip header, so the package is reproducible.
    exec(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&page))
}

fn check_package(deb: &Path) -> anyhow::Result<()> {
    let listing = text(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    for path in PACKAGED {
        ensure!(
            listing.lines().any(|line| line.ends_with(path)),
            "{} lacks {path}:\n{listing}",
            deb.display()
        );
    }
    let conffiles = text(Command::new("dpkg-deb").args(["--info"]).arg(deb).arg("conffiles"))?;
    ensure!(
        conffiles.lines().any(|line| line == "/etc/default/observer"),
        "/etc/default/observer is not a conffile (an upgrade would overwrite local flags)"
    );
    let postinst = text(Command::new("dpkg-deb").args(["--info"]).arg(deb).arg("postinst"))?;
    ensure!(
        postinst.contains("deb-systemd-helper") && postinst.contains("observer.service"),
        "the postinst does not enable observer.service:\n{postinst}"
    );

    let root = target_dir().join("debian/unpacked");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    exec(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    let version = text(Command::new(root.join("usr/bin/observer")).arg("--version"))?;
    ensure!(
        version.trim() == format!("observer {}", env!("CARGO_PKG_VERSION")),
        "packaged binary reports {version:?}"
    );
    let manual = text(
        Command::new("man")
            .args(["--local-file", "--pager=cat"])
            .arg(root.join("usr/share/man/man1/observer.1.gz"))
            .env("MANWIDTH", "100"),
    )?;
    ensure!(manual.contains("web.listen-address"), "the man page lacks the flags:\n{manual}");
    println!("xtask: systemd-analyze verify (the packaged unit, in the unpacked package)");
    deploy::verify_unit(&root, "/usr/lib/systemd/system/observer.service")?;
    fs::remove_dir_all(&root)?;
    Ok(())
}

/// Stdout of a command that must succeed.
fn text(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output().with_context(|| format!("failed to start {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
