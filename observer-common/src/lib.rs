//! The wire format between the eBPF programs and the daemon, defined once.
//!
//! The kernel side is deliberately dumb: at every TCP state transition it loads the
//! socket's identity (family, ports, addresses: [`SockField`]s) and its namespace into a
//! [`StateEvent`]; at the final transition the evidence words too, into a
//! [`CloseEvent`]; and at every RST it
//! records which socket, in which state, and why ([`ResetEvent`]). Which byte of the
//! socket each field lives at is not known at compile time: the daemon reads it from the
//! running kernel's BTF and patches [`ProgramConfig`] into the object before loading it.
//! Decoding (bit fields, signedness, byte order) and every decision happen in userspace.
//!
//! All types are `#[repr(C)]`, have no implicit padding, are at most 8-byte aligned (ring
//! buffer records must be), and have their sizes pinned by `const` assertions so a layout
//! change fails the build on both sides.
#![no_std]

/// Marks an offset the running kernel does not have (field missing from its BTF).
pub const ABSENT: u32 = u32::MAX;

/// `reason` of a [`ResetEvent`] on kernels whose `tcp_send_reset` has no reason (< 6.10).
pub const NO_REASON: u32 = u32::MAX;

/// `protocol` value of TCP sockets (`IPPROTO_TCP`). The state tracepoint also fires for
/// SCTP and MPTCP sockets, which are filtered out in the kernel.
pub const IPPROTO_TCP: u32 = 6;

/// Ring-buffer wake-ups are batched: a record wakes the daemon only if its CPU has not
/// woken it for this long (or an eighth of the ring is waiting); the records in between
/// are collected by the daemon's drain this long after each wake-up. Waking the reader
/// per record costs more than recording it at high connection rates.
pub const WAKEUP_INTERVAL_NS: u64 = 10_000_000;

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

/// The `struct sock` words a transition carries: the first [`SockField::IDENTITY`] in
/// [`StateEvent::identity`], the rest in [`CloseEvent::evidence`].
///
/// Each is read with one load of its natural width ([`FieldLoad`]: 1, 2, 4 or 8 bytes
/// starting at the byte that holds the field; bit fields with the bytes that hold them)
/// and zero-extended to a word; the daemon extracts the field (shift, width, sign) using
/// the same BTF description it used to compute the load. `tcp_sock` and
/// `inet_connection_sock` embed `struct sock` at offset 0, so every offset is relative to
/// the socket pointer the tracepoint hands us.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockField {
    /// `sock_common.skc_family`: AF_INET or AF_INET6.
    Family = 0,
    /// `sock_common.skc_num`: local port, host order (0 after unhash for auto-bound).
    LocalPort,
    /// `inet_sock.inet_sport`: local port, network order; kept after unhash.
    SourcePort,
    /// `sock_common.skc_dport`: remote port, network order.
    DestinationPort,
    /// `sock_common.skc_rcv_saddr`: local IPv4 address.
    SourceAddr4,
    /// `sock_common.skc_daddr`: remote IPv4 address.
    DestinationAddr4,
    /// `sock.sk_err`: hard error, written before the final transition by resets,
    /// timeouts, ICMP errors and aborts.
    Err,
    /// `sock.sk_err_soft`: last soft error (ICMP, route failure); replaces ETIMEDOUT.
    ErrSoft,
    /// `sock.sk_shutdown`: RCV_SHUTDOWN | SEND_SHUTDOWN; 3 once `close()` ran.
    Shutdown,
    /// `sock_common.skc_flags`: SOCK_DEAD, SOCK_DONE (peer FIN seen), SOCK_KEEPOPEN,
    /// SOCK_LINGER.
    Flags,
    /// `sock.sk_lingertime`: SO_LINGER timeout (0 with SOCK_LINGER = abortive close).
    LingerTime,
    /// `sock.sk_socket`: NULL once orphaned or for a child never accept()ed.
    Socket,
    /// `tcp_sock.linger2`: TCP_LINGER2; negative aborts FIN_WAIT2 on close.
    Linger2,
    /// `inet_connection_sock.icsk_retransmits`: RTOs since the last forward progress.
    Retransmits,
    /// `inet_connection_sock.icsk_probes_out`: unanswered keepalive / window probes.
    ProbesOut,
    /// `inet_connection_sock.icsk_user_timeout`: TCP_USER_TIMEOUT in ms.
    UserTimeout,
    /// `tcp_sock.snd_wnd`: peer's receive window (0 = zero-window probing).
    SendWindow,
    /// `tcp_sock.packets_out`: segments in flight (purged before F on error paths).
    PacketsOut,
    /// `tcp_sock.rcv_nxt`: next sequence number expected from the peer.
    ReceiveNext,
    /// `tcp_sock.copied_seq`: head of yet-unread data; `rcv_nxt - copied_seq` = unread.
    CopiedSeq,
    /// `tcp_sock.bytes_acked`: bytes we sent that the peer acknowledged.
    BytesAcked,
    /// `tcp_sock.bytes_received`: bytes received from the peer.
    BytesReceived,
    /// `tcp_sock.total_retrans`: retransmitted segments over the connection's life.
    TotalRetrans,
    /// `tcp_sock.srtt_us`: smoothed RTT in microseconds, shifted left by 3.
    SrttUs,
    /// `sock_common.skc_cookie`: socket cookie (lazily generated; 0 if never).
    Cookie,
}

impl SockField {
    pub const COUNT: usize = SockField::Cookie as usize + 1;

    /// The first fields, read at every transition (socket identity); the rest only at
    /// the final one.
    pub const IDENTITY: usize = SockField::DestinationAddr4 as usize + 1;

    pub const ALL: [SockField; Self::COUNT] = [
        SockField::Family,
        SockField::LocalPort,
        SockField::SourcePort,
        SockField::DestinationPort,
        SockField::SourceAddr4,
        SockField::DestinationAddr4,
        SockField::Err,
        SockField::ErrSoft,
        SockField::Shutdown,
        SockField::Flags,
        SockField::LingerTime,
        SockField::Socket,
        SockField::Linger2,
        SockField::Retransmits,
        SockField::ProbesOut,
        SockField::UserTimeout,
        SockField::SendWindow,
        SockField::PacketsOut,
        SockField::ReceiveNext,
        SockField::CopiedSeq,
        SockField::BytesAcked,
        SockField::BytesReceived,
        SockField::TotalRetrans,
        SockField::SrttUs,
        SockField::Cookie,
    ];
}

/// Where one [`SockField`] lies in the socket and how wide a load reads it.
///
/// The state programs read these fields with direct loads through the typed socket
/// pointer, which the verifier checks against the kernel's BTF: a load must stay inside
/// the member it starts in (an 8-byte load of a 4-byte `int` is refused) and must cover
/// a bit field whole. So the width is the member's own, or for a bit field the smallest
/// of 1, 2, 4, 8 bytes that covers it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldLoad {
    /// Byte offset, or [`ABSENT`] (this kernel lacks the field).
    pub offset: u32,
    /// 1, 2, 4 or 8.
    pub size: u32,
}

impl FieldLoad {
    pub const ABSENT: Self = Self { offset: ABSENT, size: 0 };
}

/// A bit field inside an 8-byte word, as the kernel side must decode `sk_protocol` to
/// filter on it (a `u16` on 6.x, an 8-bit bitfield on 5.x).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitField {
    pub offset: u32,
    pub shift: u32,
    pub mask: u32,
}

/// Everything the programs need to know about the running kernel, computed by the
/// daemon and patched into the object (`EbpfLoader::override_global("CONFIG", ..)`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramConfig {
    /// How the state programs read each [`SockField`] (the offset is [`ABSENT`] if the
    /// field is missing).
    pub sock_fields: [FieldLoad; SockField::COUNT],
    /// `sock_common.skc_v6_rcv_saddr` and `skc_v6_daddr` (16 bytes each, loaded as two
    /// words each), or [`ABSENT`] without CONFIG_IPV6.
    pub v6_local: u32,
    pub v6_remote: u32,
    /// `sock_common.skc_cookie` (read by the reset and accept programs, and by the state
    /// programs where `bpf_get_socket_cookie` is missing).
    pub cookie: u32,
    /// `sock_common.skc_net.net` (the `struct net *`, 8 bytes, loaded directly by the
    /// state programs) and `net.ns.inum` behind it (4 bytes).
    pub net: u32,
    pub net_ns_inum: u32,
    /// `sock.sk_protocol`, to keep only IPPROTO_TCP (the accept programs; the state
    /// programs ask `bpf_skc_to_tcp_sock`, which also types the pointer they load from).
    pub protocol: BitField,
    /// `sock_common.skc_state`: the state of a socket that sends or receives an RST.
    pub state: u32,
    /// Index of the `enum sk_rst_reason reason` argument of `tcp_send_reset` (6.10+),
    /// or [`ABSENT`]; taken from the tracepoint's BTF prototype.
    pub send_reset_reason_arg: u32,
    /// If non-zero, only sockets of the network namespace with this inode number are
    /// recorded (`--debug.only-netns`: exact accounting in tests on a busy host).
    pub only_netns: u32,
    /// If non-zero, every program returns before doing anything (`--debug.empty-programs`:
    /// the benchmark's measure of what the attachments alone cost). Off, the test costs
    /// one load and one branch per run.
    pub return_at_once: u32,
    /// Non-zero once the daemon filled this in; the programs do nothing until then.
    pub valid: u32,
}

/// What the programs need to name a socket's owner, patched in like [`ProgramConfig`]
/// (`TASK_CONFIG`). Kept apart so the state programs, which copy their configuration
/// onto the 512-byte BPF stack, only load it when they capture an owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskConfig {
    /// From the file descriptor `accept()` returned to its socket:
    /// `current->files->fdt->{max_fds, fd[]}`, `file->private_data` (the `struct socket`),
    /// `socket->file` (checked to point back: the file really is a socket) and
    /// `socket->sk`.
    pub fd_walk: FdWalk,
    /// Offset of `long ret` in the `sys_exit_accept*` record (from the tracefs format).
    pub accept_ret: u32,
    /// `task_struct.group_leader` and `task_struct.comm`: the owner is named after its
    /// process (the main thread), as `ps` and `ss -p` name it, not after the thread
    /// that made the call (`tokio-runtime-w`…).
    pub task_group_leader: u32,
    pub task_comm: u32,
    pub _pad: u32,
}

impl TaskConfig {
    pub const UNSET: Self = Self {
        fd_walk: FdWalk {
            task_files: ABSENT,
            files_fdt: ABSENT,
            fdt_max_fds: ABSENT,
            fdt_fd: ABSENT,
            file_private_data: ABSENT,
            socket_file: ABSENT,
            socket_sk: ABSENT,
            _pad: 0,
        },
        accept_ret: ABSENT,
        task_group_leader: ABSENT,
        task_comm: ABSENT,
        _pad: 0,
    };
}

impl ProgramConfig {
    pub const UNSET: Self = Self {
        sock_fields: [FieldLoad::ABSENT; SockField::COUNT],
        v6_local: ABSENT,
        v6_remote: ABSENT,
        cookie: ABSENT,
        net: ABSENT,
        net_ns_inum: ABSENT,
        protocol: BitField { offset: ABSENT, shift: 0, mask: 0 },
        state: ABSENT,
        send_reset_reason_arg: ABSENT,
        only_netns: 0,
        return_at_once: 0,
        valid: 0,
    };
}

/// Offsets of the pointers from a task to the socket behind one of its descriptors.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdWalk {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_file: u32,
    pub socket_sk: u32,
    pub _pad: u32,
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
    /// The identity [`SockField`]s, zero-extended (0 where [`ABSENT`]).
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
    /// field is [`ABSENT`]).
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
const _: () = assert!(size_of::<ProgramConfig>() == 4 * (2 * SockField::COUNT + 2 + 3 + 3 + 5));
const _: () = assert!(size_of::<TaskConfig>() == 4 * (8 + 4));

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and arrays without padding (sizes asserted above).
    unsafe impl aya::Pod for super::ProgramConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TaskConfig {}
}
