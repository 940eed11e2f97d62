//! RSTs sent or received by a socket: which one, in which state, and why (the kernel's
//! reason, 6.10+).

use aya_ebpf::programs::BtfTracePointContext;
use aya_log_ebpf::warn;
use observer_common::{ABSENT, EventKind, NO_REASON, ResetEvent, nested::HitKey};

use crate::{
    config,
    read::{arg_value, in_followed_netns, read_kernel},
    ring::{Stamp, count_lost, cpu_ring, header, wakeup_flags},
};

/// (sk, its cookie, skb): every RST sent is its own skb. The cookie is read from the
/// socket (0 if none was made, or with no socket).
#[inline(always)]
pub(crate) fn sent_reset_hit(ctx: &BtfTracePointContext) -> HitKey {
    let sk = arg_value(ctx, 0);
    HitKey { sk, cookie: cookie_field(sk), detail: ctx.arg(1) }
}

/// (sk, its cookie): a socket handles one received RST at a time.
#[inline(always)]
pub(crate) fn received_reset_hit(ctx: &BtfTracePointContext) -> HitKey {
    let sk = arg_value(ctx, 0);
    HitKey { sk, cookie: cookie_field(sk), detail: 0 }
}

/// The socket's cookie as stored in it: 0 if none was made yet, or `sk` is 0.
#[inline(always)]
fn cookie_field(sk: u64) -> u64 {
    if config!(valid) == 0 { 0 } else { read_kernel(sk, config!(cookie)) }
}

#[inline(always)]
pub(crate) fn reset_sent(ctx: &BtfTracePointContext, hit: &HitKey) {
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
pub(crate) fn reset_received(ctx: &BtfTracePointContext, hit: &HitKey) {
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
        state: read_kernel::<u8>(skaddr, config!(state)) as u32,
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
