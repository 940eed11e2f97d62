//! How a closed connection is shown to people: the JSON object of `/connections` and
//! `observer watch --json`, and the text line of `observer watch`.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    classify::{Cause, Class, ResetSeen, Role},
    event::Snapshot,
    tcp::TcpState,
    tracker::ClosedConnection,
};

/// One closed connection, ready to serialise.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionReport {
    /// Position in the daemon's stream of verdicts (1, 2, …); 0 outside the daemon.
    pub seq: u64,
    /// Wall-clock time of the final transition (RFC 3339, UTC).
    pub closed_at: String,
    /// Network namespace inode (as in `readlink /proc/PID/ns/net`).
    pub netns: u32,
    /// Socket cookie (as in `ss -e`).
    pub cookie: u64,
    pub family: &'static str,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub role: Role,
    pub port: u16,
    pub class: Class,
    pub cause: Cause,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'static str>,
    /// States visited, in order, ending with `close`.
    pub states: Vec<TcpState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Bytes we sent that the peer acknowledged.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub retransmits: u32,
    pub srtt_us: u32,
    pub sk_err: i32,
    /// RSTs this socket sent or received.
    pub resets: Vec<ResetSeen>,
    /// The socket as it was at the final transition.
    pub evidence: Snapshot,
}

/// Converts kernel CLOCK_MONOTONIC timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock minus monotonic time, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        Self { offset_ns: wall as i128 - i128::from(monotonic_ns()) }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let wall = (i128::from(monotonic_ns) + self.offset_ns).max(0);
        UNIX_EPOCH + Duration::from_nanos(wall as u64)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl ConnectionReport {
    pub fn new(closed: &ClosedConnection, clock: &Clock) -> Self {
        Self {
            seq: 0,
            closed_at: humantime::format_rfc3339_millis(clock.wall(closed.closed_at_ns))
                .to_string(),
            netns: closed.netns,
            cookie: closed.cookie,
            family: if closed.local.is_ipv6() { "ipv6" } else { "ipv4" },
            local: closed.local,
            remote: closed.remote,
            role: closed.role,
            port: closed.port,
            class: closed.verdict.class(),
            cause: closed.verdict.cause,
            detail: closed.verdict.detail,
            states: closed.states.clone(),
            duration_seconds: closed.duration_ns.map(|ns| ns as f64 / 1e9),
            bytes_acked: closed.snapshot.bytes_acked,
            bytes_received: closed.snapshot.bytes_received,
            retransmits: closed.snapshot.total_retrans,
            srtt_us: closed.snapshot.srtt_us,
            sk_err: closed.snapshot.sk_err,
            resets: closed.resets.clone(),
            evidence: closed.snapshot,
        }
    }

    /// Column titles matching [`ConnectionReport::line`].
    pub fn header() -> String {
        format!(
            "{:<12} {:<7} {:<42} {:<42} {:<8} {:<16} {:>10} {:>10} {:>10} {:>7}",
            "TIME",
            "ROLE",
            "LOCAL",
            "REMOTE",
            "CLASS",
            "CAUSE",
            "MS",
            "TX_BYTES",
            "RX_BYTES",
            "RETRANS"
        )
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let time = self.closed_at.get(11..23).unwrap_or(&self.closed_at);
        let duration = self
            .duration_seconds
            .map(|seconds| format!("{:.3}", seconds * 1e3))
            .unwrap_or_else(|| "-".into());
        let cause = match self.detail {
            Some(detail) => format!("{}({detail})", self.cause.name()),
            None => self.cause.name().to_string(),
        };
        format!(
            "{:<12} {:<7} {:<42} {:<42} {:<8} {:<16} {:>10} {:>10} {:>10} {:>7}",
            time,
            self.role.name(),
            self.local.to_string(),
            self.remote.to_string(),
            self.class.name(),
            cause,
            duration,
            self.bytes_acked,
            self.bytes_received,
            self.retransmits
        )
    }
}
