//! The guest's whole filesystem, as an uncompressed newc cpio archive (the kernel unpacks
//! it into a tmpfs and runs `/init`): busybox, the daemon and the scenario binary, the
//! host tools the scenarios drive (iproute2, Prometheus) with their shared libraries,
//! and the kernel modules the scenarios need (veth, tcp_diag).

use std::{
    collections::BTreeMap,
    fs,
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::command::output;

/// The guest's `/init`: mount what the scenarios need, load modules, run the scenario
/// binary, report one result line, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /var
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || mount -t debugfs debugfs /sys/kernel/debug
ln -s /run /var/run
for module in $(cat /etc/modules); do
    insmod "/lib/modules/$module.ko" || echo "vm-test-phase: insmod $module failed"
done
ip link set lo up
echo "vm-test-phase: kernel $(uname -r) up, running the scenarios"
if [ -e /etc/record ]; then export OBSERVER_RECORD_DIR=/tmp/streams; fi
# Guests run under TCG: latency bounds of the load tests are scaled (tests/src/daemon.rs).
export OBSERVER_TEST_EMULATED=1
OBSERVER_BIN=/bin/observer /bin/observer-tests --test-threads=1 $(cat /etc/test-args)
status=$?
# Recorded event streams travel back over the console, one prefixed line at a time.
if [ -d /tmp/streams ]; then
    find /tmp/streams -mindepth 2 -name '*.jsonl' | while read -r file; do
        sed "s|^|vm-test-file ${file#/tmp/streams/}: |" "$file"
    done
fi
echo "vm-test-result: $(uname -r) exit=$status"
poweroff -f
"#;

/// Modules the scenarios need beyond what Debian builds in.
const MODULES: [&str; 2] = ["veth", "tcp_diag"];

enum Entry {
    Dir,
    File { source: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

#[derive(Default)]
pub struct Initramfs {
    /// Guest path (without leading '/') → entry; sorted, so parents precede children.
    entries: BTreeMap<String, Entry>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

impl Initramfs {
    /// The standard contents for one kernel.
    pub fn for_guest(
        busybox: &Path,
        observer: &Path,
        scenarios: &Path,
        modules: Option<&Path>,
        harness_args: &[String],
        record: bool,
    ) -> anyhow::Result<Self> {
        let mut image = Self::default();
        image.bytes("init", INIT.as_bytes().to_vec(), 0o755);
        image.file("bin/busybox", busybox, 0o755);
        image.symlink("bin/sh", "busybox");
        image.file("bin/observer", observer, 0o755);
        image.file("bin/observer-tests", scenarios, 0o755);
        for tool in ["ip", "ss", "nstat", "prometheus", "promtool", "bpftool", "curl", "setpriv"] {
            image.host_binary(tool)?;
        }
        let loaded = match modules {
            Some(dir) => image.modules(dir, &MODULES)?,
            None => {
                println!("vm-test: no kernel modules given; the kernel must have veth built in");
                Vec::new()
            }
        };
        image.bytes("etc/modules", loaded.join("\n").into_bytes(), 0o644);
        image.bytes("etc/test-args", harness_args.join(" ").into_bytes(), 0o644);
        if record {
            image.bytes("etc/record", Vec::new(), 0o644);
        }
        image.bytes("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644);
        for dir in ["proc", "sys", "dev", "run", "tmp", "var", "root"] {
            image.dir(dir);
        }
        Ok(image)
    }

    fn dir(&mut self, path: &str) {
        let mut prefix = String::new();
        for part in path.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn file(&mut self, path: &str, source: &Path, mode: u32) {
        self.parent(path);
        self.entries.insert(path.into(), Entry::File { source: source.into(), mode });
    }

    fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parent(path);
        self.entries.insert(path.into(), Entry::Bytes { data, mode });
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.entries.insert(path.into(), Entry::Symlink(target.into()));
    }

    /// A host program at its host path, with the shared libraries `ldd` lists.
    fn host_binary(&mut self, program: &str) -> anyhow::Result<()> {
        let path = output(Command::new("sh").args(["-c", &format!("command -v {program}")]))
            .map(|path| path.trim().to_string())
            .filter(|path| !path.is_empty())
            .with_context(|| format!("{program} is not installed on this host"))?;
        let real = fs::canonicalize(&path)?;
        self.file(path.trim_start_matches('/'), &real, 0o755);
        let libraries = output(Command::new("ldd").arg(&real)).unwrap_or_default();
        for line in libraries.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux… (0x…)"
            let library = line
                .split("=>")
                .last()
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|path| path.starts_with('/'));
            if let Some(library) = library {
                let source = fs::canonicalize(library)?;
                self.file(library.trim_start_matches('/'), &source, 0o755);
            }
        }
        Ok(())
    }

    /// Adds `names` and what they depend on (decompressed, dependencies first); returns
    /// the load order.
    fn modules(&mut self, dir: &Path, names: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut order = Vec::new();
        for name in names {
            self.module(dir, name, &mut order)?;
        }
        Ok(order)
    }

    fn module(&mut self, dir: &Path, name: &str, order: &mut Vec<String>) -> anyhow::Result<()> {
        let name = name.replace('-', "_");
        if order.contains(&name) {
            return Ok(());
        }
        let Some(file) = find_module(&dir.join("kernel"), &name) else {
            let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
            if !builtin.lines().any(|line| line.replace('-', "_").ends_with(&format!("/{name}.ko")))
            {
                bail!("kernel module {name} is neither in {} nor built in", dir.display());
            }
            return Ok(());
        };
        let depends = output(Command::new("modinfo").args(["-F", "depends"]).arg(&file))
            .with_context(|| format!("modinfo {}", file.display()))?;
        for dependency in depends.trim().split(',').filter(|d| !d.is_empty()) {
            self.module(dir, dependency, order)?;
        }
        let data = decompress(&file)?;
        self.bytes(&format!("lib/modules/{name}.ko"), data, 0o644);
        order.push(name);
        Ok(())
    }

    /// Writes the archive; returns its size in bytes.
    pub fn write(&self, path: &Path) -> anyhow::Result<u64> {
        let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut out = BufWriter::new(file);
        for (inode, (name, entry)) in self.entries.iter().enumerate() {
            let builder = cpio::newc::Builder::new(name).ino(inode as u32 + 1).nlink(1);
            out = match entry {
                Entry::Dir => builder.mode(S_IFDIR | 0o755).write(out, 0).finish()?,
                Entry::Symlink(target) => {
                    let mut writer = builder.mode(S_IFLNK | 0o777).write(out, target.len() as u32);
                    writer.write_all(target.as_bytes())?;
                    writer.finish()?
                }
                Entry::Bytes { data, mode } => {
                    let mut writer = builder.mode(S_IFREG | mode).write(out, data.len() as u32);
                    writer.write_all(data)?;
                    writer.finish()?
                }
                Entry::File { source, mode } => {
                    let data =
                        fs::read(source).with_context(|| format!("read {}", source.display()))?;
                    let mut writer = builder.mode(S_IFREG | mode).write(out, data.len() as u32);
                    writer.write_all(&data)?;
                    writer.finish()?
                }
            };
        }
        let out = cpio::newc::trailer(out)?;
        let file = out.into_inner().map_err(|error| error.into_error())?;
        Ok(file.metadata()?.len())
    }
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
            continue;
        }
        let file = entry.file_name().to_string_lossy().replace('-', "_");
        let stem = file
            .strip_suffix(".ko")
            .or_else(|| file.strip_suffix(".ko.xz"))
            .or_else(|| file.strip_suffix(".ko.zst"));
        if stem == Some(name) {
            return Some(path);
        }
    }
    None
}

/// busybox insmod wants plain ELF: Debian ships xz- or zstd-compressed modules.
fn decompress(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return Ok(fs::read(path)?);
    };
    let output = Command::new(tool).arg("-dc").arg(path).output()?;
    if !output.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(output.stdout)
}
