//! The ring-buffer records, as the programs write them and the daemon decodes them.

use crate::fields::SockField;

/// `reason` of a [`ResetEvent`] on kernels whose `tcp_send_reset` has no reason (< 6.10).
pub const NO_REASON: u32 = u32::MAX;

/// What a ring-buffer record is; the first `u32` of every record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `sock:inet_sock_set_state` for a TCP socket, to any state but CLOSE: a
    /// [`StateEvent`].
    State = 1,
    /// `tcp:tcp_send_reset` for a socket (not for RSTs answering unmatched packets).
    ResetSent = 2,
    /// `tcp:tcp_receive_reset`.
    ResetReceived = 3,
    /// `syscalls:sys_exit_accept4` / `sys_exit_accept`: the process that accepted a
    /// socket (an [`OwnerEvent`]).
    Accepted = 4,
    /// `sock:inet_sock_set_state` to CLOSE: a [`CloseEvent`].
    Close = 5,
}

impl EventKind {
    pub fn from_u32(kind: u32) -> Option<Self> {
        match kind {
            1 => Some(Self::State),
            2 => Some(Self::ResetSent),
            3 => Some(Self::ResetReceived),
            4 => Some(Self::Accepted),
            5 => Some(Self::Close),
            _ => None,
        }
    }
}

/// The task running when an event was recorded, captured only where that task is the
/// socket's owner: the system calls that move a socket into SYN_SENT (connect), LISTEN,
/// FIN_WAIT1 / LAST_ACK (close, shutdown), and accept's return. All zero elsewhere
/// (softirq and timers run on behalf of whichever task they interrupted).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Process id (`tgid`); 0 when not captured.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// cgroup v2 id (`bpf_get_current_cgroup_id`): the inode of its cgroupfs directory.
    pub cgroup_id: u64,
    /// The process's name (its main thread's `comm`), NUL-padded.
    pub comm: [u8; 16],
}

impl Owner {
    pub const NONE: Self = Self { pid: 0, tid: 0, cgroup_id: 0, comm: [0; 16] };
}

/// The process that accepted a socket, from `accept()`'s return in process context.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerEvent {
    pub header: EventHeader,
    pub owner: Owner,
}

/// Fields every record starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`].
    pub kind: u32,
    /// The CPU that produced the record (ordering across CPUs is the ring's order).
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub timestamp_ns: u64,
    /// The `struct sock *`: the socket's identity while it lives (reused after free).
    pub skaddr: u64,
    /// Socket cookie: from `bpf_get_socket_cookie` for state events (never 0 there),
    /// read from `skc_cookie` for resets (0 if it was never generated).
    pub cookie: u64,
}

/// One `sock:inet_sock_set_state` transition of a TCP socket, with its identity read at
/// that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateEvent {
    pub header: EventHeader,
    /// The identity [`SockField`]s, zero-extended (0 where [`ABSENT`](crate::ABSENT)).
    pub identity: [u64; SockField::IDENTITY],
    /// `skc_v6_rcv_saddr` then `skc_v6_daddr` as they lie in memory, two words each;
    /// zero unless the socket is AF_INET6.
    pub v6_addresses: [u64; 4],
    pub old_state: u32,
    pub new_state: u32,
    /// Inode number of the socket's network namespace (0 if unknown).
    pub netns: u32,
    pub _pad: u32,
    /// The calling process, for transitions made by a system call (see [`Owner`]).
    pub owner: Owner,
}

/// The final transition (to CLOSE), with the socket's evidence read at that moment (some
/// of it is zeroed right after).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseEvent {
    pub state: StateEvent,
    /// The other [`SockField`]s, zero-extended, at `field - IDENTITY` (0 where the
    /// field is [`ABSENT`](crate::ABSENT)).
    pub evidence: [u64; SockField::COUNT - SockField::IDENTITY],
}

/// One RST sent or received on a known socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetEvent {
    pub header: EventHeader,
    /// The socket's TCP state when the RST was sent or received; CLOSE means the RST
    /// follows the final transition (tcp_disconnect, abort on close).
    pub state: u32,
    /// `enum sk_rst_reason` value, or [`NO_REASON`].
    pub reason: u32,
    /// 1 if the RST answers a received packet (skb given), 0 for an active reset.
    pub answers_packet: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<EventHeader>() == 32);
const _: () = assert!(size_of::<Owner>() == 32);
const _: () = assert!(size_of::<StateEvent>() == 32 + 8 * SockField::IDENTITY + 32 + 16 + 32);
const _: () = assert!(
    size_of::<CloseEvent>()
        == size_of::<StateEvent>() + 8 * (SockField::COUNT - SockField::IDENTITY)
);
const _: () = assert!(size_of::<ResetEvent>() == 48);
const _: () = assert!(size_of::<OwnerEvent>() == 64);
const _: () = assert!(
    align_of::<CloseEvent>() <= 8 && align_of::<ResetEvent>() <= 8 && align_of::<OwnerEvent>() <= 8
);
