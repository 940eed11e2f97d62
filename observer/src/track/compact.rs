//! Compact forms of what a tracked socket keeps: a busy host has hundreds of thousands
//! of sockets open, so each keeps its states four bits each, its addresses without
//! `SocketAddr`'s padding, and its owner shared with the other sockets of the same
//! process.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::{owner::process::Process, tcp::TcpState};

/// The states a socket went through, first to current, four bits each (the first in the
/// lowest bits, 0 = none). Past [`StatePath::CAPACITY`] states, the last one shown is the
/// current state. A value, not a `Vec`: a verdict carries it to `/connections`, which
/// keeps it long after, and freeing allocations that old is costly under churn
/// (docs/benchmarks.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatePath(u64);

impl StatePath {
    const CAPACITY: u32 = u64::BITS / 4;

    pub fn len(self) -> u32 {
        (u64::BITS - self.0.leading_zeros()).div_ceil(4)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn get(self, index: u32) -> TcpState {
        TcpState::ALL[((self.0 >> (4 * index)) & 0xf) as usize - 1]
    }

    pub fn last(self) -> Option<TcpState> {
        self.len().checked_sub(1).map(|index| self.get(index))
    }

    /// First to last.
    pub fn iter(self) -> impl Iterator<Item = TcpState> {
        (0..self.len()).map(move |index| self.get(index))
    }

    /// Appends `state` unless the socket is already in it.
    pub(crate) fn push(&mut self, state: TcpState) {
        if self.last() == Some(state) {
            return;
        }
        let index = self.len().min(Self::CAPACITY - 1);
        let code = state as u64 + 1;
        self.0 = self.0 & !(0xf << (4 * index)) | code << (4 * index);
    }

    pub fn to_vec(self) -> Vec<TcpState> {
        self.iter().collect()
    }
}

/// As the list of states it is.
impl Serialize for StatePath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// A socket address in 19 bytes instead of `SocketAddr`'s 32 (the tracepoint's
/// addresses carry no IPv6 flow label or scope).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Address {
    ip: [u8; 16],
    port: [u8; 2],
    v6: bool,
}

impl From<SocketAddr> for Address {
    fn from(address: SocketAddr) -> Self {
        let mut ip = [0; 16];
        let v6 = match address {
            SocketAddr::V4(v4) => {
                ip[..4].copy_from_slice(&v4.ip().octets());
                false
            }
            SocketAddr::V6(v6) => {
                ip = v6.ip().octets();
                true
            }
        };
        Self { ip, port: address.port().to_ne_bytes(), v6 }
    }
}

impl From<Address> for SocketAddr {
    fn from(address: Address) -> Self {
        let port = u16::from_ne_bytes(address.port);
        if address.v6 {
            SocketAddr::from((Ipv6Addr::from(address.ip), port))
        } else {
            let [a, b, c, d, ..] = address.ip;
            SocketAddr::from((Ipv4Addr::new(a, b, c, d), port))
        }
    }
}

/// The owners of tracked sockets, each stored once however many sockets it owns.
#[derive(Default)]
pub(crate) struct Owners {
    /// foldhash: looked up for every connect(), listen(), accept() and close(), where
    /// std's SipHash showed in profiles. Randomly seeded per daemon as std's is; the
    /// keys are this host's processes, not remote input.
    shared: HashSet<Arc<Process>, foldhash::fast::RandomState>,
    /// Size of `shared` after the last sweep of owners no socket refers to any more.
    after_sweep: usize,
}

impl Owners {
    /// Below this many owners a sweep is not worth its pass.
    const MIN_SWEEP: usize = 1024;

    pub(crate) fn share(&mut self, process: Process) -> Arc<Process> {
        if let Some(shared) = self.shared.get(&process) {
            return Arc::clone(shared);
        }
        // Sweeping whenever the set has doubled keeps it within twice the live owners at
        // a constant cost per insertion.
        if self.shared.len() >= (2 * self.after_sweep).max(Self::MIN_SWEEP) {
            self.shared.retain(|owner| Arc::strong_count(owner) > 1);
            self.after_sweep = self.shared.len();
        }
        let shared = Arc::new(process);
        self.shared.insert(Arc::clone(&shared));
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_path_keeps_its_first_states_and_the_current_one() {
        use TcpState::*;
        let mut path = StatePath::default();
        for _ in 0..20 {
            path.push(Established);
            path.push(CloseWait);
        }
        path.push(CloseWait);
        path.push(Close);
        let states = path.to_vec();
        assert_eq!(states.len(), StatePath::CAPACITY as usize);
        assert_eq!(states[..3], [Established, CloseWait, Established]);
        assert_eq!(states.last(), Some(&Close));
        for state in TcpState::ALL {
            let mut path = StatePath::default();
            path.push(state);
            assert_eq!(path.to_vec(), vec![state]);
        }
    }

    #[test]
    fn addresses_survive_their_compact_form() {
        for text in ["10.0.0.1:40000", "0.0.0.0:0", "[::ffff:10.0.0.1]:443", "[2001:db8::1]:80"] {
            let address: SocketAddr = text.parse().unwrap();
            assert_eq!(SocketAddr::from(Address::from(address)), address);
        }
    }

    #[test]
    fn sockets_of_one_process_share_its_owner_and_unowned_ones_are_swept() {
        let mut owners = Owners::default();
        let process = |pid| Process { pid, tid: pid, comm: "curl".into(), cgroup_id: 0 };
        let first = owners.share(process(1));
        assert!(Arc::ptr_eq(&first, &owners.share(process(1))));
        for pid in 2..=Owners::MIN_SWEEP as u32 + 1 {
            owners.share(process(pid));
        }
        // Only the owner still referred to survives the sweep, besides the newest.
        assert_eq!(owners.shared.len(), 2);
        assert!(Arc::ptr_eq(&first, &owners.share(process(1))));
    }
}
