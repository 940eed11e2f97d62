//! Writing records: the clock read before a reservation, each CPU's ring, batched
//! wake-ups of the daemon, and the count of records a full ring had no room for.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, generated::bpf_ringbuf_query},
};
use observer_common::{
    EventHeader, EventKind,
    programs::{LOST_RING_FULL, WAKEUP_INTERVAL_NS},
};

use crate::{CpuRing, LOST, RINGS, WOKEN_AT};

/// Where and when a record is made, read *before* its reservation: then every record
/// reserved after another in a CPU's ring was stamped no earlier than that one was
/// reserved, which is what lets the daemon merge the CPUs' rings by timestamp without
/// reordering one socket's records (the daemon's `capture::merge`).
pub(crate) struct Stamp {
    pub(crate) cpu: u32,
    pub(crate) timestamp_ns: u64,
}

impl Stamp {
    #[inline(always)]
    pub(crate) fn now() -> Self {
        // SAFETY: plain helpers without arguments. The program cannot migrate to another
        // CPU while it runs.
        unsafe { Self { cpu: bpf_get_smp_processor_id(), timestamp_ns: bpf_ktime_get_ns() } }
    }
}

/// The ring buffer of the CPU the record is made on ([`RINGS`]); `None` only if the
/// daemon gave that CPU none, which it does not.
#[inline(always)]
pub(crate) fn cpu_ring(stamp: &Stamp) -> Option<&'static CpuRing> {
    RINGS.get(stamp.cpu)
}

#[inline(always)]
pub(crate) fn header(kind: EventKind, stamp: &Stamp, skaddr: u64, cookie: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        cpu: stamp.cpu,
        timestamp_ns: stamp.timestamp_ns,
        skaddr,
        cookie,
    }
}

/// Per CPU ([`WOKEN_AT`]): when a record of this CPU last woke the daemon, and how many
/// records it has written since.
#[repr(C)]
pub struct Wakeups {
    at_ns: u64,
    records_since: u64,
}

/// How often (in records of one CPU) [`wakeup_flags`] asks how full the ring is: each
/// ask is two helper calls, and between two asks the CPU adds at most this many records
/// (~6 KiB) to the eighth of the ring that triggers a wake-up.
const FILL_CHECK_EVERY: u64 = 16;

/// Wakes the daemon for the first record after [`WAKEUP_INTERVAL_NS`] of this CPU, or
/// when an eighth of this CPU's `ring` is waiting (whatever `--bpf.ring-buffer-bytes`
/// is); otherwise leaves the record to the daemon's follow-up drain.
#[inline(always)]
pub(crate) fn wakeup_flags(ring: &CpuRing, now_ns: u64) -> u64 {
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
pub(crate) fn count_lost() -> Option<u64> {
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
