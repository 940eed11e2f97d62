//! What the daemon may do: [`check`] first (one clear line instead of an EPERM from deep
//! inside the loader), and once the programs are loaded and attached, the capabilities
//! that only loading needed are dropped for good ([`drop_unneeded`], docs/security.md).
//!
//! Kept, if the daemon had them:
//! * `CAP_SYS_ADMIN`: `setns()` into other network namespaces for the socket inventory
//!   (and, on kernels before 5.19 with `kernel.unprivileged_bpf_disabled`, any `bpf()`
//!   call at all, including reading the drop counters through their descriptors).
//! * `CAP_SYS_PTRACE`: opening `/proc/<pid>/ns/net` of other users' processes.
//!
//! Everything else goes: `CAP_BPF`, `CAP_PERFMON` (no further program is ever loaded),
//! `CAP_SYS_RESOURCE` (the memlock limit was raised before loading), `CAP_DAC_*`,
//! `CAP_NET_*`, `CAP_SETPCAP` itself, … from the effective, permitted, inheritable,
//! ambient and (when allowed) bounding sets, so not even an exec can get them back.
//!
//! Capabilities are per thread: this runs on the main thread before any other thread
//! exists, and the threads created from it inherit the reduced sets. Only two keep them:
//! the capture thread and the scan thread (`crate::scan`); the main thread, which serves
//! HTTP, and every thread of the runtime's pool give them up
//! ([`drop_all_on_this_thread`]).

use caps::{CapSet, Capability, CapsHashSet};

use crate::error::Error;

/// Proof that [`check`] passed: loading the programs takes one ([`crate::kernel::attach`]),
/// so the check runs once, before anything else that needs privileges.
pub struct MayLoadPrograms(());

/// Fails with a one-line explanation unless we may load tracing programs: root
/// (`CAP_SYS_ADMIN`), or `CAP_BPF` and `CAP_PERFMON` (Linux 5.8+).
pub fn check() -> Result<MayLoadPrograms, Error> {
    let effective = caps::read(None, CapSet::Effective).unwrap_or_else(|error| {
        log::warn!("cannot read our capabilities, assuming none: {error}");
        CapsHashSet::new()
    });
    if effective.contains(&Capability::CAP_SYS_ADMIN) {
        return Ok(MayLoadPrograms(()));
    }
    let missing: Vec<String> = [Capability::CAP_BPF, Capability::CAP_PERFMON]
        .into_iter()
        .filter(|cap| !effective.contains(cap))
        .map(|cap| cap.to_string())
        .collect();
    if missing.is_empty() {
        return Ok(MayLoadPrograms(()));
    }
    Err(Error::Privileges { missing: missing.join(", ") })
}

/// What the daemon keeps after attaching.
pub const KEPT: [Capability; 2] = [Capability::CAP_SYS_ADMIN, Capability::CAP_SYS_PTRACE];

/// Drops every capability but [`KEPT`]; returns the ones that remain. Failing to drop is
/// logged, not fatal: the daemon then runs with what it was given.
pub fn drop_unneeded() -> CapsHashSet {
    let permitted = match caps::read(None, CapSet::Permitted) {
        Ok(permitted) => permitted,
        Err(error) => {
            log::warn!("cannot read our capabilities, keeping them: {error}");
            return CapsHashSet::new();
        }
    };
    let keep: CapsHashSet = KEPT.into_iter().filter(|cap| permitted.contains(cap)).collect();
    // The bounding set first: shrinking it needs CAP_SETPCAP, dropped just below.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all().difference(&keep) {
            if let Err(error) = caps::drop(None, CapSet::Bounding, *cap) {
                log::debug!("cannot drop {cap} from the bounding set: {error}");
            }
        }
    }
    match keep_only_on_this_thread(&keep) {
        Ok(()) => {
            let mut names: Vec<String> = keep.iter().map(ToString::to_string).collect();
            names.sort();
            log::info!(
                "attached; dropped every capability except {}",
                if names.is_empty() { "(none)".to_string() } else { names.join(", ") }
            );
        }
        Err(error) => log::warn!("cannot drop capabilities: {error}"),
    }
    keep
}

/// Gives up every capability on the calling thread, for good: the threads that parse
/// HTTP, check passwords or write output need none. Failing is logged, not fatal.
pub fn drop_all_on_this_thread() {
    if let Err(error) = keep_only_on_this_thread(&CapsHashSet::new()) {
        log::warn!("cannot drop this thread's capabilities: {error}");
    }
}

/// Reduces the calling thread's sets to `keep`: ambient cleared, inheritable emptied,
/// effective and permitted set to `keep` (for good: permitted never grows back).
fn keep_only_on_this_thread(keep: &CapsHashSet) -> Result<(), caps::errors::CapsError> {
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, keep)?;
    caps::set(None, CapSet::Permitted, keep)
}
