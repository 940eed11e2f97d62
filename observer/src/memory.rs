//! Memory the daemon hands back to the kernel.

/// Hands free heap pages back to the kernel. glibc keeps them for an allocation burst
/// that never comes: the kernel's BTF, parsed at start (17 MiB of the daemon's 48 MiB
/// resident on 6.18), and what the socket inventory's table of first-seen times gives
/// back after a burst of sockets (in the arena of the inventory thread, which is gone by
/// then). See docs/benchmarks.md.
pub fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
