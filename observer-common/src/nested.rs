//! The nested-run protocol: how a tracepoint hit the kernel skipped is still recorded.
//!
//! The kernel never runs a tp_btf program inside itself on one CPU: if a tracepoint fires
//! while the program is already running there (a softirq changing another socket's state
//! interrupts a close() being traced), that run is skipped and only counted
//! (`recursion_misses`). Under load this loses real transitions. So every program has a
//! standby twin attached after it, and the kernel runs both, in that order, for every hit
//! the tracepoint makes. Hits nest (LIFO), and at two levels at most the kernel never
//! skips both programs of one hit: nested in a primary run, only the primary is skipped;
//! nested in a standby run, only the standby.
//!
//! The primary pushes the hit's key ([`HitKey`]) on a per-CPU stack ([`RecordedHits`],
//! [`push`]) before recording it; the standby looks for its hit's key ([`pop_recorded`]).
//! Found: the primary ran — pop it and whatever lies above it (hits nested in this standby
//! run, whose own standby was skipped). Not found: the primary was skipped for this hit —
//! the standby records it. No window depends on where inside the programs an interrupt
//! lands, unlike a flag the primary sets and clears, which misses a nested hit arriving
//! after the clear but before the program returned. The daemon counts as lost the
//! primary's misses minus what the standbys recorded.
//!
//! Pure code over a pointer to the stack, so the host tests below drive the same
//! functions the programs run, through the interleavings the kernel produces.

use core::ptr::addr_of_mut;

/// What tells one hit from every other: the socket's address, its cookie, and a third
/// argument (the transition, or the RST's skb).
///
/// The cookie is there because the address is not enough: a freed socket's memory is
/// soon another socket's, which may make the same transition, and an entry a skipped
/// standby left behind would then be taken for the new socket's pending hit. Kept as
/// separate words rather than mixed into one: the verifier forbids arithmetic on the
/// typed pointers a BTF tracepoint receives, but lets a privileged program store and
/// compare them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HitKey {
    pub sk: u64,
    pub cookie: u64,
    pub detail: u64,
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
/// over that entry, and the standby recorded its hit a second time. The standby reads
/// `top` first thing ([`top`]), so only a softirq landing in the kernel's few
/// instructions before the program (and the map lookup) can do this, and it would need
/// more transitions than this in that one softirq run. The cost is only in the standby's
/// search when its hit is not there — the rare nested case.
pub const RECORDED_DEPTH: usize = 256;

/// A small stack of tracepoint hits, one per CPU and tracepoint (a map value; the kernel
/// zeroes it).
#[repr(C)]
pub struct RecordedHits {
    /// Pushes minus pops; the slot of entry `top - 1` is `(top - 1) % RECORDED_DEPTH`.
    top: u64,
    keys: [HitKey; RECORDED_DEPTH],
}

impl RecordedHits {
    pub const EMPTY: Self =
        Self { top: 0, keys: [HitKey { sk: 0, cookie: 0, detail: 0 }; RECORDED_DEPTH] };
}

/// The primary's part: pushes `key` before the hit is recorded.
///
/// The key is written before `top` moves, so a hit nested here never sees a half-written
/// entry; on kernels that run a program nested in itself (5.10), a hit nested between the
/// two writes pushes to the same slot and pops it again, so the slot is checked once `top`
/// has moved past it. The accesses are volatile: to the compiler nothing else writes this
/// memory, so it dropped the check after the plain stores (and could reorder them).
///
/// # Safety
/// `hits` must be valid for reads and writes, and used only by the runs of one CPU.
#[inline(always)]
pub unsafe fn push(hits: *mut RecordedHits, key: HitKey) {
    // SAFETY: the caller's.
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

/// The standby's first step: where the stack stands as this run begins. Read before
/// anything else the run does: a hit nested in this run pushes at or above it, and never
/// reaches the primary's entry below it.
///
/// # Safety
/// As [`push`].
#[inline(always)]
pub unsafe fn top(hits: *mut RecordedHits) -> u64 {
    // SAFETY: the caller's.
    unsafe { addr_of_mut!((*hits).top).read_volatile() }
}

/// The standby's second step: looks for `key` below `top` (read by [`top`]). Found: the
/// primary recorded this hit; pops it and everything above it (hits nested in this run,
/// which their skipped standby would have popped) and returns true. Not found: the
/// primary was skipped, and the caller records the hit.
///
/// # Safety
/// As [`push`].
#[inline(always)]
pub unsafe fn pop_recorded(hits: *mut RecordedHits, top: u64, key: &HitKey) -> bool {
    // SAFETY: the caller's.
    unsafe {
        let mut depth = 1u64;
        while depth <= RECORDED_DEPTH as u64 && depth <= top {
            let slot = ((top - depth) as usize) % RECORDED_DEPTH;
            if (*hits).keys[slot] == *key {
                (*hits).top = top - depth;
                return true;
            }
            depth += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{boxed::Box, vec, vec::Vec};

    use super::*;

    /// One CPU's stack and the hits each side recorded, driven step by step as the
    /// kernel interleaves the runs.
    struct Cpu {
        hits: Box<RecordedHits>,
        recorded_by_primary: Vec<HitKey>,
        recorded_by_standby: Vec<HitKey>,
    }

    impl Cpu {
        fn new() -> Self {
            Self {
                hits: Box::new(RecordedHits::EMPTY),
                recorded_by_primary: Vec::new(),
                recorded_by_standby: Vec::new(),
            }
        }
        fn primary(&mut self, key: HitKey) {
            // SAFETY: a stack of our own.
            unsafe { push(&mut *self.hits, key) };
            self.recorded_by_primary.push(key);
        }
        /// A standby run in two halves, so that a nested hit can land between them.
        fn standby_begins(&mut self) -> u64 {
            // SAFETY: as above.
            unsafe { top(&mut *self.hits) }
        }
        fn standby_ends(&mut self, top: u64, key: HitKey) {
            // SAFETY: as above.
            if !unsafe { pop_recorded(&mut *self.hits, top, &key) } {
                self.recorded_by_standby.push(key);
            }
        }
        fn standby(&mut self, key: HitKey) {
            let top = self.standby_begins();
            self.standby_ends(top, key);
        }
        /// (recorded by primaries, recorded by standbys, entries left on the stack).
        fn outcome(&self) -> (Vec<HitKey>, Vec<HitKey>, u64) {
            (self.recorded_by_primary.clone(), self.recorded_by_standby.clone(), self.hits.top)
        }
    }

    fn hit(sk: u64, cookie: u64, detail: u64) -> HitKey {
        HitKey { sk, cookie, detail }
    }

    #[test]
    fn a_hit_nobody_interrupts_is_recorded_once_by_its_primary() {
        let mut cpu = Cpu::new();
        let a = hit(0x1000, 1, 0x0201);
        cpu.primary(a);
        cpu.standby(a);
        assert_eq!(cpu.outcome(), (vec![a], vec![], 0));
    }

    #[test]
    fn a_hit_nested_in_a_primary_run_is_recorded_by_its_standby() {
        let (mut cpu, a, b) = (Cpu::new(), hit(0x1000, 1, 0x0704), hit(0x2000, 2, 0x0801));
        // A's primary is running (its key pushed) when B fires: the kernel skips B's
        // primary and runs B's standby, then A's run goes on and A's standby follows.
        cpu.primary(a);
        cpu.standby(b);
        cpu.standby(a);
        assert_eq!(cpu.outcome(), (vec![a], vec![b], 0));
    }

    #[test]
    fn a_hit_nested_in_a_standby_run_is_recorded_once_and_its_entry_dropped() {
        let (mut cpu, a, b) = (Cpu::new(), hit(0x1000, 1, 0x0704), hit(0x2000, 2, 0x0801));
        cpu.primary(a);
        let top = cpu.standby_begins();
        // B fires inside A's standby: B's primary runs, B's standby is skipped. B's
        // entry, whose standby never runs, is popped with A's.
        cpu.primary(b);
        cpu.standby_ends(top, a);
        assert_eq!(cpu.outcome(), (vec![a, b], vec![], 0));
    }

    #[test]
    fn a_leftover_of_a_freed_socket_is_not_taken_for_its_successor() {
        let mut cpu = Cpu::new();
        // A hit between a primary's attachment and its standby's leaves its key behind.
        let old = hit(0x1000, 1, 0x0704);
        cpu.primary(old);
        // The memory is reused by a socket with a new cookie, making the same transition
        // inside another primary run: its own primary is skipped.
        let other = hit(0x3000, 3, 0x0201);
        let successor = hit(0x1000, 9, 0x0704);
        cpu.primary(other);
        cpu.standby(successor);
        cpu.standby(other);
        assert_eq!(cpu.recorded_by_standby, [successor]);
        // With the address alone the leftover would have matched and the hit been lost.
        assert_ne!(old, successor);
    }

    #[test]
    fn the_stack_wraps_around_over_leftovers() {
        let mut cpu = Cpu::new();
        // More leftovers than slots (hits nested in standby runs never popped).
        for n in 0..(RECORDED_DEPTH as u64 + 17) {
            cpu.primary(hit(0x10_0000 + n, n + 1, 0x0201));
        }
        let a = hit(0x1000, 1, 0x0704);
        cpu.primary(a);
        cpu.standby(a);
        assert!(cpu.recorded_by_standby.is_empty(), "the fresh hit is found across the wrap");
        let b = hit(0x2000, 2, 0x0801);
        let top = cpu.standby_begins();
        cpu.standby_ends(top, b);
        assert_eq!(cpu.recorded_by_standby, [b], "a search that finds nothing ends");
    }

    #[test]
    fn an_empty_stack_finds_nothing() {
        let mut cpu = Cpu::new();
        let a = hit(0, 0, 0);
        cpu.standby(a);
        assert_eq!(cpu.outcome(), (vec![], vec![a], 0), "a zeroed slot below top 0 is never read");
    }
}
