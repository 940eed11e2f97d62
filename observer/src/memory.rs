//! Memory the daemon hands back to the kernel.

/// Hands free heap pages back to the kernel. glibc keeps them for an allocation burst
/// that never comes: the kernel's BTF, parsed at start (a third of the daemon's resident
/// memory; docs/benchmarks.md), and what the socket inventory's table of first-seen times
/// gives back after a burst of sockets (in the arena of the inventory thread, which is
/// gone by then).
pub fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
