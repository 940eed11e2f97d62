//! Cgroup ids resolved to paths, and the container id a path names.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

/// A cgroup, by path, and the container it belongs to when the path names one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Path below the cgroup v2 root, e.g. `/system.slice/nginx.service`.
    pub path: Arc<str>,
    pub container_id: Option<Arc<str>>,
}

/// Maps cgroup ids to paths by walking the cgroup v2 hierarchy, with a cache.
///
/// A miss rescans the hierarchy at most once per [`RESCAN_INTERVAL`]: a cgroup removed
/// before we looked it up stays unresolved rather than costing a walk per event.
pub struct CgroupNames {
    root: Option<PathBuf>,
    /// foldhash: resolved for every owner an event carries (SipHash showed in profiles).
    known: HashMap<u64, Cgroup, foldhash::fast::RandomState>,
    scanned_at: Option<Instant>,
}

const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on the cache; cgroups come and go with containers.
const MAX_CGROUPS: usize = 65536;

impl Default for CgroupNames {
    fn default() -> Self {
        Self::new()
    }
}

impl CgroupNames {
    pub fn new() -> Self {
        Self { root: cgroup2_root(), known: HashMap::default(), scanned_at: None }
    }

    pub fn resolve(&mut self, id: u64) -> Option<Cgroup> {
        if id == 0 {
            return None;
        }
        if let Some(cgroup) = self.known.get(&id) {
            return Some(cgroup.clone());
        }
        let due = self.scanned_at.is_none_or(|at| at.elapsed() >= RESCAN_INTERVAL);
        if due && let Some(root) = self.root.clone() {
            self.scanned_at = Some(Instant::now());
            if self.known.len() > MAX_CGROUPS {
                self.known.clear();
            }
            self.scan(&root, &root);
        }
        self.known.get(&id).cloned()
    }

    fn scan(&mut self, root: &Path, dir: &Path) {
        let Ok(metadata) = std::fs::metadata(dir) else { return };
        let relative = match dir.strip_prefix(root) {
            Ok(relative) if relative.as_os_str().is_empty() => "/".to_string(),
            Ok(relative) => format!("/{}", relative.display()),
            Err(_) => return,
        };
        let container_id = container_id(&relative).map(Arc::from);
        self.known.insert(metadata.ino(), Cgroup { path: Arc::from(relative), container_id });
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                self.scan(root, &entry.path());
            }
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `.../unified` on
/// hybrid systems).
pub(super) fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        // <id> <parent> <dev> <root> <mount point> <options> ... - <fstype> <source> ...
        let (before, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        before.split(' ').nth(4).map(PathBuf::from)
    })
}

/// The container id in a cgroup path, as container runtimes name their cgroups:
/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope`, or a bare `<id>` directory (cgroupfs driver), 64 hex digits.
pub fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|segment| {
        let name = segment.strip_suffix(".scope").unwrap_or(segment);
        let id = name.rsplit(['-', ':']).next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c9a2b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

    #[test]
    fn finds_container_ids_of_common_runtimes() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{ID}.scope"
            ),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/docker/{ID}"),
            format!("/kubepods/besteffort/pod7/{ID}"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
        assert_eq!(container_id("/system.slice/nginx.service"), None);
        assert_eq!(container_id("/user.slice/user-1000.slice/session-2.scope"), None);
    }

    #[test]
    fn resolves_our_own_cgroup() {
        let Some(root) = cgroup2_root() else {
            eprintln!("skipping: no cgroup v2 hierarchy");
            return;
        };
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let Some(path) = own.lines().find_map(|line| line.strip_prefix("0::")) else {
            eprintln!("skipping: not in a cgroup v2 hierarchy");
            return;
        };
        let directory = root.join(path.trim_start_matches('/'));
        let id = std::fs::metadata(&directory).unwrap().ino();
        let mut names = CgroupNames::new();
        assert_eq!(names.resolve(id).map(|c| c.path.to_string()).as_deref(), Some(path));
    }
}
