//! The kernel's clock and the wall clock: events are stamped with CLOCK_MONOTONIC
//! (`bpf_ktime_get_ns()`), people read wall-clock times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Converts kernel CLOCK_MONOTONIC timestamps to wall-clock time, as the wall clock is
/// when [`Clock::now`] is called. Take one per report, not one per daemon: the wall clock
/// may be stepped after start (NTP, a resumed virtual machine), and a daemon that kept
/// its first offset reported every later close that much off — seconds before the
/// actual time, so that clients comparing with their own clock lost them.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock minus monotonic time, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        Self { offset_ns: wall as i128 - i128::from(monotonic_ns()) }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let wall = (i128::from(monotonic_ns) + self.offset_ns).max(0);
        UNIX_EPOCH + Duration::from_nanos(wall as u64)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl Clock {
    pub fn rfc3339(&self, monotonic_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.wall(monotonic_ns)).to_string()
    }
}
