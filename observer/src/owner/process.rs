//! A process as the kernel recorded it in one of a socket's system calls: plain data,
//! no I/O, so the decoder, the tracker and the classifier can carry it.

use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_round_trips_through_json() {
        let comm = Comm::from("a-very-long-process-name");
        assert_eq!(comm.as_str(), "a-very-long-pro");
        let json = serde_json::to_string(&comm).unwrap();
        assert_eq!(json, "\"a-very-long-pro\"");
        assert_eq!(serde_json::from_str::<Comm>(&json).unwrap(), comm);
    }
}
