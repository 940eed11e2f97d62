//! TCP vocabulary shared by the decoder, the tracker and the classifier: states, socket
//! flags, errno values and RST reasons, with the lowercase names used in metric labels.
//!
//! Values follow `include/net/tcp_states.h`, `enum sock_flags` and `enum sk_rst_reason`
//! (identical from 5.10 to 6.18); reset reasons are resolved by *name* from the running
//! kernel's BTF, so their numbers are never assumed.

use observer_common::kernel;
use serde::{Deserialize, Serialize};

/// A TCP state as the `inet_sock_set_state` tracepoint reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    /// Bound but neither listening nor connected (socket-diag only, Linux 6.10+).
    BoundInactive,
    /// A value this version does not know; kept so nothing is silently dropped.
    Unknown,
}

impl TcpState {
    /// Number of variants: `state as usize` indexes arrays of this length.
    pub const COUNT: usize = Self::ALL.len();

    /// Every state that can be a label value of `observer_tcp_sockets` / transitions.
    pub const ALL: [TcpState; 14] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
        TcpState::BoundInactive,
        TcpState::Unknown,
    ];

    pub fn from_kernel(value: u32) -> Self {
        match value {
            kernel::TCP_ESTABLISHED => Self::Established,
            kernel::TCP_SYN_SENT => Self::SynSent,
            kernel::TCP_SYN_RECV => Self::SynRecv,
            kernel::TCP_FIN_WAIT1 => Self::FinWait1,
            kernel::TCP_FIN_WAIT2 => Self::FinWait2,
            kernel::TCP_TIME_WAIT => Self::TimeWait,
            kernel::TCP_CLOSE => Self::Close,
            kernel::TCP_CLOSE_WAIT => Self::CloseWait,
            kernel::TCP_LAST_ACK => Self::LastAck,
            kernel::TCP_LISTEN => Self::Listen,
            kernel::TCP_CLOSING => Self::Closing,
            kernel::TCP_NEW_SYN_RECV => Self::NewSynRecv,
            kernel::TCP_BOUND_INACTIVE => Self::BoundInactive,
            _ => Self::Unknown,
        }
    }

    /// The label value: lowercase kernel name without the `TCP_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::SynSent => "syn_sent",
            Self::SynRecv => "syn_recv",
            Self::FinWait1 => "fin_wait1",
            Self::FinWait2 => "fin_wait2",
            Self::TimeWait => "time_wait",
            Self::Close => "close",
            Self::CloseWait => "close_wait",
            Self::LastAck => "last_ack",
            Self::Listen => "listen",
            Self::Closing => "closing",
            Self::NewSynRecv => "new_syn_recv",
            Self::BoundInactive => "bound_inactive",
            Self::Unknown => "unknown",
        }
    }
}

/// Bits of `sk->sk_flags` (`enum sock_flags`) the classifier reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockFlags {
    /// SOCK_DEAD: orphaned (the application closed its descriptor).
    pub dead: bool,
    /// SOCK_DONE: the peer's FIN was processed; the reliable "FIN received" flag.
    pub done: bool,
    /// SOCK_KEEPOPEN: SO_KEEPALIVE is on.
    pub keepalive: bool,
    /// SOCK_LINGER: SO_LINGER is on (with `linger_time`).
    pub linger: bool,
}

impl SockFlags {
    pub fn from_kernel(flags: u64) -> Self {
        Self {
            dead: flags & (1 << 0) != 0,
            done: flags & (1 << 1) != 0,
            keepalive: flags & (1 << 3) != 0,
            linger: flags & (1 << 4) != 0,
        }
    }
}

/// `sk_shutdown` bits.
pub const RCV_SHUTDOWN: u8 = 1;
pub const SEND_SHUTDOWN: u8 = 2;
pub const SHUTDOWN_MASK: u8 = 3;

/// errno values written to `sk_err` (asm-generic, same on every Linux architecture
/// observer builds for).
pub mod errno {
    pub const EPIPE: i32 = 32;
    pub const ENOPROTOOPT: i32 = 92;
    pub const ENETUNREACH: i32 = 101;
    pub const ECONNABORTED: i32 = 103;
    pub const ECONNRESET: i32 = 104;
    pub const ETIMEDOUT: i32 = 110;
    pub const ECONNREFUSED: i32 = 111;
    pub const EHOSTDOWN: i32 = 112;
    pub const EHOSTUNREACH: i32 = 113;
    pub const EPROTO: i32 = 71;
    pub const ENONET: i32 = 64;
    pub const EMSGSIZE: i32 = 90;
    pub const EACCES: i32 = 13;

    /// Symbolic name for the errnos TCP sockets end with, for details and logs.
    pub fn name(value: i32) -> Option<&'static str> {
        Some(match value {
            EPIPE => "EPIPE",
            ENOPROTOOPT => "ENOPROTOOPT",
            ENETUNREACH => "ENETUNREACH",
            ECONNABORTED => "ECONNABORTED",
            ECONNRESET => "ECONNRESET",
            ETIMEDOUT => "ETIMEDOUT",
            ECONNREFUSED => "ECONNREFUSED",
            EHOSTDOWN => "EHOSTDOWN",
            EHOSTUNREACH => "EHOSTUNREACH",
            EPROTO => "EPROTO",
            ENONET => "ENONET",
            EMSGSIZE => "EMSGSIZE",
            EACCES => "EACCES",
            _ => return None,
        })
    }

    /// Errors an ICMP message (or a failed route) turns into (`icmp_err_convert`,
    /// `ip_icmp_error`, IPv6 equivalents).
    pub fn is_icmp_error(value: i32) -> bool {
        matches!(
            value,
            ENETUNREACH
                | EHOSTUNREACH
                | EHOSTDOWN
                | ENONET
                | EPROTO
                | ENOPROTOOPT
                | EMSGSIZE
                | EACCES
        )
    }
}

/// Why the kernel sent an RST (`enum sk_rst_reason`, Linux 6.10+), by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetReason {
    NotSpecified,
    NoSocket,
    TcpInvalidAckSequence,
    TcpRfc7323Paws,
    TcpTooOldAck,
    TcpAckUnsentData,
    TcpFlags,
    TcpOldAck,
    TcpAbortOnData,
    TcpTimewaitSocket,
    InvalidSyn,
    TcpAbortOnClose,
    TcpAbortOnLinger,
    TcpAbortOnMemory,
    TcpState,
    TcpKeepaliveTimeout,
    TcpDisconnectWithData,
    Mptcp,
    Error,
    /// A reason this version does not know by name.
    Other,
}

impl ResetReason {
    /// Maps an `enum sk_rst_reason` enumerator name (`SK_RST_REASON_TCP_STATE`).
    pub fn from_kernel_name(name: &str) -> Self {
        let name = name.strip_prefix("SK_RST_REASON_").unwrap_or(name);
        match name {
            "NOT_SPECIFIED" => Self::NotSpecified,
            "NO_SOCKET" => Self::NoSocket,
            "TCP_INVALID_ACK_SEQUENCE" => Self::TcpInvalidAckSequence,
            "TCP_RFC7323_PAWS" => Self::TcpRfc7323Paws,
            "TCP_TOO_OLD_ACK" => Self::TcpTooOldAck,
            "TCP_ACK_UNSENT_DATA" => Self::TcpAckUnsentData,
            "TCP_FLAGS" => Self::TcpFlags,
            "TCP_OLD_ACK" => Self::TcpOldAck,
            "TCP_ABORT_ON_DATA" => Self::TcpAbortOnData,
            "TCP_TIMEWAIT_SOCKET" => Self::TcpTimewaitSocket,
            "INVALID_SYN" => Self::InvalidSyn,
            "TCP_ABORT_ON_CLOSE" => Self::TcpAbortOnClose,
            "TCP_ABORT_ON_LINGER" => Self::TcpAbortOnLinger,
            "TCP_ABORT_ON_MEMORY" => Self::TcpAbortOnMemory,
            "TCP_STATE" => Self::TcpState,
            "TCP_KEEPALIVE_TIMEOUT" => Self::TcpKeepaliveTimeout,
            "TCP_DISCONNECT_WITH_DATA" => Self::TcpDisconnectWithData,
            "ERROR" => Self::Error,
            other if other.starts_with("MPTCP") => Self::Mptcp,
            _ => Self::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::NotSpecified => "not_specified",
            Self::NoSocket => "no_socket",
            Self::TcpInvalidAckSequence => "tcp_invalid_ack_sequence",
            Self::TcpRfc7323Paws => "tcp_rfc7323_paws",
            Self::TcpTooOldAck => "tcp_too_old_ack",
            Self::TcpAckUnsentData => "tcp_ack_unsent_data",
            Self::TcpFlags => "tcp_flags",
            Self::TcpOldAck => "tcp_old_ack",
            Self::TcpAbortOnData => "tcp_abort_on_data",
            Self::TcpTimewaitSocket => "tcp_timewait_socket",
            Self::InvalidSyn => "invalid_syn",
            Self::TcpAbortOnClose => "tcp_abort_on_close",
            Self::TcpAbortOnLinger => "tcp_abort_on_linger",
            Self::TcpAbortOnMemory => "tcp_abort_on_memory",
            Self::TcpState => "tcp_state",
            Self::TcpKeepaliveTimeout => "tcp_keepalive_timeout",
            Self::TcpDisconnectWithData => "tcp_disconnect_with_data",
            Self::Mptcp => "mptcp",
            Self::Error => "error",
            Self::Other => "other",
        }
    }
}
