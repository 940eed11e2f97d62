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

/// The Debian suites whose kernels we test, by kernel version: the three stable ones,
/// unstable's (the newest release) and experimental's (a release candidate, when there is
/// one). Unstable and experimental move: a version here names whatever kernel the suite
/// carries today, and the log says which release that was.
pub const SUITES: [(&str, &str); 5] = [
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
    ("7.2", "sid"),
    ("7.3", "experimental"),
];

/// What `--kernel` accepts, for messages.
const ACCEPTED: &str = "5.10, 6.1, 6.12, 7.2, 7.3, all, or a path to a vmlinuz";

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
        bail!("--kernel: nothing to test; give {ACCEPTED}");
    }
    Ok(kernels)
}

/// A kernel image given by path; modules are taken from `../lib/modules/*` (or
/// `../usr/lib/modules/*`) beside it, the layout of an unpacked Debian package, if present.
fn from_path(path: &Path) -> anyhow::Result<GuestKernel> {
    if !path.is_file() {
        bail!("--kernel {}: no such file (expected {ACCEPTED})", path.display());
    }
    check_bzimage(path)?;
    // Newer packages put the image among its modules (usr/lib/modules/<release>/vmlinuz).
    let beside =
        path.parent().filter(|dir| dir.join("modules.order").is_file()).map(Path::to_path_buf);
    let root = path.parent().and_then(Path::parent);
    let modules = beside.or_else(|| {
        ["lib/modules", "usr/lib/modules"]
            .iter()
            .filter_map(|dir| root.map(|root| root.join(dir)))
            .filter_map(|dir| fs::read_dir(dir).ok())
            .find_map(|mut entries| entries.next())
            .and_then(|entry| entry.ok())
            .map(|entry| entry.path())
    });
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
    let apt = match suite {
        "sid" | "experimental" => {
            PrivateApt::with_dists(&dir, &[("http://deb.debian.org/debian", suite)])?
        }
        _ => PrivateApt::new(&dir, suite)?,
    };
    println!("vm-test: {version}: fetching Debian {suite}'s cloud kernel with apt");
    apt.apt_get(&["update", "-qq"])?;
    // The metapackage names the current kernel package, linux-image-<release>.
    let depends = apt.apt_cache(&["depends", "linux-image-cloud-amd64"])?;
    let image = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|name| name.starts_with("linux-image-"))
        .with_context(|| format!("no kernel package in {suite}: {depends}"))?
        .to_string();
    let release = image.trim_start_matches("linux-image-").to_string();
    let staging = dir.join("root.partial");
    let _ = fs::remove_dir_all(&staging);
    unpack(&apt, &image, &dir, &staging)?;
    if unpacked_kernel(version, &staging)?.is_none() {
        // Since 7.x (unstable): linux-image-<release> holds no image; linux-binary-<release>
        // has usr/lib/modules/<release>/vmlinuz, linux-modules-<release> the modules.
        for package in [format!("linux-binary-{release}"), format!("linux-modules-{release}")] {
            unpack(&apt, &package, &dir, &staging).with_context(|| {
                format!(
                    "Debian {suite}: {image} holds no boot/vmlinuz-*, and {package} (the \
                     newer layout) could not be fetched; the suite's packaging changed again?"
                )
            })?;
        }
    }
    unpacked_kernel(version, &staging)?.with_context(|| {
        format!(
            "Debian {suite}: neither {image} (boot/vmlinuz-*) nor linux-binary-{release} \
             (usr/lib/modules/{release}/vmlinuz) holds a kernel image"
        )
    })?;
    fs::rename(&staging, &unpacked)?;
    unpacked_kernel(version, &unpacked)?.context("the unpacked kernel moved")
}

/// Downloads `package` and unpacks it into `root` (`dpkg -x`), deleting the .deb.
fn unpack(apt: &PrivateApt, package: &str, dir: &Path, root: &Path) -> anyhow::Result<()> {
    let deb = apt.download(package, &dir.join("debs"))?;
    exec(Command::new("dpkg").arg("-x").arg(&deb).arg(root))?;
    fs::remove_file(&deb)?;
    Ok(())
}

/// The kernel unpacked below `root`: `boot/vmlinuz-<release>` with its modules under
/// (usr/)lib/modules/<release>, or `usr/lib/modules/<release>/vmlinuz` (7.x packages).
fn unpacked_kernel(version: &str, root: &Path) -> anyhow::Result<Option<GuestKernel>> {
    let in_boot = fs::read_dir(root.join("boot")).ok().and_then(|entries| {
        entries.filter_map(Result::ok).map(|entry| entry.path()).find_map(|path| {
            let release = path.file_name()?.to_string_lossy().strip_prefix("vmlinuz-")?.to_string();
            Some((path, release))
        })
    });
    let in_modules = || {
        fs::read_dir(root.join("usr/lib/modules")).ok().and_then(|entries| {
            entries.filter_map(Result::ok).find_map(|entry| {
                let vmlinuz = entry.path().join("vmlinuz");
                vmlinuz
                    .is_file()
                    .then(|| (vmlinuz, entry.file_name().to_string_lossy().into_owned()))
            })
        })
    };
    let Some((vmlinuz, release)) = in_boot.or_else(in_modules) else { return Ok(None) };
    // Merged-/usr packages (trixie on) ship modules under usr/lib/modules.
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| root.join(dir).join(&release))
        .find(|dir| dir.join("modules.order").is_file() || dir.join("kernel").is_dir());
    Ok(Some(GuestKernel { label: version.to_string(), vmlinuz, modules, release: Some(release) }))
}
