//! Who owns a socket: the process captured in the socket's own system calls, and the
//! cgroup (and container) it ran in.
//!
//! The kernel side records the calling task only where the task *is* the owner: the
//! system calls that move a socket into SYN_SENT (connect), LISTEN, FIN_WAIT1 or
//! LAST_ACK (close, shutdown), and accept()'s return. Every other transition may run in
//! softirq or a timer, on behalf of whichever task was interrupted, so it carries no
//! owner and never overwrites one. A socket none of those calls touched while we
//! watched has an unknown owner, and says so.

use std::{
    collections::HashMap,
    fmt,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A process, as the kernel saw it in one of the socket's system calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    /// The thread that made the call.
    pub tid: u32,
    pub comm: Comm,
    /// cgroup v2 id: the inode of the process's cgroupfs directory.
    pub cgroup_id: u64,
}

impl Process {
    /// `None` where the kernel side captured nothing (pid 0).
    pub fn from_kernel(owner: &observer_common::Owner) -> Option<Self> {
        (owner.pid != 0).then_some(Self {
            pid: owner.pid,
            tid: owner.tid,
            comm: Comm(owner.comm),
            cgroup_id: owner.cgroup_id,
        })
    }
}

/// `task->comm`: up to 15 bytes, NUL-padded; kept inline so events stay allocation-free.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl From<&str> for Comm {
    fn from(name: &str) -> Self {
        let mut bytes = [0u8; 16];
        let len = name.len().min(15);
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self(bytes)
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl Serialize for Comm {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.as_str())
    }
}

impl<'de> Deserialize<'de> for Comm {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(Comm::from(name.as_str()))
    }
}

/// Who holds each socket right now, by socket inode, from every process's descriptor
/// table (`/proc/<pid>/fd/*` → `socket:[inode]`, as `ss -p` finds them).
///
/// Used once, at startup, for sockets older than the daemon: their connect() or
/// accept() happened before we watched. A socket several processes hold (fork, passed
/// descriptors) is attributed to the one with the lowest pid, the likeliest parent.
pub fn socket_holders() -> HashMap<u32, Process> {
    let mut holders: HashMap<u32, Process> = HashMap::new();
    let Ok(processes) = std::fs::read_dir("/proc") else { return holders };
    let root = cgroup2_root();
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(descriptors) = std::fs::read_dir(process.path().join("fd")) else { continue };
        let mut owner = None;
        for descriptor in descriptors.flatten() {
            let Ok(target) = std::fs::read_link(descriptor.path()) else { continue };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let owner = owner.get_or_insert_with(|| process_of(pid, root.as_deref()));
            let Some(owner) = owner else { break };
            holders
                .entry(inode)
                .and_modify(|held| {
                    if owner.pid < held.pid {
                        *held = *owner;
                    }
                })
                .or_insert(*owner);
        }
    }
    holders
}

/// A running process as `/proc` describes it; None if it exited meanwhile.
fn process_of(pid: u32, cgroup_root: Option<&Path>) -> Option<Process> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let cgroup_id = cgroup_root
        .and_then(|root| {
            let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            let path = cgroups.lines().find_map(|line| line.strip_prefix("0::"))?;
            std::fs::metadata(root.join(path.trim_start_matches('/'))).ok()
        })
        .map_or(0, |metadata| metadata.ino());
    Some(Process { pid, tid: pid, comm: Comm::from(comm.trim_end()), cgroup_id })
}

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
    fn finds_the_holder_of_our_own_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            let text = link.to_str().unwrap().to_string();
            text.trim_start_matches("socket:[").trim_end_matches(']').parse::<u32>().unwrap()
        };
        let holders = socket_holders();
        let holder = holders.get(&inode).expect("our listener's holder");
        assert_eq!(holder.pid, std::process::id());
        let own_comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(holder.comm.as_str(), own_comm.trim_end());
    }

    #[test]
    fn comm_round_trips_through_json() {
        let comm = Comm::from("a-very-long-process-name");
        assert_eq!(comm.as_str(), "a-very-long-pro");
        let json = serde_json::to_string(&comm).unwrap();
        assert_eq!(json, "\"a-very-long-pro\"");
        assert_eq!(serde_json::from_str::<Comm>(&json).unwrap(), comm);
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
