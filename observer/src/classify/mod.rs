//! How a TCP connection ended, decided from what the kernel showed us. Pure: no I/O, no
//! clock, no metrics; every rule is exercised by the table tests at the bottom and by the
//! recorded kernel event streams in `observer/tests/replay.rs`.
//!
//! The input is one socket's [`History`]: its transitions, the snapshot taken at the
//! final `X -> CLOSE` transition ("F", with `P` = X), and the RSTs it sent or received,
//! each marked as before or after F. The rules follow `docs/classification.md`
//! (derived from the kernel's close paths):
//!
//! 1. An RST reason (6.10+) states the cause outright for most aborts.
//! 2. An RST received just before F: the peer reset us (or refused our SYN), unless we
//!    then answered a packet with our own RST, which means the kernel faked that RST
//!    itself because data arrived after we closed.
//! 3. An error recorded at F: ECONNABORTED = killed, ETIMEDOUT (or the soft error
//!    standing in for it) = a timeout whose kind the timers' counters tell, an ICMP
//!    errno during the handshake = unreachable.
//! 4. No error: graceful FIN paths by P and SOCK_DONE, or a close-time abort told apart
//!    by unread data, SO_LINGER, `sk_shutdown`, orphan state and the RST that follows.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::{
    capture::decode::{ResetDirection, Snapshot},
    tcp::{ResetReason, SHUTDOWN_MASK, TcpState, errno},
};

/// Who opened the connection, as seen from this socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The socket did the active open (`connect()`).
    Client,
    /// An accepted (or accept-queued) child of a listener.
    Server,
    /// Opened before the daemon started.
    Unknown,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Unknown => "unknown",
        }
    }
}

/// One state transition of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub old: TcpState,
    pub new: TcpState,
    pub timestamp_ns: u64,
}

/// The final `P -> CLOSE` transition and the socket as it was at that instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    pub previous: TcpState,
    pub timestamp_ns: u64,
    pub snapshot: Snapshot,
}

/// An RST seen on the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetSeen {
    pub direction: ResetDirection,
    pub reason: Option<ResetReason>,
    /// Answers a received segment (not an active reset).
    pub answers_packet: bool,
    /// Emitted after F (tcp_disconnect, abort on close, reply to data after close).
    pub after_close: bool,
}

/// What the tracker knows about one socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub role: Option<Role>,
    /// The last transition before F that changed the state (`5 -> 5`, `close()` after
    /// `shutdown()`, is not one).
    pub last_change: Option<Transition>,
    pub close: Option<Close>,
    pub resets: ResetList,
}

/// The RSTs of one socket, in order. Inline up to two (a connection sees one or two):
/// a verdict is kept for `/connections` long after it is made, and freeing heap
/// allocations that old is costly under churn (docs/benchmarks.md).
pub type ResetList = SmallVec<[ResetSeen; 2]>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Fin,
    Rst,
    Timeout,
    Other,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Fin, Class::Rst, Class::Timeout, Class::Other];

    pub fn name(self) -> &'static str {
        match self {
            Class::Fin => "fin",
            Class::Rst => "rst",
            Class::Timeout => "timeout",
            Class::Other => "other",
        }
    }
}

/// Why the connection ended; each cause belongs to exactly one [`Class`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// fin: we sent the first FIN.
    Active,
    /// fin: the peer sent the first FIN.
    Passive,
    /// fin: both FINs crossed (CLOSING).
    Simultaneous,
    /// rst: an RST from the peer ended the connection.
    Received,
    /// rst: an RST answered our SYN.
    Refused,
    /// rst: we closed with unread data (TCPAbortOnClose).
    UnreadData,
    /// rst: close() with SO_LINGER {1, 0}.
    LingerZero,
    /// rst: data or FIN arrived after we closed; we answered RST.
    DataAfterClose,
    /// rst: an established child never accept()ed, reset as its listener closed.
    ListenerClosed,
    /// rst: connect(AF_UNSPEC) on a connected socket.
    Disconnect,
    /// rst: close in FIN_WAIT2 with TCP_LINGER2 < 0 (TCPAbortOnLinger).
    Linger2,
    /// timeout: retransmissions exhausted (tcp_retries2 or TCP_USER_TIMEOUT).
    Retransmit,
    /// timeout: keepalive probes unanswered.
    Keepalive,
    /// timeout: SYN retries exhausted.
    Syn,
    /// timeout: zero-window probing exhausted or timed out.
    ZeroWindow,
    /// timeout: the FIN_WAIT2 timer expired (visible variant).
    FinWait2,
    /// other: `ss -K`, SOCK_DESTROY, bpf_sock_destroy (ECONNABORTED).
    Killed,
    /// other: closed by the application while still in SYN_SENT.
    Cancelled,
    /// other: an ICMP error ended the connect.
    Unreachable,
    /// other: too many orphans or memory pressure (TCPAbortOnMemory).
    Memory,
    /// other: none of the above; logged with its evidence.
    Unknown,
}

impl Cause {
    pub const ALL: [Cause; 21] = [
        Cause::Active,
        Cause::Passive,
        Cause::Simultaneous,
        Cause::Received,
        Cause::Refused,
        Cause::UnreadData,
        Cause::LingerZero,
        Cause::DataAfterClose,
        Cause::ListenerClosed,
        Cause::Disconnect,
        Cause::Linger2,
        Cause::Retransmit,
        Cause::Keepalive,
        Cause::Syn,
        Cause::ZeroWindow,
        Cause::FinWait2,
        Cause::Killed,
        Cause::Cancelled,
        Cause::Unreachable,
        Cause::Memory,
        Cause::Unknown,
    ];

    pub fn class(self) -> Class {
        use Cause::*;
        match self {
            Active | Passive | Simultaneous => Class::Fin,
            Received | Refused | UnreadData | LingerZero | DataAfterClose | ListenerClosed
            | Disconnect | Linger2 => Class::Rst,
            Retransmit | Keepalive | Syn | ZeroWindow | FinWait2 => Class::Timeout,
            Killed | Cancelled | Unreachable | Memory | Unknown => Class::Other,
        }
    }

    pub fn name(self) -> &'static str {
        use Cause::*;
        match self {
            Active => "active",
            Passive => "passive",
            Simultaneous => "simultaneous",
            Received => "received",
            Refused => "refused",
            UnreadData => "unread_data",
            LingerZero => "linger_zero",
            DataAfterClose => "data_after_close",
            ListenerClosed => "listener_closed",
            Disconnect => "disconnect",
            Linger2 => "linger2",
            Retransmit => "retransmit",
            Keepalive => "keepalive",
            Syn => "syn",
            ZeroWindow => "zero_window",
            FinWait2 => "fin_wait2",
            Killed => "killed",
            Cancelled => "cancelled",
            Unreachable => "unreachable",
            Memory => "memory",
            Unknown => "unknown",
        }
    }
}

/// The verdict on one connection: a cause plus an optional finer detail for humans
/// (not a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub cause: Cause,
    pub detail: Option<&'static str>,
}

impl Verdict {
    fn new(cause: Cause) -> Self {
        Self { cause, detail: None }
    }

    fn with(cause: Cause, detail: &'static str) -> Self {
        Self { cause, detail: Some(detail) }
    }

    pub fn class(&self) -> Class {
        self.cause.class()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A connection ended; count it.
    Connection(Verdict),
    /// A listening socket closed: not a connection.
    Listener,
    /// No final transition yet.
    Open,
}

/// Facts about the RSTs of a history, computed once.
struct Resets {
    /// An RST arrived before F (`tcp_reset()` ran; possibly synthetic).
    received_before: bool,
    /// We sent an RST before F without a packet to answer (keepalive, abort, timer).
    active_before: bool,
    /// We sent an RST after F without a packet to answer (close-time abort).
    active_after: bool,
    /// We answered a packet with an RST after F (data or FIN after close).
    reply_after: bool,
}

impl Resets {
    fn none(&self) -> bool {
        !(self.received_before || self.active_before || self.active_after || self.reply_after)
    }

    fn of(history: &History) -> Self {
        let sent = |after: bool, reply: bool| {
            history.resets.iter().any(|r| {
                r.direction == ResetDirection::Sent
                    && r.after_close == after
                    && r.answers_packet == reply
            })
        };
        Self {
            received_before: history
                .resets
                .iter()
                .any(|r| r.direction == ResetDirection::Received && !r.after_close),
            active_before: sent(false, false),
            active_after: sent(true, false),
            reply_after: sent(true, true),
        }
    }
}

/// Decides how the connection in `history` ended.
pub fn classify(history: &History) -> Outcome {
    let Some(close) = &history.close else {
        return Outcome::Open;
    };
    if close.previous == TcpState::Listen {
        return Outcome::Listener;
    }
    let resets = Resets::of(history);
    let verdict = by_reset_reason(history, close, &resets)
        .or_else(|| by_received_reset(close, &resets))
        .unwrap_or_else(|| {
            if close.snapshot.sk_err != 0 {
                by_error(close, &resets)
            } else {
                without_error(history, close, &resets)
            }
        });
    Outcome::Connection(verdict)
}

/// Step 1: the kernel's own reason for an RST it sent (Linux 6.10+).
fn by_reset_reason(history: &History, close: &Close, resets: &Resets) -> Option<Verdict> {
    let s = &close.snapshot;
    for reset in history.resets.iter().filter(|r| r.direction == ResetDirection::Sent) {
        let Some(reason) = reset.reason else { continue };
        let verdict = match (reason, reset.after_close) {
            (ResetReason::TcpKeepaliveTimeout, _) => Verdict::new(Cause::Keepalive),
            (ResetReason::TcpAbortOnClose, _) => Verdict::new(Cause::UnreadData),
            (ResetReason::TcpAbortOnLinger, _) => Verdict::new(Cause::Linger2),
            (ResetReason::TcpAbortOnMemory, _) => Verdict::new(Cause::Memory),
            (ResetReason::TcpAbortOnData, true) if reset.answers_packet => {
                after_close_reply(close, resets)
            }
            (ResetReason::TcpState | ResetReason::TcpDisconnectWithData, true) => {
                Verdict::new(disconnect_cause(s))
            }
            (ResetReason::TcpState, false) if s.sk_err == errno::ECONNABORTED => {
                Verdict::new(Cause::Killed)
            }
            (ResetReason::TcpState, false)
                if close.previous == TcpState::FinWait2 && s.flags.dead && s.sk_err == 0 =>
            {
                Verdict::new(Cause::FinWait2)
            }
            _ => continue,
        };
        return Some(verdict);
    }
    None
}

/// Step 2: `tcp_reset()` ran just before F.
fn by_received_reset(close: &Close, resets: &Resets) -> Option<Verdict> {
    if !resets.received_before {
        return None;
    }
    Some(if resets.reply_after {
        // The kernel calls tcp_reset() itself when data arrives after close() and then
        // answers the segment with an RST: we aborted, not the peer.
        Verdict::new(Cause::DataAfterClose)
    } else if close.previous == TcpState::SynSent {
        Verdict::new(Cause::Refused)
    } else {
        Verdict::new(Cause::Received)
    })
}

/// Step 3: F carries an error.
fn by_error(close: &Close, resets: &Resets) -> Verdict {
    let s = &close.snapshot;
    let handshake = matches!(close.previous, TcpState::SynSent | TcpState::SynRecv);
    match s.sk_err {
        errno::ECONNABORTED => Verdict::new(Cause::Killed),
        // tcp_write_err() reports the last soft error (ICMP) instead of ETIMEDOUT.
        err if err == errno::ETIMEDOUT || err == s.sk_err_soft => timeout(close, resets),
        errno::ECONNREFUSED => Verdict::with(Cause::Unreachable, "ECONNREFUSED"),
        err if handshake && errno::is_icmp_error(err) => {
            Verdict::with(Cause::Unreachable, errno::name(err).unwrap_or("icmp"))
        }
        errno::ECONNRESET | errno::EPIPE if resets.reply_after => {
            Verdict::new(Cause::DataAfterClose)
        }
        // What tcp_reset() leaves (EPIPE in CLOSE_WAIT), with no RST recorded at all:
        // its event was lost (a full ring). tcp_disconnect(), the other writer of
        // ECONNRESET, sends an RST we would have seen too, so the peer's RST is by far
        // the likelier story; the detail says it was inferred.
        errno::ECONNRESET | errno::EPIPE if resets.none() => {
            Verdict::with(Cause::Received, "reset_event_missing")
        }
        err => Verdict::with(Cause::Unknown, errno::name(err).unwrap_or("unexpected_sk_err")),
    }
}

/// Which timer gave up. All of them end in `tcp_write_err()`; the counters left on the
/// socket tell them apart.
fn timeout(close: &Close, resets: &Resets) -> Verdict {
    let s = &close.snapshot;
    let cause = if matches!(close.previous, TcpState::SynSent | TcpState::SynRecv) {
        Cause::Syn
    } else if s.flags.keepalive && (resets.active_before || s.probes_out > 0) && s.retransmits == 0
    {
        // The keepalive timer sends an RST just before giving up (reason 15 on 6.10+).
        Cause::Keepalive
    } else if s.send_window == 0 && s.retransmits == 0 {
        Cause::ZeroWindow
    } else {
        Cause::Retransmit
    };
    let detail = if s.user_timeout_ms != 0 {
        Some("user_timeout")
    } else if s.flags.dead {
        Some("orphan")
    } else if s.sk_err != errno::ETIMEDOUT {
        errno::name(s.sk_err)
    } else {
        None
    };
    Verdict { cause, detail }
}

/// Step 4: F without an error.
fn without_error(history: &History, close: &Close, resets: &Resets) -> Verdict {
    let s = &close.snapshot;
    let dead = s.flags.dead;
    if !s.has_socket && !dead && close.previous != TcpState::SynSent {
        // inet_csk_listen_stop() -> tcp_disconnect() on a child nobody accept()ed.
        return Verdict::new(Cause::ListenerClosed);
    }
    match close.previous {
        TcpState::LastAck if !resets.active_after => Verdict::new(Cause::Passive),
        TcpState::Closing if !resets.active_after => Verdict::new(Cause::Simultaneous),
        TcpState::SynSent if s.shutdown == 0 => {
            // connect() failed locally (no port, no route) or connect(AF_UNSPEC).
            Verdict::with(Cause::Unknown, "connect_failed_locally")
        }
        TcpState::SynSent => Verdict::new(Cause::Cancelled),
        TcpState::FinWait2 if dead => fin_wait2_orphan(history, close, resets),
        TcpState::FinWait2 if s.flags.done => {
            // shutdown(SHUT_WR), then the peer's FIN: TIME_WAIT with the fd still open.
            Verdict::with(Cause::Active, "time_wait")
        }
        _ if !dead => close_time_abort(s, resets),
        _ if resets.active_before || resets.active_after => Verdict::new(Cause::Memory),
        // An orphan closed without error or RST: network namespace teardown, or memory
        // pressure with nothing recently sent.
        _ => Verdict::with(Cause::Unknown, "orphan_closed_without_reset"),
    }
}

/// `FIN_WAIT2 -> CLOSE` of an orphan: normally the hand-over to a timewait socket.
fn fin_wait2_orphan(history: &History, close: &Close, resets: &Resets) -> Verdict {
    let s = &close.snapshot;
    if resets.reply_after {
        return after_close_reply(close, resets);
    }
    if resets.active_after {
        return Verdict::new(if s.linger2 < 0 { Cause::Linger2 } else { Cause::Memory });
    }
    if resets.active_before {
        return Verdict::new(Cause::FinWait2);
    }
    if !s.flags.done {
        // Our FIN was ACKed, the peer's FIN is still to come: the rest happens in a
        // timewait socket (FIN_WAIT2 substate) the tracepoint never sees.
        return Verdict::with(Cause::Active, "fin_wait2");
    }
    // The peer's FIN arrived: TIME_WAIT. "Three-way" when it came in the same segment
    // that ACKed our FIN (FIN_WAIT1 -> FIN_WAIT2 -> CLOSE in one softirq).
    let three_way = history.last_change.is_some_and(|t| {
        t.old == TcpState::FinWait1
            && t.new == TcpState::FinWait2
            && close.timestamp_ns.saturating_sub(t.timestamp_ns) < 1_000_000
    });
    Verdict::with(Cause::Active, if three_way { "three_way" } else { "time_wait" })
}

/// We answered a packet with an RST after F.
fn after_close_reply(close: &Close, resets: &Resets) -> Verdict {
    if !resets.received_before && close.snapshot.linger2 < 0 {
        // An orphan in FIN_WAIT1 got its ACK while TCP_LINGER2 < 0.
        Verdict::with(Cause::Linger2, "fin_wait1")
    } else {
        Verdict::new(Cause::DataAfterClose)
    }
}

/// `tcp_disconnect()` reached F: which caller was it?
fn disconnect_cause(s: &Snapshot) -> Cause {
    if !s.has_socket && !s.flags.dead {
        Cause::ListenerClosed
    } else if s.shutdown != SHUTDOWN_MASK {
        Cause::Disconnect
    } else if s.flags.linger && s.linger_time == 0 {
        Cause::LingerZero
    } else {
        Cause::Disconnect
    }
}

/// F inside `close()` (or `connect(AF_UNSPEC)`) on a socket the application still held.
fn close_time_abort(s: &Snapshot, resets: &Resets) -> Verdict {
    if s.shutdown != SHUTDOWN_MASK {
        Verdict::new(Cause::Disconnect)
    } else if s.has_unread_data() {
        // The kernel checks unread data first: it wins over SO_LINGER {1, 0}.
        Verdict::new(Cause::UnreadData)
    } else if s.flags.linger && s.linger_time == 0 {
        Verdict::new(Cause::LingerZero)
    } else if resets.active_after {
        // Before the fix to __tcp_close's unread test (6.1.156, 6.12.53, ~6.17) the
        // kernel could count already-read bytes as unread and abort anyway.
        Verdict::with(Cause::UnreadData, "data_already_read")
    } else {
        Verdict::with(Cause::Unknown, "closed_without_error_or_reset")
    }
}

#[cfg(test)]
mod tests;
