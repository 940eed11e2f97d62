//! Makes sure the tools observer builds and tests with are installed; installs what is
//! missing (and says so), does nothing when everything is there.
//!
//! The eBPF build chain (docs/building.md): a nightly rustc with rust-src builds the
//! programs for bpfel-unknown-none, and bpf-linker 0.13 links them. bpf-linker embeds an
//! LLVM that must have the same major version as nightly's (22 here): it is built
//! against Debian's llvm-22-dev. If the installed `nightly` ever moves to another LLVM,
//! we use the pinned nightly that matches instead of breaking.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::command::{exec, is_root, on_path, output};

/// LLVM major version of bpf-linker and of the nightly we build eBPF with.
const LLVM_MAJOR: &str = "22";
/// A nightly known to use LLVM 22, used if `nightly` does not.
const PINNED_NIGHTLY: &str = "nightly-2026-05-19";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Another apt run (unattended upgrades, a parallel xtask) holds dpkg's lock for a while:
/// wait for it rather than fail.
const APT_WAIT_FOR_LOCK: [&str; 2] = ["-o", "DPkg::Lock::Timeout=600"];

/// Installs Debian packages, running `apt-get update` at most once.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str], why: &str) -> anyhow::Result<()> {
        if packages.is_empty() {
            return Ok(());
        }
        let list = packages.join(" ");
        if !is_root() {
            bail!(
                "{why} needs the Debian packages {list}; install them (apt-get install {list}) or run as root"
            );
        }
        println!("xtask: installing {list} with apt-get ({why})");
        if !self.updated {
            exec(Command::new("apt-get").args(["update", "-qq"]).args(APT_WAIT_FOR_LOCK))?;
            self.updated = true;
        }
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(APT_WAIT_FOR_LOCK)
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }
}

fn package_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.contains("install ok installed"))
}

/// The toolchain to build the eBPF crate with, for `OBSERVER_BPF_TOOLCHAIN`.
pub struct BuildTools {
    pub bpf_toolchain: String,
}

/// Nightly + rust-src, llvm-22-dev and bpf-linker 0.13 on LLVM 22.
pub fn build_tools() -> anyhow::Result<BuildTools> {
    let mut apt = Apt::default();
    let bpf_toolchain = nightly_with_rust_src()?;
    if !package_installed("llvm-22-dev") {
        apt.install(&["llvm-22-dev"], "bpf-linker links against LLVM 22")?;
    }
    bpf_linker()?;
    Ok(BuildTools { bpf_toolchain })
}

/// Tools the integration tests drive: iproute2 (ip, ss, nstat), Prometheus, bpftool, curl.
pub fn test_tools() -> anyhow::Result<()> {
    let missing = missing_packages(&[
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("nstat", "iproute2"),
        ("promtool", "prometheus"),
        ("prometheus", "prometheus"),
        // Lifecycle, TLS and privilege tests (issue 6).
        ("bpftool", "bpftool"),
        ("curl", "curl"),
        ("setpriv", "util-linux"),
        ("unshare", "util-linux"),
    ]);
    Apt::default().install(&missing, "the integration tests")
}

/// What `bench` drives: the peers it compares with, bpftool (who else has programs
/// attached), unshare (a private tracefs mount), dpkg and Debian's archive keyring
/// (fetching and unpacking libbpf-tools).
pub fn bench_tools() -> anyhow::Result<()> {
    let mut missing = missing_packages(&[
        ("ip", "iproute2"),
        ("bpftrace", "bpftrace"),
        ("bpftool", "bpftool"),
        ("unshare", "util-linux"),
        ("dpkg", "dpkg"),
    ]);
    if !std::path::Path::new(crate::apt::KEYRING).exists() {
        missing.push("debian-archive-keyring");
    }
    Apt::default().install(&missing, "the bench")
}

/// The packages providing the (program, package) pairs whose program is not on PATH.
fn missing_packages(programs: &[(&str, &'static str)]) -> Vec<&'static str> {
    let mut missing = Vec::new();
    for (program, package) in programs {
        if !on_path(program) && !missing.contains(package) {
            missing.push(*package);
        }
    }
    missing
}

/// What `cargo xtask image` and the as-deployed check drive: podman with runc (crun
/// refuses hybrid cgroups), busybox-static for the client container, openssl for the
/// test's certificate, curl to scrape it.
pub fn container_tools() -> anyhow::Result<()> {
    let missing = missing_packages(&[
        ("podman", "podman"),
        ("runc", "runc"),
        ("openssl", "openssl"),
        ("curl", "curl"),
    ]);
    let mut missing = missing;
    if !package_installed("busybox-static") {
        missing.push("busybox-static");
    }
    Apt::default().install(&missing, "the container image and its checks")
}

/// What `vm-test` drives on the host: QEMU, busybox for the guest, and the tools that
/// unpack Debian kernel modules.
pub fn vm_tools() -> anyhow::Result<()> {
    let mut missing = missing_packages(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("modinfo", "kmod"),
        ("xz", "xz-utils"),
        ("zstd", "zstd"),
    ]);
    // A dynamically linked busybox would not run in the guest.
    if on_path("busybox")
        && !package_installed("busybox-static")
        && !missing.contains(&"busybox-static")
    {
        missing.push("busybox-static");
    }
    Apt::default().install(&missing, "vm-test")
}

fn llvm_major(toolchain: &str) -> Option<String> {
    let version = output(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))?;
    let llvm = version.lines().find_map(|line| line.strip_prefix("LLVM version: "))?;
    llvm.split('.').next().map(str::to_string)
}

fn nightly_with_rust_src() -> anyhow::Result<String> {
    if !on_path("rustup") {
        bail!("rustup is not on PATH; observer's eBPF build needs a rustup-managed nightly");
    }
    let toolchain = if llvm_major("nightly").as_deref() == Some(LLVM_MAJOR) {
        "nightly"
    } else {
        if llvm_major(PINNED_NIGHTLY).is_none() {
            println!("xtask: installing {PINNED_NIGHTLY} (its LLVM matches bpf-linker's)");
            exec(Command::new("rustup").args([
                "toolchain",
                "install",
                PINNED_NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
        }
        match llvm_major(PINNED_NIGHTLY) {
            Some(major) if major == LLVM_MAJOR => PINNED_NIGHTLY,
            other => bail!("{PINNED_NIGHTLY} uses LLVM {other:?}, expected {LLVM_MAJOR}"),
        }
    };
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .unwrap_or_default();
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        println!("xtask: adding rust-src to {toolchain} (the eBPF build compiles core)");
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            toolchain,
        ]))?;
    }
    Ok(toolchain.to_string())
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.trim() == format!("bpf-linker {BPF_LINKER_VERSION}") && bpf_linker_uses_llvm_22() {
        return Ok(());
    }
    println!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} for LLVM {LLVM_MAJOR} (takes a few minutes, once)"
    );
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .context("building bpf-linker")
}

/// bpf-linker loads libLLVM dynamically; the one it was built against must be 22.
fn bpf_linker_uses_llvm_22() -> bool {
    let Some(path) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return false;
    };
    output(Command::new("ldd").arg(path.trim())).is_some_and(|libs| libs.contains("libLLVM.so.22"))
}

/// Mounts tracefs where the host has not (systemd mounts it on ordinary hosts; minimal
/// containers and sandboxes may not): observer attaches to the accept() exit
/// tracepoints through it, to know which process owns each server-side socket.
pub fn tracefs() -> anyhow::Result<()> {
    let mounted = ["/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"]
        .iter()
        .any(|path| std::path::Path::new(path).is_dir());
    if mounted {
        return Ok(());
    }
    if !is_root() {
        println!(
            "xtask: tracefs is not mounted and we are not root: owners of accepted sockets \
             will be unknown (mount -t tracefs nodev /sys/kernel/tracing)"
        );
        return Ok(());
    }
    println!("xtask: mounting tracefs on /sys/kernel/tracing (owners of accepted sockets)");
    exec(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

/// cargo-deb, pinned so that the package is built the same way everywhere.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// What `cargo xtask package` needs besides the build tools: cargo-deb (crates.io),
/// help2man (the man page, from `--help`), dpkg-shlibdeps (the package's library
/// dependencies) and systemd-analyze (verifies the packaged unit).
pub fn package_tools() -> anyhow::Result<()> {
    let missing = missing_packages(&[
        ("help2man", "help2man"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("systemd-analyze", "systemd"),
    ]);
    Apt::default().install(&missing, "cargo xtask package")?;
    let version = output(Command::new("cargo").args(["deb", "--version"])).unwrap_or_default();
    if version.trim() != format!("cargo-deb {CARGO_DEB_VERSION}") {
        println!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (builds the Debian package)");
        exec(Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
            "--force",
        ]))
        .context("installing cargo-deb")?;
    }
    Ok(())
}

/// Python packages of the deploy/ checks, pinned: kubernetes-validate carries the
/// Kubernetes API schemas (it works offline), cloudcoil's models carry the
/// prometheus-operator CRD schemas (v0.80.1).
const DEPLOY_CHECK_PYTHON_PACKAGES: [&str; 3] = [
    "kubernetes-validate==1.37.0",
    "cloudcoil==0.6.0",
    "cloudcoil.models.prometheus_operator==0.80.1.0",
];

/// Debian's interpreter, not whatever `python3` a user's PATH prefers.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Tools of the deploy/ checks: promtool, systemd-analyze, setpriv, and a Python venv under
/// target/ with [`DEPLOY_CHECK_PYTHON_PACKAGES`]. Returns the venv's directory.
pub fn deploy_check_tools() -> anyhow::Result<std::path::PathBuf> {
    let mut missing = missing_packages(&[
        ("promtool", "prometheus"),
        ("systemd-analyze", "systemd"),
        ("setpriv", "util-linux"),
    ]);
    // `python3 -m venv` needs ensurepip, which Debian ships in python3-venv.
    for package in ["python3", "python3-venv"] {
        if !package_installed(package) && !missing.contains(&package) {
            missing.push(package);
        }
    }
    Apt::default().install(&missing, "the deploy/ checks")?;

    let venv = crate::command::target_dir().join("deploy-check-venv");
    let stamp = venv.join("xtask-installed.txt");
    let wanted = DEPLOY_CHECK_PYTHON_PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|installed| installed == wanted) {
        return Ok(venv);
    }
    println!(
        "xtask: installing {} into {} (pip, once)",
        DEPLOY_CHECK_PYTHON_PACKAGES.join(" "),
        venv.display()
    );
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .with_context(|| format!("removing the stale {}", venv.display()))?;
    }
    exec(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&venv))?;
    exec(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(DEPLOY_CHECK_PYTHON_PACKAGES),
    )
    .context("installing the Python packages of the deploy/ checks")?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(venv)
}
