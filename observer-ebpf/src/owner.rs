//! The task a record names as its socket's owner: only ever the task making the system
//! call that moved the socket (see `observer_common::Owner`).

use core::{ffi::c_void, ptr::addr_of_mut};

use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid,
    generated::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_task,
        bpf_probe_read_kernel,
    },
};
use observer_common::{ABSENT, Owner};

use crate::{TASK_CONFIG, read::read_kernel};

/// Writes the task making the current system call into `owner` (in place: the
/// programs' 512-byte stack has no room for another copy).
///
/// # Safety
/// `owner` must be valid for writes.
#[inline(always)]
pub(crate) unsafe fn write_current_owner(owner: *mut Owner) {
    let config = TASK_CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `owner` is the caller's; the helpers write within it.
    unsafe {
        (*owner).pid = (pid_tgid >> 32) as u32;
        (*owner).tid = pid_tgid as u32;
        (*owner).cgroup_id = bpf_get_current_cgroup_id();
        let comm = addr_of_mut!((*owner).comm).cast::<c_void>();
        // The process's name is its main thread's; both reads zero-fill on failure.
        let leader: u64 = read_kernel(bpf_get_current_task(), config.task_group_leader);
        if leader == 0 || config.task_comm == ABSENT {
            bpf_get_current_comm(comm, 16);
        } else {
            bpf_probe_read_kernel(comm, 16, (leader + config.task_comm as u64) as *const c_void);
        }
    }
}

/// Zeroes `owner` ([`Owner::NONE`]) with four word stores: a plain assignment compiles
/// to a call to a byte-by-byte `memset` subprogram, ~4 % of the state program's time.
///
/// # Safety
/// `owner` must be valid for writes.
#[inline(always)]
pub(crate) unsafe fn clear_owner(owner: *mut Owner) {
    const WORDS: usize = size_of::<Owner>() / 8;
    const _: () = assert!(WORDS * 8 == size_of::<Owner>());
    let words = owner.cast::<u64>();
    let mut i = 0;
    while i < WORDS {
        // SAFETY: within `owner`; volatile so the stores are not merged back into memset.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}
