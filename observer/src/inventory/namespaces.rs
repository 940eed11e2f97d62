//! The network namespaces of the host, and listing each from a thread of its own.

use std::{
    collections::HashSet,
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::sock_diag::{Detail, DiagSocket, dump_tcp_sockets};

/// Network namespaces visible from here: (inode, a path that opens it).
pub fn network_namespaces() -> Vec<(u32, PathBuf)> {
    let mut candidates = vec![PathBuf::from("/proc/self/ns/net")];
    for directory in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(directory) {
            candidates.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                candidates.push(entry.path().join("ns/net"));
            }
        }
    }
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter_map(|path| {
            // Processes come and go, and named namespaces are removed: skip what vanished.
            let inode = std::fs::metadata(&path).ok()?.ino() as u32;
            seen.insert(inode).then_some((inode, path))
        })
        .collect()
}

/// One network namespace, ready to be listed from the inventory thread.
pub(super) struct Namespace<'a> {
    path: &'a Path,
    detail: Detail,
}

impl Namespace<'_> {
    /// Enters the namespace and hands each of its sockets to `visit` as the kernel lists
    /// them.
    pub(super) fn list(self, visit: impl FnMut(DiagSocket)) -> io::Result<()> {
        let namespace = File::open(self.path)?;
        nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)?;
        dump_tcp_sockets(self.detail, visit)
    }
}

/// Hands each namespace in turn to `visit` (with its inode) on a thread of its own (see
/// the module documentation); returns how many namespaces could not be listed.
pub(super) fn for_each_namespace(
    detail: Detail,
    mut visit: impl FnMut(u32, Namespace<'_>) -> io::Result<()> + Send,
) -> u64 {
    std::thread::scope(|scope| {
        let dumper =
            std::thread::Builder::new().name("inventory".into()).spawn_scoped(scope, move || {
                let mut failures = 0;
                for (netns, path) in network_namespaces() {
                    if let Err(error) = visit(netns, Namespace { path: &path, detail }) {
                        log::debug!("cannot list the sockets of {}: {error}", path.display());
                        failures += 1;
                    }
                }
                failures
            });
        match dumper.map(|thread| thread.join()) {
            Ok(Ok(failures)) => failures,
            _ => {
                log::warn!("the socket inventory thread failed");
                1
            }
        }
    })
}
