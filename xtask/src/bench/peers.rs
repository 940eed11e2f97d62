//! The tools observer is compared with: a bpftrace one-liner and bcc's libbpf-tools.
//!
//! libbpf-tools (CO-RE builds of tcpstates and tcplife) come from Debian trixie, whose
//! package needs a newer glibc than this host's: it is unpacked with `dpkg -x` next to
//! trixie's libc6, libelf1t64, zlib1g and libzstd1, all fetched through a private apt
//! configuration under target/bench/, and started through that glibc's own loader.
//! Nothing is installed on the system.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{apt::PrivateApt, command::exec};

const SUITE: &str = "trixie";
const PACKAGES: [&str; 5] = ["libbpf-tools", "libc6", "libelf1t64", "zlib1g", "libzstd1"];

/// Counts every transition at the tracepoint, the simplest thing a tracer can do.
pub const BPFTRACE_PROGRAM: &str =
    "tracepoint:sock:inet_sock_set_state { @transitions = count(); }";

/// The unpacked libbpf-tools and the directory of their libraries.
pub struct LibbpfTools {
    root: PathBuf,
    lib: PathBuf,
}

impl LibbpfTools {
    /// Unpacks the packages once under `cache`; later runs reuse them.
    pub fn install(cache: &Path) -> anyhow::Result<Self> {
        let dir = cache.join("libbpf-tools");
        let root = dir.join("root");
        if let Some(tools) = Self::unpacked(&root) {
            return Ok(tools);
        }
        println!("bench: fetching libbpf-tools and its libraries from Debian {SUITE}");
        let apt = PrivateApt::new(&dir, SUITE)?;
        apt.apt_get(&["update", "-qq"])?;
        let staging = dir.join("root.partial");
        let _ = fs::remove_dir_all(&staging);
        for package in PACKAGES {
            let deb = apt.download(package, &dir.join("debs"))?;
            exec(Command::new("dpkg").arg("-x").arg(&deb).arg(&staging))?;
        }
        let _ = fs::remove_dir_all(&root);
        fs::rename(&staging, &root)?;
        Self::unpacked(&root).context("the unpacked libbpf-tools lack tcpstates-libbpf or ld-linux")
    }

    fn unpacked(root: &Path) -> Option<Self> {
        let tools = Self { root: root.to_path_buf(), lib: root.join("usr/lib/x86_64-linux-gnu") };
        (tools.tool("tcpstates").is_file() && tools.lib.join("ld-linux-x86-64.so.2").is_file())
            .then_some(tools)
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.root.join("usr/sbin").join(format!("{name}-libbpf"))
    }

    /// `LIB/ld-linux-x86-64.so.2 --library-path LIB <tool>-libbpf`.
    pub fn command(&self, name: &str) -> (PathBuf, Vec<String>) {
        (
            self.lib.join("ld-linux-x86-64.so.2"),
            vec![
                "--library-path".to_string(),
                self.lib.display().to_string(),
                self.tool(name).display().to_string(),
            ],
        )
    }
}

/// Sums libbpf-tools' "lost N events on CPU #c" lines (perf buffer overruns).
pub fn count_lost(stderr: impl std::io::BufRead) -> u64 {
    stderr
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            line.trim().strip_prefix("lost ")?.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// The count bpftrace prints for `@transitions` when it stops.
pub fn bpftrace_count(output: &str) -> Option<u64> {
    output.lines().find_map(|line| line.trim().strip_prefix("@transitions:")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bpftrace_count() {
        assert_eq!(bpftrace_count("Attaching 1 probe...\n\n\n@transitions: 1234\n\n"), Some(1234));
        assert_eq!(bpftrace_count("Attaching 1 probe...\n"), None);
        let stderr = "lost 107 events on CPU #1\nlost 612 events on CPU #0\nother\n";
        assert_eq!(count_lost(stderr.as_bytes()), 719);
    }
}
