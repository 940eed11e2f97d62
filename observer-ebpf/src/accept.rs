//! Who accepted a socket: the only process-context moment of a server-side socket's
//! life. From `inet_accept()` returning (fexit) where the kernel has BPF trampolines,
//! else from the accept system calls' exit, through the caller's descriptor table.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    EbpfContext,
    helpers::generated::bpf_get_current_task,
    programs::{FExitContext, TracePointContext},
};
use aya_log_ebpf::warn;
use observer_common::{ABSENT, EventKind, OwnerEvent};

use crate::{
    TASK_CONFIG, config,
    owner::write_current_owner,
    read::{arg_value, is_tcp, read_kernel},
    ring::{Stamp, count_lost, cpu_ring, header, wakeup_flags},
};

/// accept() returned descriptor `ret`: find its socket through the caller's descriptor
/// table and record who owns it.
#[inline(always)]
pub(crate) fn from_syscall_exit(ctx: &TracePointContext) {
    let task_config = TASK_CONFIG.load();
    if config!(return_at_once) != 0 || config!(valid) == 0 || task_config.accept_ret == ABSENT {
        return;
    }
    // SAFETY: `accept_ret` is the offset of `long ret` in this record (tracefs format).
    let Ok(fd) = (unsafe { ctx.read_at::<i64>(task_config.accept_ret as usize) }) else {
        return;
    };
    if fd < 0 {
        return;
    }
    let walk = &task_config.fd_walk;
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let fdt: u64 = read_kernel(read_kernel(task, walk.task_files), walk.files_fdt);
    if fdt == 0 || fd as u64 >= read_kernel::<u32>(fdt, walk.fdt_max_fds) as u64 {
        return;
    }
    let file: u64 = read_kernel(read_kernel::<u64>(fdt, walk.fdt_fd) + fd as u64 * 8, 0);
    let socket: u64 = read_kernel(file, walk.file_private_data);
    // A socket's file points back at it; any other file's private data would not.
    if socket == 0 || read_kernel::<u64>(socket, walk.socket_file) != file {
        return;
    }
    let sk = read_kernel(socket, walk.socket_sk);
    if sk == 0 || !is_tcp(sk) {
        return;
    }
    record_owner(ctx, sk);
}

/// `int inet_accept(struct socket *sock, struct socket *newsock, ...)` returned (TCP's
/// accept for both families, whichever system call or io_uring request made it): if it
/// gave `newsock` a socket, the calling task owns it. (The arguments after `newsock`
/// changed in 6.10; the first two did not.)
#[inline(always)]
pub(crate) fn from_inet_accept_exit(ctx: &FExitContext) {
    if config!(return_at_once) != 0 || config!(valid) == 0 {
        return;
    }
    // A failed accept leaves the new `struct socket` without a sock.
    let sk = read_kernel(arg_value(ctx, 1), TASK_CONFIG.load().fd_walk.socket_sk);
    if sk != 0 && is_tcp(sk) {
        record_owner(ctx, sk);
    }
}

/// Records that the current task owns `sk`, a TCP socket it has just accepted.
#[inline(always)]
fn record_owner<C: EbpfContext>(ctx: &C, sk: u64) {
    let cookie = read_kernel(sk, config!(cookie));
    let stamp = Stamp::now();
    let Some((ring, mut entry)) =
        cpu_ring(&stamp).and_then(|ring| Some((ring, ring.reserve_untyped::<OwnerEvent>(0)?)))
    else {
        if let Some(lost) = count_lost() {
            warn!(ctx, "ring buffer full: owner of an accepted socket lost ({} on this CPU)", lost);
        }
        return;
    };
    let event: *mut OwnerEvent = entry.as_mut_ptr();
    // SAFETY: a reserved record of the right size, fully written before submit.
    unsafe {
        (*event).header = header(EventKind::Accepted, &stamp, sk, cookie);
        write_current_owner(addr_of_mut!((*event).owner));
    }
    entry.submit(wakeup_flags(ring, stamp.timestamp_ns));
}
