//! State transitions: every TCP socket's, with its identity read at that instant, and
//! at the final one (to CLOSE) the evidence words the classifier decides from.
//!
//! The socket is read with direct loads through the typed pointer `bpf_skc_to_tcp_sock`
//! returns ([`load_field`]), which cost a few instructions each where a
//! `bpf_probe_read_kernel` call costs tens of nanoseconds.

use core::{
    ffi::c_void,
    ptr::{addr_of_mut, read_volatile},
};

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skc_to_tcp_sock},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use observer_common::{
    ABSENT, CloseEvent, EventKind, SockField, StateEvent,
    kernel::{AF_INET6, TCP_CLOSE, TCP_FIN_WAIT1, TCP_LAST_ACK, TCP_LISTEN, TCP_SYN_SENT},
    nested::HitKey,
};

use crate::{
    config,
    owner::{clear_owner, write_current_owner},
    read::read_kernel,
    ring::{Stamp, count_lost, cpu_ring, header, wakeup_flags},
};

// Hit keys: the arguments that tell two hits nested on one CPU apart (see [`HitKey`]).

/// (sk, its cookie, oldstate and newstate); the cookie is made here if the socket has
/// none yet, so the record reuses it.
#[inline(always)]
pub(crate) fn state_hit(ctx: &BtfTracePointContext) -> HitKey {
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's own socket argument, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    HitKey { sk: sk as u64, cookie, detail: transition_word(ctx) }
}

/// For kernels before 5.12 (no cookie helper in tracing programs), which also run a
/// program nested in itself: there the standby's own hit is always on top, and a
/// leftover never needs telling apart.
#[inline(always)]
pub(crate) fn state_hit_without_cookie(ctx: &BtfTracePointContext) -> HitKey {
    HitKey { sk: ctx.arg(0), cookie: 0, detail: transition_word(ctx) }
}

#[inline(always)]
fn transition_word(ctx: &BtfTracePointContext) -> u64 {
    let old_state: u64 = ctx.arg(1);
    let new_state: u64 = ctx.arg(2);
    (old_state & 0xff) | ((new_state & 0xff) << 8)
}

/// TP_PROTO(const struct sock *sk, const int oldstate, const int newstate); the cookie
/// was made for the hit's key.
#[inline(always)]
pub(crate) fn state_with_cookie(ctx: &BtfTracePointContext, hit: &HitKey) {
    record_state(ctx, hit.sk, Some(hit.cookie));
}

/// The cookie read from the socket: 0 unless something generated it.
#[inline(always)]
pub(crate) fn state_without_cookie(ctx: &BtfTracePointContext, hit: &HitKey) {
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
    if new_state as u32 != TCP_CLOSE {
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
            None => read_kernel(socket.sk, config!(cookie)),
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
        match new_state {
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
    let (local, remote) = (config!(v6_local), config!(v6_remote));
    let words = addresses.cast::<u64>();
    // SAFETY: within `addresses`; the loads are inside the two `in6_addr` members (their
    // offsets come from the daemon's BTF lookup).
    unsafe {
        if family != u64::from(AF_INET6) || local == ABSENT || remote == ABSENT {
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
