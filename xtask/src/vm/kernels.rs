//! Guest kernels: Debian's cloud kernel package of each suite, fetched with a private apt
//! configuration (the system's sources are never touched), unpacked with `dpkg -x`, and
//! cached under `target/vm/kernels/<suite>/` so a second run downloads nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{apt::PrivateApt, command::exec};

/// A kernel to boot: its image and, if it has them, its modules.
pub struct GuestKernel {
    /// What the user asked for ("6.1", or the path).
    pub label: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the kernel, when known.
    pub modules: Option<PathBuf>,
    /// Release name (`uname -r`), when known before booting.
    pub release: Option<String>,
}

/// The Debian suites whose kernels we test, by kernel version.
pub const SUITES: [(&str, &str); 3] =
    [("5.10", "bullseye"), ("6.1", "bookworm"), ("6.12", "trixie")];

/// Resolves `--kernel` (a version from [`SUITES`], `all`, or a path to a vmlinuz).
pub fn resolve(list: &str, cache: &Path) -> anyhow::Result<Vec<GuestKernel>> {
    let mut kernels = Vec::new();
    for item in list.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        if item == "all" {
            for (version, suite) in SUITES {
                kernels.push(debian(version, suite, cache)?);
            }
        } else if let Some((version, suite)) = SUITES.iter().find(|(version, _)| *version == item) {
            kernels.push(debian(version, suite, cache)?);
        } else {
            kernels.push(from_path(Path::new(item))?);
        }
    }
    if kernels.is_empty() {
        bail!("--kernel: nothing to test; give 5.10, 6.1, 6.12, all, or a path to a vmlinuz");
    }
    Ok(kernels)
}

/// A kernel image given by path; modules are taken from `../lib/modules/*` (or
/// `../usr/lib/modules/*`) beside it, the layout of an unpacked Debian package, if present.
fn from_path(path: &Path) -> anyhow::Result<GuestKernel> {
    if !path.is_file() {
        bail!(
            "--kernel {}: no such file (expected 5.10, 6.1, 6.12, all, or a vmlinuz)",
            path.display()
        );
    }
    check_bzimage(path)?;
    let root = path.parent().and_then(Path::parent);
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|dir| root.map(|root| root.join(dir)))
        .filter_map(|dir| fs::read_dir(dir).ok())
        .find_map(|mut entries| entries.next())
        .and_then(|entry| entry.ok())
        .map(|entry| entry.path());
    Ok(GuestKernel {
        label: path.display().to_string(),
        vmlinuz: path.to_path_buf(),
        release: modules.as_ref().and_then(|m| m.file_name()).map(|n| n.to_string_lossy().into()),
        modules,
    })
}

/// An x86 boot image has "HdrS" at 0x202; anything else would make QEMU fail obscurely.
pub fn check_bzimage(path: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.get(0x202..0x206) != Some(b"HdrS") {
        bail!("{} is not a Linux kernel image (no bzImage header)", path.display());
    }
    Ok(())
}

fn debian(version: &str, suite: &str, cache: &Path) -> anyhow::Result<GuestKernel> {
    let dir = cache.join("kernels").join(suite);
    let unpacked = dir.join("root");
    if let Some(kernel) = unpacked_kernel(version, &unpacked)? {
        println!(
            "vm-test: {version}: kernel {} (cached)",
            kernel.release.as_deref().unwrap_or("?")
        );
        return Ok(kernel);
    }
    let apt = PrivateApt::new(&dir, suite)?;
    println!("vm-test: {version}: fetching Debian {suite}'s cloud kernel with apt");
    apt.apt_get(&["update", "-qq"])?;
    // The metapackage names the current kernel package.
    let depends = apt.apt_cache(&["depends", "linux-image-cloud-amd64"])?;
    let package = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|name| name.starts_with("linux-image-"))
        .with_context(|| format!("no kernel package in {suite}: {depends}"))?
        .to_string();
    let deb = apt.download(&package, &dir.join("debs"))?;
    let staging = dir.join("root.partial");
    let _ = fs::remove_dir_all(&staging);
    exec(Command::new("dpkg").arg("-x").arg(&deb).arg(&staging))?;
    fs::rename(&staging, &unpacked)?;
    fs::remove_file(&deb)?;
    unpacked_kernel(version, &unpacked)?
        .with_context(|| format!("{package} holds no boot/vmlinuz-*"))
}

fn unpacked_kernel(version: &str, root: &Path) -> anyhow::Result<Option<GuestKernel>> {
    let Ok(entries) = fs::read_dir(root.join("boot")) else { return Ok(None) };
    let Some(vmlinuz) = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
    else {
        return Ok(None);
    };
    let release = vmlinuz
        .file_name()
        .and_then(|name| name.to_string_lossy().strip_prefix("vmlinuz-").map(str::to_string));
    // Merged-/usr packages (trixie on) ship modules under usr/lib/modules.
    let modules = release.as_ref().and_then(|release| {
        ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|dir| root.join(dir).join(release))
            .find(|dir| dir.is_dir())
    });
    Ok(Some(GuestKernel { label: version.to_string(), vmlinuz, modules, release }))
}
