//! The kernel side of observer: capture evidence, count drops, decide nothing.
//!
//! * `inet_sock_set_state` (tp_btf): every TCP state transition, with the socket's
//!   identity and the [`SockField`] words read at that instant.
//! * `tcp_send_reset` / `tcp_receive_reset` (tp_btf): which socket sent or received an
//!   RST, in which state, and the kernel's reason where it has one.
//! * `inet_accept()` returning (fexit; the only process-context moment of a server-side
//!   socket): which process accepted it. Where the kernel has no BPF trampolines, the
//!   `syscalls:sys_exit_accept4` / `sys_exit_accept` classic tracepoints instead, which
//!   find the socket through the caller's descriptor table — and which, once enabled,
//!   send every system call of every task through the tracing slow path (~56 ns more per
//!   call on the benchmark machine), where a trampoline costs only the accept() calls.
//!
//! The first three are BTF tracepoints rather than classic ones: no tracefs is needed, the
//! arguments are the TP_PROTO arguments (no record layout to parse), and a nested run the
//! kernel has to skip is counted in the program's `recursion_misses` (classic tracepoint
//! programs are skipped silently) — and recorded by a standby twin (see [`as_standby`]).
//!
//! Offsets into `struct sock` are not compiled in: the daemon computes them from the
//! running kernel's BTF and patches [`CONFIG`] before loading. The state programs read the
//! socket with direct loads through the typed pointer `bpf_skc_to_tcp_sock` returns (see
//! [`load_field`]), which cost a few instructions each where a `bpf_probe_read_kernel`
//! call costs tens of nanoseconds. A record that does not fit
//! in the ring buffer is counted in [`LOST`] and exported as `observer_events_lost_total`;
//! it is also reported through aya-log, so the daemon's log says when and what.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write types.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::MaybeUninit,
    ptr::{addr_of_mut, read_volatile},
};

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    btf_maps::{ArrayOfMaps, RingBuf},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_task,
            bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_ringbuf_query, bpf_skc_to_tcp_sock,
        },
    },
    macros::{btf_map, btf_tracepoint, fexit, map, tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, FExitContext, TracePointContext},
};
use aya_log_ebpf::warn;
use observer_common::{
    ABSENT, CloseEvent, EventHeader, EventKind, IPPROTO_TCP, NO_REASON, Owner, OwnerEvent,
    ProgramConfig, ResetEvent, SockField, StateEvent, TaskConfig, WAKEUP_INTERVAL_NS,
};

/// Kernel layout, filled in by the daemon before load.
///
/// In `.rodata`, which the loader freezes: the verifier knows every value loaded from it
/// as the constant it is, and the direct loads of [`load_field`] need exactly that (an
/// offset added to a typed pointer must be known). So the state programs read it field
/// by field where they use a value ([`config!`]), with volatile loads: the compiler must
/// neither fold in the placeholder it was compiled with nor copy the struct to the stack
/// first, where a 4-byte value is lost to the verifiers of 5.x kernels.
#[unsafe(no_mangle)]
static CONFIG: ProgramConfig = ProgramConfig::UNSET;

/// One field of [`CONFIG`], loaded from `.rodata` at this point of the program.
macro_rules! config {
    ($($field:tt)+) => {{
        // SAFETY: a plain read of a static.
        #[allow(unused_unsafe)]
        let value = unsafe { read_volatile(&raw const CONFIG.$($field)+) };
        value
    }};
}

/// How to name a socket's owner, filled in by the daemon before load.
#[unsafe(no_mangle)]
static TASK_CONFIG: Global<TaskConfig> = Global::new(TaskConfig::UNSET);

/// Records for the daemon: one ring buffer per CPU, indexed by CPU number. The daemon
/// creates the rings (`--bpf.ring-buffer-bytes` each) and puts them here before it
/// attaches a program, and sizes this array to the possible CPUs.
///
/// Per CPU because a shared ring is shared state: its reservation takes a lock and moves
/// a producer position that every CPU writes, and under churn that cache-line traffic
/// was most of the state program's cost (328 ns per run with one ring for all CPUs,
/// 218 with a ring per CPU, 2-CPU machine, docs/benchmarks.md). A CPU's records are
/// in its ring in the order it reserved them; the daemon merges the rings by timestamp,
/// which is why a program reads the clock *before* it reserves ([`Stamp`]).
#[btf_map]
static RINGS: ArrayOfMaps<CpuRing, MAX_CPUS> = ArrayOfMaps::new();

/// The template of [`RINGS`]' members: the kernel checks each ring the daemon inserts
/// against its type and flags, not its size.
type CpuRing = RingBuf<u8, 4096>;

/// Compiled-in size of [`RINGS`]; the daemon loads it with one entry per possible CPU.
const MAX_CPUS: usize = 1;

/// Per CPU: [`LOST_RING_FULL`] counts records dropped because its CPU's ring ([`RINGS`]) was full;
/// [`HANDLED_BY_STANDBY`] + tracepoint counts nested runs a standby program recorded.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1 + TRACEPOINTS, 0);

/// Per CPU and tracepoint: the hits the primary program recorded whose standby has not
/// run yet ([`as_standby`]).
#[map]
static RECORDED: PerCpuArray<RecordedHits> = PerCpuArray::with_max_entries(TRACEPOINTS, 0);

/// A small stack of tracepoint hits, identified by their arguments.
#[repr(C)]
pub struct RecordedHits {
    /// Pushes minus pops; the slot of entry `top - 1` is `(top - 1) % RECORDED_DEPTH`.
    top: u64,
    keys: [HitKey; RECORDED_DEPTH],
}

/// What tells one hit from every other: the socket's address, its cookie, and a third
/// argument (the transition, or the RST's skb).
///
/// The cookie is there because the address is not enough: a freed socket's memory is
/// soon another socket's, which may make the same transition, and an entry a skipped
/// standby left behind (see [`as_standby`]) would then be taken for the new socket's
/// pending hit. Kept as separate words rather than mixed into one: the verifier forbids
/// arithmetic on the typed pointers a BTF tracepoint receives, but lets a privileged
/// program store and compare them.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HitKey {
    sk: u64,
    cookie: u64,
    detail: u64,
}

/// Hits nest at most two deep (a system call's transition interrupted by a softirq's);
/// the rest is room for entries left behind: hits nested in a standby run (their own
/// standby is skipped), and hits of the moment between a primary's attachment and its
/// standby's. Such leftovers are never matched again, since no other hit has their key,
/// and are overwritten as the stack wraps around.
///
/// The depth is for one case: a softirq that interrupts a standby run before it reads
/// `top` pushes a leftover for every transition it makes, all above the interrupted
/// hit's own entry. With 8 slots, one NAPI poll's worth of packets wrapped the stack
/// over that entry, and the standby recorded its hit a second time (traced in the 6.1
/// guest). The standby now reads `top` first thing, so only a softirq landing in the
/// kernel's few instructions before the program (and the map lookup) can do this, and
/// it would need more transitions than this in that one softirq run. The cost is only
/// in the standby's search when its hit is not there — the rare nested case.
const RECORDED_DEPTH: usize = 256;

/// Per CPU: when a record of this CPU last woke the daemon, and how many records it has
/// written since ([`wakeup_flags`]).
#[map]
static WOKEN_AT: PerCpuArray<Wakeups> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct Wakeups {
    at_ns: u64,
    records_since: u64,
}

/// How often (in records of one CPU) [`wakeup_flags`] asks how full the ring is: each
/// ask is two helper calls, and between two asks the CPU adds at most this many records
/// (~6 KiB) to the eighth of the ring that triggers a wake-up.
const FILL_CHECK_EVERY: u64 = 16;

const TRACEPOINTS: u32 = 3;
const STATE: u32 = 0;
const SEND_RESET: u32 = 1;
const RECEIVE_RESET: u32 = 2;
const LOST_RING_FULL: u32 = 0;
const HANDLED_BY_STANDBY: u32 = 1;
/// `TCP_CLOSE`, the final transition.
const TCP_CLOSE: i32 = 7;
/// States only a system call of the owning process enters: connect(), close() or
/// shutdown() (twice), listen().
const TCP_SYN_SENT: i32 = 2;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_LAST_ACK: i32 = 9;
const TCP_LISTEN: i32 = 10;

// Nested runs. The kernel never runs a tp_btf program inside itself on one CPU: if a
// tracepoint fires while the program is already running there (a softirq changing
// another socket's state interrupts a close() being traced), that run is skipped and
// only counted (`recursion_misses`). Under load this loses real transitions. So every
// program has a standby twin attached after it, and the kernel runs both, in that order,
// for every hit the tracepoint makes. Hits nest (LIFO), and at two levels at most the
// kernel never skips both programs of one hit: nested in a primary run, only the primary
// is skipped; nested in a standby run, only the standby.
//
// The primary pushes the hit's key (its arguments and the socket's cookie, [`HitKey`])
// on RECORDED before recording it; the standby looks for its hit's key. Found: the primary ran — pop it and whatever lies
// above it (hits nested in this standby run, whose own standby was skipped). Not found:
// the primary was skipped for this hit — record it. No window depends on where inside
// the programs an interrupt lands, unlike a flag the primary sets and clears, which
// misses a nested hit arriving after the clear but before the program returned.
// The daemon counts as lost the primary's misses minus what the standbys recorded.

#[inline(always)]
fn as_primary(tracepoint: u32, key: HitKey, record: impl FnOnce()) {
    if let Some(hits) = RECORDED.get_ptr_mut(tracepoint) {
        // SAFETY: per-CPU slot. The key is written before `top` moves, so a hit nested
        // here never sees a half-written entry; on kernels that run a program nested in
        // itself (5.10), a hit nested between the two writes pushes to the same slot and
        // pops it again, so the slot is checked once `top` has moved past it.
        // The accesses are volatile: to the compiler nothing else writes this memory, so
        // it dropped the check after the plain stores (and could reorder them).
        unsafe {
            let top = addr_of_mut!((*hits).top);
            let slot = addr_of_mut!((*hits).keys[(top.read_volatile() as usize) % RECORDED_DEPTH]);
            slot.write_volatile(key);
            top.write_volatile(top.read_volatile().wrapping_add(1));
            if slot.read_volatile() != key {
                slot.write_volatile(key);
            }
        }
    }
    record();
}

#[inline(always)]
fn as_standby(tracepoint: u32, key: impl FnOnce() -> HitKey, record: impl FnOnce(&HitKey)) {
    let Some(hits) = RECORDED.get_ptr_mut(tracepoint) else { return };
    // SAFETY: per-CPU slot (see `as_primary`).
    let top = unsafe { addr_of_mut!((*hits).top).read_volatile() };
    // `top` is read before anything else this run does (the key's cookie is a helper
    // call): a hit nested in this run pushes at or above the `top` read here, and never
    // reaches the primary's entry below it.
    let key = key();
    // SAFETY: as above.
    unsafe {
        // A hit nested in this run pushes above `top`; popping to below it drops that
        // entry too, which its skipped standby would have popped.
        let mut depth = 1u64;
        while depth <= RECORDED_DEPTH as u64 && depth <= top {
            let slot = ((top - depth) as usize) % RECORDED_DEPTH;
            if (*hits).keys[slot] == key {
                (*hits).top = top - depth;
                return;
            }
            depth += 1;
        }
    }
    record(&key);
    if let Some(handled) = LOST.get_ptr_mut(HANDLED_BY_STANDBY + tracepoint) {
        // SAFETY: per-CPU slot of this program.
        unsafe { *handled += 1 };
    }
}

/// Defines a tracepoint's primary program and its standby twin, both recording with
/// `$record(ctx, key)`; `$key(ctx)` identifies a hit.
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

// Hit keys: the arguments that tell two hits nested on one CPU apart (see [`HitKey`]).

/// (sk, its cookie, oldstate and newstate); the cookie is made here if the socket has
/// none yet, so the record reuses it.
#[inline(always)]
fn state_hit(ctx: &BtfTracePointContext) -> HitKey {
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's own socket argument, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    HitKey { sk: sk as u64, cookie, detail: transition_word(ctx) }
}

/// For kernels before 5.12 (no cookie helper in tracing programs), which also run a
/// program nested in itself: there the standby's own hit is always on top, and a
/// leftover never needs telling apart.
#[inline(always)]
fn state_hit_without_cookie(ctx: &BtfTracePointContext) -> HitKey {
    HitKey { sk: ctx.arg(0), cookie: 0, detail: transition_word(ctx) }
}

#[inline(always)]
fn transition_word(ctx: &BtfTracePointContext) -> u64 {
    let old_state: u64 = ctx.arg(1);
    let new_state: u64 = ctx.arg(2);
    (old_state & 0xff) | ((new_state & 0xff) << 8)
}

/// (sk, its cookie, skb): every RST sent is its own skb. The cookie is read from the
/// socket (0 if none was made, or with no socket).
#[inline(always)]
fn sent_reset_hit(ctx: &BtfTracePointContext) -> HitKey {
    let sk = arg_value(ctx, 0);
    HitKey { sk, cookie: cookie_field(sk), detail: ctx.arg(1) }
}

/// (sk, its cookie): a socket handles one received RST at a time.
#[inline(always)]
fn received_reset_hit(ctx: &BtfTracePointContext) -> HitKey {
    let sk = arg_value(ctx, 0);
    HitKey { sk, cookie: cookie_field(sk), detail: 0 }
}

/// The socket's cookie as stored in it: 0 if none was made yet, or `sk` is 0.
#[inline(always)]
fn cookie_field(sk: u64) -> u64 {
    if config!(valid) == 0 { 0 } else { read_pointer(sk, config!(cookie)) }
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

/// TP_PROTO(const struct sock *sk, const int oldstate, const int newstate); the cookie
/// was made for the hit's key.
#[inline(always)]
fn state_with_cookie(ctx: &BtfTracePointContext, hit: &HitKey) {
    record_state(ctx, hit.sk, Some(hit.cookie));
}

/// The cookie read from the socket: 0 unless something generated it.
#[inline(always)]
fn state_without_cookie(ctx: &BtfTracePointContext, hit: &HitKey) {
    record_state(ctx, hit.sk, None);
}

/// Records a transition of a TCP socket: a [`StateEvent`], or a [`CloseEvent`] with the
/// evidence words for the final one. `cookie`: `None` to take it from the socket's own
/// field.
#[inline(always)]
fn record_state(ctx: &BtfTracePointContext, sk: u64, cookie: Option<u64>) {
    if config!(valid) == 0 {
        return;
    }
    // SAFETY: `sk` is the tracepoint's own socket argument. The helper returns it typed
    // as a `tcp_sock` if it is one (full socket, IPPROTO_TCP: not SCTP or MPTCP's own),
    // NULL otherwise; loads through it are checked against the kernel's BTF.
    let tcp_sock = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) }.cast::<u8>().cast_const();
    if tcp_sock.is_null() {
        return;
    }
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    let transition = (old_state as u32, new_state as u32);
    let netns = socket_netns(tcp_sock);
    // Before reserving: a full ring must count only the followed namespace's losses.
    let only_netns = config!(only_netns);
    if only_netns != 0 && netns != only_netns {
        return;
    }
    let identity = StateIdentity { sk, tcp_sock, cookie, netns, transition };
    let stamp = Stamp::now();
    let Some(ring) = cpu_ring(&stamp) else {
        transition_lost(ctx, transition);
        return;
    };
    if new_state != TCP_CLOSE {
        let Some(mut entry) = ring.reserve_untyped::<StateEvent>(0) else {
            transition_lost(ctx, transition);
            return;
        };
        let event: *mut StateEvent = entry.as_mut_ptr();
        // SAFETY: a reserved record of the right size.
        unsafe { write_state(&identity, EventKind::State, &stamp, event) };
        entry.submit(wakeup_flags(ring, stamp.timestamp_ns));
        return;
    }
    let Some(mut entry) = ring.reserve_untyped::<CloseEvent>(0) else {
        transition_lost(ctx, transition);
        return;
    };
    let event: *mut CloseEvent = entry.as_mut_ptr();
    // SAFETY: a reserved record of the right size; `state` comes first in it.
    unsafe { write_state(&identity, EventKind::Close, &stamp, addr_of_mut!((*event).state)) };
    // SAFETY: as above; every evidence word is written.
    unsafe {
        let evidence = addr_of_mut!((*event).evidence).cast::<u64>();
        let mut i = SockField::IDENTITY;
        while i < SockField::COUNT {
            evidence.add(i - SockField::IDENTITY).write(load_field(tcp_sock, i));
            i += 1;
        }
    }
    entry.submit(wakeup_flags(ring, stamp.timestamp_ns));
}

/// What [`write_state`] records a transition of.
struct StateIdentity {
    /// The tracepoint's socket argument.
    sk: u64,
    /// The same socket, typed by `bpf_skc_to_tcp_sock` for direct loads.
    tcp_sock: *const u8,
    /// `None`: read the socket's own cookie field.
    cookie: Option<u64>,
    netns: u32,
    transition: (u32, u32),
}

/// The [`SockField`] `field` of the socket (typed pointer `tcp_sock`), zero-extended; 0
/// if this kernel lacks it.
///
/// One direct load of the field's own width (1, 2, 4 or 8 bytes, `FieldLoad`). The
/// verifier checks it against the kernel's BTF and compiles it to a load that reads 0
/// instead of faulting, as `bpf_probe_read_kernel` would, without the helper call. Its
/// offset and width are constants to the verifier ([`CONFIG`]), so of the four loads
/// below it only ever sees the one of the right width.
#[inline(always)]
fn load_field(tcp_sock: *const u8, field: usize) -> u64 {
    let (offset, size) = (config!(sock_fields[field].offset), config!(sock_fields[field].size));
    if offset == ABSENT {
        return 0;
    }
    let at = tcp_sock.wrapping_add(offset as usize);
    // SAFETY: a member of the socket, `size` wide (the daemon's BTF lookup).
    unsafe {
        match size {
            1 => read_volatile(at) as u64,
            2 => read_volatile(at.cast::<u16>()) as u64,
            4 => read_volatile(at.cast::<u32>()) as u64,
            8 => read_volatile(at.cast::<u64>()),
            _ => 0,
        }
    }
}

/// `sk->__sk_common.skc_net.net->ns.inum` with two direct loads (see [`load_field`]), or
/// 0 without CONFIG_NET_NS.
#[inline(always)]
fn socket_netns(tcp_sock: *const u8) -> u32 {
    let (net_offset, inum_offset) = (config!(net), config!(net_ns_inum));
    if net_offset == ABSENT || inum_offset == ABSENT {
        return 0;
    }
    // SAFETY: the `struct net *` member of the socket (8 bytes, as the daemon checked),
    // then the 4-byte `inum` of the network namespace it points to.
    unsafe {
        let net = read_volatile(tcp_sock.wrapping_add(net_offset as usize).cast::<*const u8>());
        if net.is_null() {
            return 0;
        }
        read_volatile(net.wrapping_add(inum_offset as usize).cast::<u32>())
    }
}

/// Counts a transition the ring buffer had no room for (see [`count_lost`]).
#[inline(always)]
fn transition_lost(ctx: &BtfTracePointContext, (old_state, new_state): (u32, u32)) {
    if let Some(lost) = count_lost() {
        warn!(
            ctx,
            "ring buffer full: transition {} -> {} lost ({} on this CPU)",
            old_state,
            new_state,
            lost
        );
    }
}

/// Fills every field of `event`.
///
/// # Safety
/// `event` must be valid for writes of a whole [`StateEvent`].
#[inline(always)]
unsafe fn write_state(
    socket: &StateIdentity,
    kind: EventKind,
    stamp: &Stamp,
    event: *mut StateEvent,
) {
    let (old_state, new_state) = socket.transition;
    unsafe {
        let cookie = match socket.cookie {
            Some(cookie) => cookie,
            None => read_pointer(socket.sk, config!(cookie)),
        };
        (*event).header = header(kind, stamp, socket.sk, cookie);
        // Direct loads, not one `bpf_probe_read_kernel` of the socket's first 112 bytes
        // (72 of them unused): a helper call fewer, and records a third smaller.
        let identity = addr_of_mut!((*event).identity).cast::<u64>();
        let mut i = 0;
        while i < SockField::IDENTITY {
            identity.add(i).write(load_field(socket.tcp_sock, i));
            i += 1;
        }
        write_v6_addresses(
            socket.tcp_sock,
            identity.add(SockField::Family as usize).read(),
            addr_of_mut!((*event).v6_addresses),
        );
        (*event).old_state = old_state;
        (*event).new_state = new_state;
        (*event).netns = socket.netns;
        (*event)._pad = 0;
        // Any other transition may run in softirq or a timer, on behalf of whichever
        // task happened to be interrupted: its owner would be a lie.
        match new_state as i32 {
            TCP_SYN_SENT | TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_LISTEN => {
                write_current_owner(addr_of_mut!((*event).owner))
            }
            _ => clear_owner(addr_of_mut!((*event).owner)),
        }
    }
}

/// The IPv6 addresses of an AF_INET6 socket (v4-mapped ones included), zeros for any
/// other, as four 8-byte direct loads: the verifier accepts a load of any width inside
/// `in6_addr`'s byte array.
///
/// # Safety
/// `addresses` must be valid for writes.
#[inline(always)]
unsafe fn write_v6_addresses(tcp_sock: *const u8, family: u64, addresses: *mut [u64; 4]) {
    const AF_INET6: u64 = 10;
    let (local, remote) = (config!(v6_local), config!(v6_remote));
    let words = addresses.cast::<u64>();
    // SAFETY: within `addresses`; the loads are inside the two `in6_addr` members (their
    // offsets come from the daemon's BTF lookup).
    unsafe {
        if family != AF_INET6 || local == ABSENT || remote == ABSENT {
            // Volatile: plain stores are merged into a call to a byte-by-byte `memset`
            // subprogram, which was 12 % of this program.
            let mut i = 0;
            while i < 4 {
                words.add(i).write_volatile(0);
                i += 1;
            }
            return;
        }
        let at = |offset: u32| read_volatile(tcp_sock.wrapping_add(offset as usize).cast::<u64>());
        words.write(at(local));
        words.add(1).write(at(local + 8));
        words.add(2).write(at(remote));
        words.add(3).write(at(remote + 8));
    }
}

/// Zeroes `owner` ([`Owner::NONE`]) with four word stores: a plain assignment compiles
/// to a call to a byte-by-byte `memset` subprogram, ~4 % of the state program's time.
///
/// # Safety
/// `owner` must be valid for writes.
#[inline(always)]
unsafe fn clear_owner(owner: *mut Owner) {
    const WORDS: usize = size_of::<Owner>() / 8;
    const _: () = assert!(WORDS * 8 == size_of::<Owner>());
    let words = owner.cast::<u64>();
    let mut i = 0;
    while i < WORDS {
        // SAFETY: within `owner`; volatile so the stores are not merged back into memset.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}

/// Writes the task making the current system call into `owner` (in place: the
/// programs' 512-byte stack has no room for another copy).
///
/// # Safety
/// `owner` must be valid for writes.
#[inline(always)]
unsafe fn write_current_owner(owner: *mut Owner) {
    let config = TASK_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    unsafe {
        (*owner).pid = (pid_tgid >> 32) as u32;
        (*owner).tid = pid_tgid as u32;
        (*owner).cgroup_id = bpf_get_current_cgroup_id();
        let comm = addr_of_mut!((*owner).comm).cast::<c_void>();
        // The process's name is its main thread's; both reads zero-fill on failure.
        let leader = read_pointer(bpf_get_current_task(), config.task_group_leader);
        if leader == 0 || config.task_comm == ABSENT {
            bpf_get_current_comm(comm, 16);
        } else {
            bpf_probe_read_kernel(comm, 16, (leader + config.task_comm as u64) as *const c_void);
        }
    }
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx);
    0
}

/// accept() returned descriptor `ret`: find its socket through the caller's descriptor
/// table and record who owns it.
#[inline(always)]
fn accepted(ctx: &TracePointContext) {
    let task_config = TASK_CONFIG.load();
    if config!(return_at_once) != 0 || config!(valid) == 0 || task_config.accept_ret == ABSENT {
        return;
    }
    // SAFETY: `accept_ret` is the offset of `long ret` in this record (tracefs format).
    let Ok(fd) = (unsafe { ctx.read_at::<i64>(task_config.accept_ret as usize) }) else {
        return;
    };
    if fd < 0 {
        return;
    }
    let walk = &task_config.fd_walk;
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let fdt = read_pointer(read_pointer(task, walk.task_files), walk.files_fdt);
    if fdt == 0 || fd as u64 >= read_u32(fdt, walk.fdt_max_fds) as u64 {
        return;
    }
    let file = read_pointer(read_pointer(fdt, walk.fdt_fd) + fd as u64 * 8, 0);
    let socket = read_pointer(file, walk.file_private_data);
    // A socket's file points back at it; any other file's private data would not.
    if socket == 0 || read_pointer(socket, walk.socket_file) != file {
        return;
    }
    let sk = read_pointer(socket, walk.socket_sk);
    if sk == 0 || !is_tcp(sk) {
        return;
    }
    record_owner(ctx, sk);
}

/// `int inet_accept(struct socket *sock, struct socket *newsock, ...)` returned (TCP's
/// accept for both families, whichever system call or io_uring request made it): if it
/// gave `newsock` a socket, the calling task owns it. (The arguments after `newsock`
/// changed in 6.10; the first two did not.)
#[fexit(function = "inet_accept")]
pub fn inet_accept_exit(ctx: FExitContext) -> i32 {
    if config!(return_at_once) != 0 || config!(valid) == 0 {
        return 0;
    }
    // A failed accept leaves the new `struct socket` without a sock.
    let sk = read_pointer(arg_value(&ctx, 1), TASK_CONFIG.load().fd_walk.socket_sk);
    if sk != 0 && is_tcp(sk) {
        record_owner(&ctx, sk);
    }
    0
}

/// Records that the current task owns `sk`, a TCP socket it has just accepted.
#[inline(always)]
fn record_owner<C: EbpfContext>(ctx: &C, sk: u64) {
    let cookie = read_pointer(sk, config!(cookie));
    let stamp = Stamp::now();
    let Some((ring, mut entry)) =
        cpu_ring(&stamp).and_then(|ring| Some((ring, ring.reserve_untyped::<OwnerEvent>(0)?)))
    else {
        if let Some(lost) = count_lost() {
            warn!(ctx, "ring buffer full: owner of an accepted socket lost ({} on this CPU)", lost);
        }
        return;
    };
    let event: *mut OwnerEvent = entry.as_mut_ptr();
    // SAFETY: a reserved record of the right size, fully written before submit.
    unsafe {
        (*event).header = header(EventKind::Accepted, &stamp, sk, cookie);
        write_current_owner(addr_of_mut!((*event).owner));
    }
    entry.submit(wakeup_flags(ring, stamp.timestamp_ns));
}

/// The 8-byte word (a pointer, a cookie) at `base + offset`, or 0 if absent or unreadable.
#[inline(always)]
fn read_pointer(base: u64, offset: u32) -> u64 {
    if base == 0 {
        return 0;
    }
    let mut pointer = 0u64;
    // SAFETY: fault-tolerant read into a local.
    unsafe { read_word(base, offset, &mut pointer) };
    pointer
}

#[inline(always)]
fn reset_sent(ctx: &BtfTracePointContext, hit: &HitKey) {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb
    //          [, const enum sk_rst_reason reason])   -- reason since 6.10
    let reason = match config!(send_reset_reason_arg) {
        ABSENT => NO_REASON,
        index => arg_value(ctx, index as usize) as u32,
    };
    let answers_packet = arg_value(ctx, 1) != 0;
    record_reset(ctx, hit, EventKind::ResetSent, reason, answers_packet);
}

#[inline(always)]
fn reset_received(ctx: &BtfTracePointContext, hit: &HitKey) {
    // TP_PROTO(struct sock *sk)
    record_reset(ctx, hit, EventKind::ResetReceived, NO_REASON, false);
}

#[inline(always)]
fn record_reset(
    ctx: &BtfTracePointContext,
    hit: &HitKey,
    kind: EventKind,
    reason: u32,
    answers_packet: bool,
) {
    let skaddr = hit.sk;
    if config!(valid) == 0 || skaddr == 0 || !in_followed_netns(skaddr) {
        // An RST answering a packet that matched no socket: no connection of ours.
        return;
    }
    let stamp = Stamp::now();
    let event = ResetEvent {
        header: header(kind, &stamp, skaddr, hit.cookie),
        state: read_u8(skaddr, config!(state)),
        reason,
        answers_packet: answers_packet as u32,
        _pad: 0,
    };
    let written = cpu_ring(&stamp).is_some_and(|ring| {
        ring.output_untyped::<ResetEvent>(&event, wakeup_flags(ring, stamp.timestamp_ns)).is_ok()
    });
    if !written && let Some(lost) = count_lost() {
        warn!(ctx, "ring buffer full: reset lost ({} on this CPU)", lost);
    }
}

/// The `n`th tracepoint argument as a plain number.
///
/// Read through the helper on purpose: a direct context load types pointer arguments
/// as trusted BTF pointers, and the verifier may then prune `== NULL` tests as always
/// false, yet `tcp_send_reset` gets NULL `sk` (6.10+) and NULL `skb` (active resets).
#[inline(always)]
fn arg_value<C: EbpfContext>(ctx: &C, n: usize) -> u64 {
    let mut value = 0u64;
    // SAFETY: tp_btf and fexit contexts are arrays of u64 arguments; `n` is within the
    // prototype.
    unsafe {
        bpf_probe_read_kernel(
            (&mut value as *mut u64).cast(),
            8,
            ctx.as_ptr().cast::<u64>().add(n).cast::<c_void>().cast_const(),
        )
    };
    value
}

/// Where and when a record is made, read *before* its reservation: then every record
/// reserved after another in a CPU's ring was stamped no earlier than that one was
/// reserved, which is what lets the daemon merge the CPUs' rings by timestamp without
/// reordering one socket's records (see the daemon's `pipeline` module).
struct Stamp {
    cpu: u32,
    timestamp_ns: u64,
}

impl Stamp {
    #[inline(always)]
    fn now() -> Self {
        // SAFETY: plain helpers without arguments. The program cannot migrate to another
        // CPU while it runs.
        unsafe { Self { cpu: bpf_get_smp_processor_id(), timestamp_ns: bpf_ktime_get_ns() } }
    }
}

/// The ring buffer of the CPU the record is made on ([`RINGS`]); `None` only if the
/// daemon gave that CPU none, which it does not.
#[inline(always)]
fn cpu_ring(stamp: &Stamp) -> Option<&'static CpuRing> {
    RINGS.get(stamp.cpu)
}

#[inline(always)]
fn header(kind: EventKind, stamp: &Stamp, skaddr: u64, cookie: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        cpu: stamp.cpu,
        timestamp_ns: stamp.timestamp_ns,
        skaddr,
        cookie,
    }
}

/// `sk_protocol == IPPROTO_TCP` (a bit field on some kernels), in the namespace
/// `--debug.only-netns` follows if set.
#[inline(always)]
fn is_tcp(sk: u64) -> bool {
    is_tcp_protocol(sk) && in_followed_netns(sk)
}

#[inline(always)]
fn is_tcp_protocol(sk: u64) -> bool {
    let mut word = 0u64;
    // SAFETY: fault-tolerant read into a local.
    unsafe { read_word(sk, config!(protocol.offset), &mut word) };
    ((word >> config!(protocol.shift)) as u32 & config!(protocol.mask)) == IPPROTO_TCP
}

/// False only for sockets outside the one namespace `--debug.only-netns` follows.
#[inline(always)]
fn in_followed_netns(sk: u64) -> bool {
    let only_netns = config!(only_netns);
    only_netns == 0 || net_inode(read_pointer(sk, config!(net))) == only_netns
}

/// `net->ns.inum` of the socket's `struct net *`, or 0 without CONFIG_NET_NS.
#[inline(always)]
fn net_inode(net: u64) -> u32 {
    let inum_offset = config!(net_ns_inum);
    if net == 0 || inum_offset == ABSENT {
        return 0;
    }
    let mut inum = MaybeUninit::<u32>::zeroed();
    // SAFETY: fault-tolerant read into a local.
    unsafe {
        bpf_probe_read_kernel(
            inum.as_mut_ptr().cast(),
            4,
            (net + inum_offset as u64) as *const c_void,
        )
    };
    // SAFETY: zero-initialised, and the helper zeroes it again on failure.
    unsafe { inum.assume_init() }
}

/// Copies the 8 bytes at `base + offset` to `dst` (0 if absent or unreadable).
///
/// # Safety
/// `dst` must be valid for an 8-byte write.
#[inline(always)]
unsafe fn read_word(base: u64, offset: u32, dst: *mut u64) {
    if offset == ABSENT {
        unsafe { *dst = 0 };
        return;
    }
    // The helper zero-fills `dst` when the read faults.
    unsafe { bpf_probe_read_kernel(dst.cast(), 8, (base + offset as u64) as *const c_void) };
}

#[inline(always)]
fn read_u32(base: u64, offset: u32) -> u32 {
    if offset == ABSENT {
        return 0;
    }
    let mut value = 0u32;
    // SAFETY: fault-tolerant read into a local.
    unsafe {
        bpf_probe_read_kernel(
            (&mut value as *mut u32).cast(),
            4,
            (base + offset as u64) as *const c_void,
        )
    };
    value
}

#[inline(always)]
fn read_u8(base: u64, offset: u32) -> u32 {
    if offset == ABSENT {
        return 0;
    }
    let mut byte = 0u8;
    // SAFETY: fault-tolerant read into a local.
    unsafe {
        bpf_probe_read_kernel(
            (&mut byte as *mut u8).cast(),
            1,
            (base + offset as u64) as *const c_void,
        )
    };
    byte as u32
}

/// Wakes the daemon for the first record after [`WAKEUP_INTERVAL_NS`] of this CPU, or
/// when an eighth of this CPU's `ring` is waiting (whatever `--bpf.ring-buffer-bytes`
/// is); otherwise leaves the record to the daemon's follow-up drain (see
/// `observer_common::WAKEUP_INTERVAL_NS`).
#[inline(always)]
fn wakeup_flags(ring: &CpuRing, now_ns: u64) -> u64 {
    let ring = (ring as *const CpuRing).cast_mut().cast::<c_void>();
    let Some(woken) = WOKEN_AT.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU slot; a nested run on this CPU at worst wakes once more or asks
    // about the ring's fill one record late.
    unsafe {
        (*woken).records_since += 1;
        let wake = now_ns.wrapping_sub((*woken).at_ns) >= WAKEUP_INTERVAL_NS
            || ((*woken).records_since % FILL_CHECK_EVERY == 0
                && bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA as u64)
                    >= bpf_ringbuf_query(ring, BPF_RB_RING_SIZE as u64) / 8);
        if wake {
            (*woken).at_ns = now_ns;
            (*woken).records_since = 0;
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            BPF_RB_NO_WAKEUP as u64
        }
    }
}

/// Counts a record the ring buffer had no room for. Returns this CPU's count when it
/// reaches a power of two, the losses worth a log line: a line for every one would have
/// the daemon, in the very storm that fills the ring, format and write log lines instead
/// of draining it (the daemon itself logs the total as it grows).
#[inline(always)]
fn count_lost() -> Option<u64> {
    let lost = LOST.get_ptr_mut(LOST_RING_FULL)?;
    // SAFETY: a per-CPU slot, but programs do nest on one CPU (a standby run inside a
    // primary's): the add is atomic so neither increment is lost, as the daemon's exact
    // count needs. Its result is unused, which keeps it the plain atomic add every
    // kernel's verifier accepts (fetching needs 5.12); the read after it is only for
    // the log line.
    let count = unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(lost, 1);
        *lost
    };
    count.is_power_of_two().then_some(count)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
