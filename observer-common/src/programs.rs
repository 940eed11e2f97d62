//! What the object holds, by the names and numbers both sides use: the tracepoints and
//! their programs, the maps the daemon reads or fills, the globals it patches, and the
//! slots of the drop counters. The program and map names are Rust identifiers on the
//! kernel side, so they cannot be taken from here; the daemon's `object_contract` test
//! fails if the built object and these lists disagree.

/// A tracepoint observer attaches BTF tracepoint programs to. Its index in
/// [`TRACEPOINTS`] is its slot in the per-tracepoint maps ([`maps::RECORDED`], and
/// [`maps::LOST`] from [`LOST_HANDLED_BY_STANDBY`]).
#[derive(Clone, Copy, Debug)]
pub struct Tracepoint {
    pub name: &'static str,
    /// Program pairs in order of preference: the first this kernel accepts is attached.
    pub programs: &'static [ProgramPair],
}

/// A tracepoint's primary program and its standby twin, attached in this order (see
/// [`crate::nested`]).
#[derive(Clone, Copy, Debug)]
pub struct ProgramPair {
    pub primary: &'static str,
    pub standby: &'static str,
}

/// Slots of the tracepoints in [`TRACEPOINTS`].
pub const STATE: u32 = 0;
pub const SEND_RESET: u32 = 1;
pub const RECEIVE_RESET: u32 = 2;

pub const TRACEPOINTS: [Tracepoint; 3] = [
    Tracepoint {
        name: "inet_sock_set_state",
        programs: &[
            ProgramPair { primary: "inet_sock_set_state", standby: "inet_sock_set_state_standby" },
            // bpf_get_socket_cookie() from tracing programs needs Linux 5.12.
            ProgramPair {
                primary: "inet_sock_set_state_no_cookie",
                standby: "inet_sock_set_state_no_cookie_standby",
            },
        ],
    },
    Tracepoint {
        name: "tcp_send_reset",
        programs: &[ProgramPair { primary: "tcp_send_reset", standby: "tcp_send_reset_standby" }],
    },
    Tracepoint {
        name: "tcp_receive_reset",
        programs: &[ProgramPair {
            primary: "tcp_receive_reset",
            standby: "tcp_receive_reset_standby",
        }],
    },
];

pub const TRACEPOINT_COUNT: u32 = TRACEPOINTS.len() as u32;

/// Slot of [`maps::LOST`] (per CPU) counting records dropped because the CPU's ring was
/// full.
pub const LOST_RING_FULL: u32 = 0;
/// First of [`TRACEPOINT_COUNT`] slots of [`maps::LOST`] counting, per tracepoint, the
/// nested runs its standby program recorded (hits whose primary the kernel skipped).
pub const LOST_HANDLED_BY_STANDBY: u32 = 1;
pub const LOST_SLOTS: u32 = LOST_HANDLED_BY_STANDBY + TRACEPOINT_COUNT;

/// The kernel function every TCP accept goes through, and the fexit program that names
/// the accepting process when it returns (a BPF trampoline: only accept() calls pay).
pub const ACCEPT_FUNCTION: &str = "inet_accept";
pub const ACCEPT_EXIT_PROGRAM: &str = "inet_accept_exit";

/// Where the kernel has no trampolines: classic tracepoints on the system calls that hand
/// a process an accepted socket (category `syscalls`). Enabling them sends every system
/// call of every task through the tracing slow path.
pub const ACCEPT_SYSCALL_PROGRAMS: [&str; 2] = ["sys_exit_accept4", "sys_exit_accept"];

/// Maps of the object the daemon fills or reads.
pub mod maps {
    /// Array of ring buffers, one per possible CPU, created and inserted by the daemon.
    pub const RINGS: &str = "RINGS";
    /// Per-CPU drop counters ([`super::LOST_SLOTS`] slots).
    pub const LOST: &str = "LOST";
    /// Per-CPU, per-tracepoint hit stacks of the nested-run protocol (kernel only).
    pub const RECORDED: &str = "RECORDED";
    /// Per-CPU wake-up bookkeeping of the rings (kernel only).
    pub const WOKEN_AT: &str = "WOKEN_AT";

    pub const ALL: [&str; 4] = [RINGS, LOST, RECORDED, WOKEN_AT];
}

/// Globals the daemon patches into the object before loading it.
pub mod globals {
    /// A [`crate::ProgramConfig`], in `.rodata`.
    pub const CONFIG: &str = "CONFIG";
    /// A [`crate::TaskConfig`].
    pub const TASK_CONFIG: &str = "TASK_CONFIG";
}

/// Ring-buffer wake-ups are batched: a record wakes the daemon only if its CPU has not
/// woken it for this long (or an eighth of the ring is waiting); the records in between
/// are collected by the daemon's drain this long after each wake-up. Waking the reader
/// per record costs more than recording it at high connection rates.
pub const WAKEUP_INTERVAL_NS: u64 = 10_000_000;
