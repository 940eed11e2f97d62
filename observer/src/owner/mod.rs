//! Who owns a socket: the process captured in the socket's own system calls, and the
//! cgroup (and container) it ran in.
//!
//! The kernel side records the calling task only where the task *is* the owner: the
//! system calls that move a socket into SYN_SENT (connect), LISTEN, FIN_WAIT1 or
//! LAST_ACK (close, shutdown), and accept()'s return. Every other transition may run in
//! softirq or a timer, on behalf of whichever task was interrupted, so it carries no
//! owner and never overwrites one. A socket none of those calls touched while we
//! watched has an unknown owner, and says so.
//!
//! Here: the
//! process as the kernel recorded it ([`process`], no I/O), who holds sockets older than
//! the daemon ([`holders`], from `/proc`), and cgroup paths and container ids
//! ([`cgroup`], from the cgroup v2 hierarchy).

pub mod cgroup;
pub mod holders;
pub mod process;

pub use cgroup::{Cgroup, CgroupNames, container_id};
pub use holders::socket_holders;
pub use process::{Comm, Process};
