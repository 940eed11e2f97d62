//! The programs' side of the nested-run protocol (`observer_common::nested`): a primary
//! pushes its hit before recording it, a standby records only what its primary could not.

use observer_common::{
    nested::{self, HitKey},
    programs::LOST_HANDLED_BY_STANDBY,
};

use crate::{LOST, RECORDED};

/// Runs a primary program: pushes the hit's `key` on this CPU's stack, then records.
#[inline(always)]
pub(crate) fn as_primary(tracepoint: u32, key: HitKey, record: impl FnOnce()) {
    if let Some(hits) = RECORDED.get_ptr_mut(tracepoint) {
        // SAFETY: this CPU's slot of the tracepoint's stack.
        unsafe { nested::push(hits, key) };
    }
    record();
}

/// Runs a standby program: records the hit (`key()` identifies it) only if its primary
/// did not, and counts it as handled here.
#[inline(always)]
pub(crate) fn as_standby(
    tracepoint: u32,
    key: impl FnOnce() -> HitKey,
    record: impl FnOnce(&HitKey),
) {
    let Some(hits) = RECORDED.get_ptr_mut(tracepoint) else { return };
    // SAFETY: this CPU's slot. Read before the key, whose cookie is a helper call.
    let top = unsafe { nested::top(hits) };
    let key = key();
    // SAFETY: as above.
    if unsafe { nested::pop_recorded(hits, top, &key) } {
        return;
    }
    record(&key);
    if let Some(handled) = LOST.get_ptr_mut(LOST_HANDLED_BY_STANDBY + tracepoint) {
        // SAFETY: per-CPU slot of this program.
        unsafe { *handled += 1 };
    }
}
