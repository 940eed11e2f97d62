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
/// before we looked it up stays unresolved rather than costing a walk per event. An id
/// above every id the last walk saw is a cgroup made since (cgroup ids are kernfs inode
/// numbers, allocated in increasing order): that miss rescans sooner, after
/// [`NEW_CGROUP_RESCAN_INTERVAL`], so a container's first connections get its name.
pub struct CgroupNames {
    root: Option<PathBuf>,
    /// foldhash: resolved for every owner an event carries (SipHash showed in profiles).
    known: HashMap<u64, Cgroup, foldhash::fast::RandomState>,
    scanned_at: Option<Instant>,
    /// The highest id the last walk found.
    newest: u64,
}

const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
const NEW_CGROUP_RESCAN_INTERVAL: Duration = Duration::from_millis(100);
/// Bound on the cache; cgroups come and go with containers.
const MAX_CGROUPS: usize = 65536;

impl CgroupNames {
    /// Names below `root`, the cgroup v2 hierarchy ([`hierarchy`]); none without one.
    pub fn new(root: Option<PathBuf>) -> Self {
        Self { root, known: HashMap::default(), scanned_at: None, newest: 0 }
    }

    pub fn resolve(&mut self, id: u64) -> Option<Cgroup> {
        if id == 0 {
            return None;
        }
        if let Some(cgroup) = self.known.get(&id) {
            return Some(cgroup.clone());
        }
        let interval = if id > self.newest { NEW_CGROUP_RESCAN_INTERVAL } else { RESCAN_INTERVAL };
        let due = self.scanned_at.is_none_or(|at| at.elapsed() >= interval);
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
        self.newest = self.newest.max(metadata.ino());
        self.known.insert(metadata.ino(), Cgroup { path: Arc::from(relative), container_id });
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                self.scan(root, &entry.path());
            }
        }
    }
}

/// The cgroup v2 hierarchy to name cgroups from: `given` (`--path.cgroupfs`) when set —
/// a cgroup2 mount, or a directory holding one as `unified` (hybrid hosts) — else the
/// first cgroup2 mount of our own mount namespace.
///
/// Why a flag: in a container with its own cgroup namespace (Kubernetes on cgroup v2),
/// the container's `/sys/fs/cgroup` is only its own subtree, so every other process's
/// cgroup id would stay unnamed; a bind mount of the host's hierarchy holds them all.
pub fn hierarchy(given: Option<&Path>) -> Result<Option<PathBuf>, crate::error::Error> {
    let Some(given) = given else { return Ok(cgroup2_root()) };
    [given.to_path_buf(), given.join("unified")]
        .into_iter()
        .find(|path| is_cgroup2(path))
        .map(Some)
        .ok_or_else(|| crate::error::Error::NotCgroup2 { path: given.to_path_buf() })
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `.../unified` on
/// hybrid systems).
fn cgroup2_root() -> Option<PathBuf> {
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

    #[test]
    fn refuses_a_directory_that_holds_no_cgroup2_hierarchy() {
        let error = hierarchy(Some(Path::new("/proc"))).unwrap_err();
        assert!(error.to_string().contains("/proc"), "{error}");
    }

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
        let Some(root) = hierarchy(None).unwrap() else {
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
        let mut names = CgroupNames::new(hierarchy(None).unwrap());
        assert_eq!(names.resolve(id).map(|c| c.path.to_string()).as_deref(), Some(path));
    }
}
