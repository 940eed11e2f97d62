//! Who holds each socket now, from every process's descriptor table in `/proc`.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::Path};

use super::process::{Comm, Process};

/// Who holds each socket right now, by socket inode, from every process's descriptor
/// table (`/proc/<pid>/fd/*` → `socket:[inode]`, as `ss -p` finds them).
///
/// Used once, at startup, for sockets older than the daemon: their connect() or
/// accept() happened before we watched. A socket several processes hold (fork, passed
/// descriptors) is attributed to the one with the lowest pid, the likeliest parent.
///
/// Cgroup ids come from `/proc/<pid>/cgroup` paths below `cgroup_root`; those paths are
/// relative to our own cgroup namespace, so in a container with a private one only the
/// container's own processes get an id (the others' paths climb out with `/..`).
pub fn socket_holders(cgroup_root: Option<&Path>) -> HashMap<u32, Process> {
    let mut holders: HashMap<u32, Process> = HashMap::new();
    let Ok(processes) = std::fs::read_dir("/proc") else { return holders };
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
            let owner = owner.get_or_insert_with(|| process_of(pid, cgroup_root));
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
            if path.starts_with("/..") {
                return None;
            }
            std::fs::metadata(root.join(path.trim_start_matches('/'))).ok()
        })
        .map_or(0, |metadata| metadata.ino());
    Some(Process { pid, tid: pid, comm: Comm::from(comm.trim_end()), cgroup_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_of_our_own_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            let text = link.to_str().unwrap().to_string();
            text.trim_start_matches("socket:[").trim_end_matches(']').parse::<u32>().unwrap()
        };
        let root = super::super::cgroup::hierarchy(None).unwrap();
        let holders = socket_holders(root.as_deref());
        let holder = holders.get(&inode).expect("our listener's holder");
        assert_eq!(holder.pid, std::process::id());
        let own_comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(holder.comm.as_str(), own_comm.trim_end());
    }
}
