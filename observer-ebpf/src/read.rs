//! Fault-tolerant reads of kernel memory the verifier does not type (the reset and
//! accept programs' pointers, the task's descriptor table), and the socket filters built
//! on them. The state programs read their socket with direct loads instead
//! (`state::load_field`).

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{EbpfContext, helpers::generated::bpf_probe_read_kernel};
use observer_common::{ABSENT, kernel::IPPROTO_TCP};

use crate::config;

/// Integers a kernel read may fill: every bit pattern is a value.
pub(crate) trait Word: Copy {}
impl Word for u8 {}
impl Word for u32 {}
impl Word for u64 {}

/// The `T` at `base + offset`; 0 if `base` is NULL, the offset [`ABSENT`], or the memory
/// unreadable (the helper zero-fills on a fault).
#[inline(always)]
pub(crate) fn read_kernel<T: Word>(base: u64, offset: u32) -> T {
    let mut value = MaybeUninit::<T>::zeroed();
    if base != 0 && offset != ABSENT {
        // SAFETY: fault-tolerant read into a local of the size given.
        unsafe {
            bpf_probe_read_kernel(
                value.as_mut_ptr().cast(),
                size_of::<T>() as u32,
                (base + offset as u64) as *const c_void,
            )
        };
    }
    // SAFETY: zero-initialised and `T` is a plain integer ([`Word`]).
    unsafe { value.assume_init() }
}

/// The `n`th tracepoint argument as a plain number.
///
/// Read through the helper on purpose: a direct context load types pointer arguments
/// as trusted BTF pointers, and the verifier may then prune `== NULL` tests as always
/// false, yet `tcp_send_reset` gets NULL `sk` (6.10+) and NULL `skb` (active resets).
#[inline(always)]
pub(crate) fn arg_value<C: EbpfContext>(ctx: &C, n: usize) -> u64 {
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

/// `sk_protocol == IPPROTO_TCP` (a bit field on some kernels), in the namespace
/// `--debug.only-netns` follows if set.
#[inline(always)]
pub(crate) fn is_tcp(sk: u64) -> bool {
    let word: u64 = read_kernel(sk, config!(protocol.offset));
    let protocol = (word >> config!(protocol.shift)) as u32 & config!(protocol.mask);
    protocol == IPPROTO_TCP && in_followed_netns(sk)
}

/// False only for sockets outside the one namespace `--debug.only-netns` follows.
#[inline(always)]
pub(crate) fn in_followed_netns(sk: u64) -> bool {
    let only_netns = config!(only_netns);
    // `net->ns.inum` of the socket's `struct net *` (0 without CONFIG_NET_NS).
    only_netns == 0
        || read_kernel::<u32>(read_kernel(sk, config!(net)), config!(net_ns_inum)) == only_netns
}
