//! How a closed connection is shown to people: the JSON object of `/connections` and
//! `observer watch --json`, and the text line of `observer watch`.

use std::net::SocketAddr;

use serde::Serialize;

use crate::{
    capture::decode::Snapshot,
    classify::{Cause, Class, ResetSeen, Role},
    clock::{Clock, monotonic_ns},
    inventory::{DiagSocket, TcpStats},
    owner::{Cgroup, CgroupNames, Process},
    tcp::TcpState,
    track::{ClosedConnection, LiveSocket},
};

/// One connection, open or closed, ready to serialise: the records of `/connections`
/// and `observer watch --json` (schema: `docs/connections.schema.json`).
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionReport {
    /// Position in the daemon's stream of verdicts (1, 2, …): closed connections in the
    /// daemon only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub status: Status,
    /// Current state (`close` once closed).
    pub state: TcpState,
    /// Wall-clock time of the open (RFC 3339, UTC); null for sockets older than the
    /// daemon.
    pub opened_at: Option<String>,
    /// Wall-clock time of the final transition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
    /// Network namespace inode (as in `readlink /proc/PID/ns/net`).
    pub netns: u32,
    /// Socket cookie (as in `ss -e`); 0 where the kernel offered none.
    pub cookie: u64,
    pub family: &'static str,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub role: Role,
    pub port: u16,
    pub owner: OwnerReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'static str>,
    /// States visited while we watched, in order (ending with `close` once closed).
    pub states: Vec<TcpState>,
    /// Open to close, or to now for an open connection; null if the open is unknown.
    pub duration_seconds: Option<f64>,
    /// Bytes we sent that the peer acknowledged.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub retransmits: u32,
    pub srtt_us: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sk_err: Option<i32>,
    /// RSTs this socket sent or received (closed connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets: Option<Vec<ResetSeen>>,
    /// The socket as it was at the final transition (closed connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Snapshot>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Open,
    Closed,
}

/// The owning process, or the string `"unknown"`: never a guess.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OwnerReport {
    Known {
        pid: u32,
        comm: String,
        /// cgroup v2 path; null if the cgroup is gone or there is no v2 hierarchy.
        cgroup: Option<String>,
        /// Container id (64 hex digits) when the cgroup path names one.
        container_id: Option<String>,
    },
    Unknown(&'static str),
}

impl OwnerReport {
    pub fn new(owner: Option<&Process>, cgroups: &mut CgroupNames) -> Self {
        Self::with_cgroup(owner, owner.and_then(|process| cgroups.resolve(process.cgroup_id)))
    }

    /// `cgroup`: the owner's, resolved earlier.
    pub fn with_cgroup(owner: Option<&Process>, cgroup: Option<Cgroup>) -> Self {
        match owner {
            Some(process) => OwnerReport::Known {
                pid: process.pid,
                comm: process.comm.to_string(),
                cgroup: cgroup.as_ref().map(|c| c.path.to_string()),
                container_id: cgroup.and_then(|c| c.container_id.map(|id| id.to_string())),
            },
            None => OwnerReport::Unknown("unknown"),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            OwnerReport::Known { pid, .. } => Some(*pid),
            OwnerReport::Unknown(_) => None,
        }
    }

    /// `comm:pid`, or `unknown`.
    pub fn short(&self) -> String {
        match self {
            OwnerReport::Known { pid, comm, .. } => format!("{comm}:{pid}"),
            OwnerReport::Unknown(text) => (*text).to_string(),
        }
    }
}

fn family(address: &SocketAddr) -> &'static str {
    if address.is_ipv6() { "ipv6" } else { "ipv4" }
}

impl ConnectionReport {
    pub fn new(closed: &ClosedConnection, clock: &Clock, cgroups: &mut CgroupNames) -> Self {
        let cgroup = closed.owner.as_ref().and_then(|owner| cgroups.resolve(owner.cgroup_id));
        Self::closed(closed, clock, cgroup)
    }

    /// As [`Self::new`], with the owner's cgroup resolved earlier.
    pub fn closed(closed: &ClosedConnection, clock: &Clock, cgroup: Option<Cgroup>) -> Self {
        Self {
            seq: None,
            status: Status::Closed,
            state: TcpState::Close,
            opened_at: closed.opened_ns.map(|ns| clock.rfc3339(ns)),
            closed_at: Some(clock.rfc3339(closed.closed_at_ns)),
            netns: closed.netns,
            cookie: closed.cookie,
            family: family(&closed.local),
            local: closed.local,
            remote: closed.remote,
            role: closed.role,
            port: closed.port,
            owner: OwnerReport::with_cgroup(closed.owner.as_ref(), cgroup),
            class: Some(closed.verdict.class()),
            cause: Some(closed.verdict.cause),
            detail: closed.verdict.detail,
            states: closed.states.to_vec(),
            duration_seconds: closed.duration_ns.map(|ns| ns as f64 / 1e9),
            bytes_acked: closed.snapshot.bytes_acked,
            bytes_received: closed.snapshot.bytes_received,
            retransmits: closed.snapshot.total_retrans,
            srtt_us: closed.snapshot.srtt_us,
            sk_err: Some(closed.snapshot.sk_err),
            resets: Some(closed.resets.to_vec()),
            evidence: Some(closed.snapshot),
        }
    }

    /// An open socket the tracker follows, with counters from the inventory if it has
    /// the socket.
    pub fn open(
        live: &LiveSocket,
        stats: Option<TcpStats>,
        service_port: u16,
        clock: &Clock,
        cgroups: &mut CgroupNames,
    ) -> Self {
        let now = monotonic_ns();
        Self {
            opened_at: live.opened_ns.map(|ns| clock.rfc3339(ns)),
            owner: OwnerReport::new(live.owner.as_ref(), cgroups),
            states: live.states.clone(),
            duration_seconds: live.opened_ns.map(|ns| now.saturating_sub(ns) as f64 / 1e9),
            ..Self::open_socket(live.state, live.netns, live.cookie, (live.local, live.remote))
                .with(live.role, service_port, stats)
        }
    }

    /// A socket only the inventory knows: older than the daemon and quiet since, or in
    /// TIME_WAIT. Its owner and open time are unknown; its role only where the dump
    /// shows it (see [`crate::inventory::NamespaceSockets::role`]).
    pub fn inventoried(netns: u32, socket: &DiagSocket, service_port: u16, role: Role) -> Self {
        Self::open_socket(socket.state, netns, socket.cookie, (socket.local, socket.remote)).with(
            role,
            service_port,
            socket.stats,
        )
    }

    /// An open socket with nothing known beyond its identity and state.
    fn open_socket(
        state: TcpState,
        netns: u32,
        cookie: u64,
        (local, remote): (SocketAddr, SocketAddr),
    ) -> Self {
        Self {
            seq: None,
            status: Status::Open,
            state,
            opened_at: None,
            closed_at: None,
            netns,
            cookie,
            family: family(&local),
            local,
            remote,
            role: Role::Unknown,
            port: 0,
            owner: OwnerReport::Unknown("unknown"),
            class: None,
            cause: None,
            detail: None,
            states: vec![state],
            duration_seconds: None,
            bytes_acked: 0,
            bytes_received: 0,
            retransmits: 0,
            srtt_us: 0,
            sk_err: None,
            resets: None,
            evidence: None,
        }
    }

    /// Role, service port and the kernel's counters (`tcp_info`), where known.
    fn with(mut self, role: Role, port: u16, stats: Option<TcpStats>) -> Self {
        let stats = stats.unwrap_or_default();
        self.role = role;
        self.port = port;
        self.bytes_acked = stats.bytes_acked;
        self.bytes_received = stats.bytes_received;
        self.retransmits = stats.total_retrans;
        self.srtt_us = stats.srtt_us;
        self
    }

    /// Column titles matching [`ConnectionReport::line`].
    pub fn header() -> String {
        format!(
            "{:<12} {:<10} {:<22} {:<7} {:<42} {:<42} {:<8} {:<16} {:>10} {:>10} {:>10} {:>7}",
            "TIME",
            "NETNS",
            "OWNER",
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
        let stamp = self.closed_at.as_deref().or(self.opened_at.as_deref()).unwrap_or("-");
        let time = stamp.get(11..23).unwrap_or(stamp);
        let duration = self
            .duration_seconds
            .map(|seconds| format!("{:.3}", seconds * 1e3))
            .unwrap_or_else(|| "-".into());
        let cause_name = self.cause.map_or(self.state.name(), Cause::name);
        let cause = match self.detail {
            Some(detail) => format!("{cause_name}({detail})"),
            None => cause_name.to_string(),
        };
        format!(
            "{:<12} {:<10} {:<22} {:<7} {:<42} {:<42} {:<8} {:<16} {:>10} {:>10} {:>10} {:>7}",
            time,
            self.netns,
            printable(&self.owner.short()),
            self.role.name(),
            self.local.to_string(),
            self.remote.to_string(),
            self.class.map_or("open", Class::name),
            cause,
            duration,
            self.bytes_acked,
            self.bytes_received,
            self.retransmits
        )
    }
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`…) and its backslashes
/// doubled: a process name holds any byte but NUL, and a terminal showing `observer watch`
/// must neither run escape sequences from it nor show a forged line.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() || c == '\\') {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() || c == '\\' {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped.into()
}

/// Logs verdicts nobody could explain, with everything we knew.
pub fn log_unknown(report: &ConnectionReport) {
    if report.cause == Some(Cause::Unknown) {
        let evidence = serde_json::to_string(report).unwrap_or_default();
        log::warn!("connection ended in an unrecognised way: {evidence}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_holds_no_control_character() {
        assert_eq!(printable("nginx"), "nginx");
        assert_eq!(printable("a\nb\u{1b}[31mc\\d\"e"), "a\\nb\\u{1b}[31mc\\\\d\"e");
        assert!(!printable("\r\t\u{7f}\u{9b}").chars().any(char::is_control));
    }
}
