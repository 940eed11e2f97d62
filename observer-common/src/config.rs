//! What the daemon patches into the object before loading it: the running kernel's
//! layout ([`ProgramConfig`]) and how to name a socket's owner ([`TaskConfig`]).

use crate::fields::{ABSENT, BitField, FieldLoad, SockField};

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

const _: () = assert!(size_of::<ProgramConfig>() == 4 * (2 * SockField::COUNT + 2 + 3 + 3 + 5));
const _: () = assert!(size_of::<TaskConfig>() == 4 * (8 + 4));

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and arrays without padding (sizes asserted above).
    unsafe impl aya::Pod for super::ProgramConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TaskConfig {}
}
