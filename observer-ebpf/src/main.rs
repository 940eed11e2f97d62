//! The kernel side of observer: capture evidence, count drops, decide nothing.
//!
//! * `inet_sock_set_state` (tp_btf): every TCP state transition, with the socket's
//!   identity and the [`SockField`](observer_common::SockField) words read at that
//!   instant ([`state`]).
//! * `tcp_send_reset` / `tcp_receive_reset` (tp_btf): which socket sent or received an
//!   RST, in which state, and the kernel's reason where it has one ([`reset`]).
//! * `inet_accept()` returning (fexit; the only process-context moment of a server-side
//!   socket): which process accepted it ([`accept`]). Where the kernel has no BPF
//!   trampolines, the `syscalls:sys_exit_accept4` / `sys_exit_accept` classic tracepoints
//!   instead, which find the socket through the caller's descriptor table — and which,
//!   once enabled, send every system call of every task through the tracing slow path,
//!   where a trampoline costs only the accept() calls.
//!
//! The first three are BTF tracepoints rather than classic ones: no tracefs is needed, the
//! arguments are the TP_PROTO arguments (no record layout to parse), and a nested run the
//! kernel has to skip is counted in the program's `recursion_misses` (classic tracepoint
//! programs are skipped silently) — and recorded by a standby twin ([`nested`]).
//!
//! Offsets into `struct sock` are not compiled in: the daemon computes them from the
//! running kernel's BTF and patches [`CONFIG`] before loading. A record that does not fit
//! in the ring buffer ([`ring`]) is counted in [`LOST`] and exported as
//! `observer_events_lost_total`; it is also reported through aya-log, so the daemon's log
//! says when and what. Every name and number the daemon relies on is in
//! `observer_common::programs`.
//!
//! This file holds the globals, the maps and the entry points; the modules do the work.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd: the BPF target has no atomic read-modify-write types"
)]

mod accept;
mod nested;
mod owner;
mod read;
mod reset;
mod ring;
mod state;

use aya_ebpf::{
    Global,
    btf_maps::{ArrayOfMaps, RingBuf},
    macros::{btf_map, btf_tracepoint, fexit, map, tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, FExitContext, TracePointContext},
};
use observer_common::{
    ProgramConfig, TaskConfig,
    nested::RecordedHits,
    programs::{LOST_SLOTS, RECEIVE_RESET, SEND_RESET, STATE, TRACEPOINT_COUNT},
};

use crate::{
    nested::{as_primary, as_standby},
    reset::{received_reset_hit, reset_received, reset_sent, sent_reset_hit},
    ring::Wakeups,
    state::{state_hit, state_hit_without_cookie, state_with_cookie, state_without_cookie},
};

/// Kernel layout, filled in by the daemon before load.
///
/// In `.rodata`, which the loader freezes: the verifier knows every value loaded from it
/// as the constant it is, and the state programs' direct loads need exactly that (an
/// offset added to a typed pointer must be known). So the programs read it field by field
/// where they use a value ([`config!`]), with volatile loads: the compiler must neither
/// fold in the placeholder it was compiled with nor copy the struct to the stack first,
/// where a 4-byte value is lost to the verifiers of 5.x kernels.
#[unsafe(no_mangle)]
static CONFIG: ProgramConfig = ProgramConfig::UNSET;

/// One field of [`CONFIG`], loaded from `.rodata` at this point of the program.
macro_rules! config {
    ($($field:tt)+) => {{
        // SAFETY: a plain read of a static.
        #[allow(unused_unsafe, reason = "the macro is also used inside unsafe blocks")]
        let value = unsafe { core::ptr::read_volatile(&raw const crate::CONFIG.$($field)+) };
        value
    }};
}
pub(crate) use config;

/// How to name a socket's owner, filled in by the daemon before load.
#[unsafe(no_mangle)]
static TASK_CONFIG: Global<TaskConfig> = Global::new(TaskConfig::UNSET);

/// Records for the daemon: one ring buffer per CPU, indexed by CPU number. The daemon
/// creates the rings (`--bpf.ring-buffer-bytes` each) and puts them here before it
/// attaches a program, and sizes this array to the possible CPUs.
///
/// Per CPU because a shared ring is shared state: its reservation takes a lock and moves
/// a producer position that every CPU writes, and under churn that cache-line traffic
/// was most of the state program's cost (docs/benchmarks.md). A CPU's records are in its
/// ring in the order it reserved them; the daemon merges the rings by timestamp, which is
/// why a program reads the clock *before* it reserves ([`ring::Stamp`]).
#[btf_map]
static RINGS: ArrayOfMaps<CpuRing, MAX_CPUS> = ArrayOfMaps::new();

/// The template of [`RINGS`]' members: the kernel checks each ring the daemon inserts
/// against its type and flags, not its size.
type CpuRing = RingBuf<u8, 4096>;

/// Compiled-in size of [`RINGS`]; the daemon loads it with one entry per possible CPU.
const MAX_CPUS: usize = 1;

/// Per CPU: records dropped because its CPU's ring was full, then per tracepoint the
/// nested runs a standby program recorded (`observer_common::programs::LOST_*`).
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

/// Per CPU and tracepoint: the hits the primary program recorded whose standby has not
/// run yet ([`nested`]).
#[map]
static RECORDED: PerCpuArray<RecordedHits> = PerCpuArray::with_max_entries(TRACEPOINT_COUNT, 0);

/// Per CPU: when a record of this CPU last woke the daemon, and how many records it has
/// written since ([`ring::wakeup_flags`]).
#[map]
static WOKEN_AT: PerCpuArray<Wakeups> = PerCpuArray::with_max_entries(1, 0);

/// Defines a tracepoint's primary program and its standby twin, both recording with
/// `$record(ctx, key)`; `$key(ctx)` identifies a hit. The names are those of
/// `observer_common::programs::TRACEPOINTS`.
macro_rules! primary_and_standby {
    ($tracepoint:tt, $slot:expr, $key:ident, $record:ident, $primary:ident, $standby:ident) => {
        #[btf_tracepoint(function = $tracepoint)]
        pub fn $primary(ctx: BtfTracePointContext) -> i32 {
            if config!(return_at_once) != 0 {
                return 0;
            }
            let key = $key(&ctx);
            as_primary($slot, key, || $record(&ctx, &key));
            0
        }

        #[btf_tracepoint(function = $tracepoint)]
        pub fn $standby(ctx: BtfTracePointContext) -> i32 {
            if config!(return_at_once) != 0 {
                return 0;
            }
            as_standby($slot, || $key(&ctx), |key| $record(&ctx, key));
            0
        }
    };
}

primary_and_standby!(
    "inet_sock_set_state",
    STATE,
    state_hit,
    state_with_cookie,
    inet_sock_set_state,
    inet_sock_set_state_standby
);
// For kernels before 5.12, whose tracing programs cannot call `bpf_get_socket_cookie`.
primary_and_standby!(
    "inet_sock_set_state",
    STATE,
    state_hit_without_cookie,
    state_without_cookie,
    inet_sock_set_state_no_cookie,
    inet_sock_set_state_no_cookie_standby
);
primary_and_standby!(
    "tcp_send_reset",
    SEND_RESET,
    sent_reset_hit,
    reset_sent,
    tcp_send_reset,
    tcp_send_reset_standby
);
primary_and_standby!(
    "tcp_receive_reset",
    RECEIVE_RESET,
    received_reset_hit,
    reset_received,
    tcp_receive_reset,
    tcp_receive_reset_standby
);

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accept::from_syscall_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accept::from_syscall_exit(&ctx);
    0
}

#[fexit(function = "inet_accept")]
pub fn inet_accept_exit(ctx: FExitContext) -> i32 {
    accept::from_inet_accept_exit(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
