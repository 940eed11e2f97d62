//! The contract between the eBPF programs and the daemon, defined once: every number,
//! name and record layout both sides must agree on lives here and nowhere else.
//!
//! The kernel side is deliberately dumb: at every TCP state transition it loads the
//! socket's identity (family, ports, addresses: [`SockField`]s) and its namespace into a
//! [`StateEvent`]; at the final transition the evidence words too, into a
//! [`CloseEvent`]; and at every RST it records which socket, in which state, and why
//! ([`ResetEvent`]). Which byte of the socket each field lives at is not known at compile
//! time: the daemon reads it from the running kernel's BTF and patches [`ProgramConfig`]
//! into the object before loading it. Decoding (bit fields, signedness, byte order) and
//! every decision happen in userspace.
//!
//! * [`records`]: the ring-buffer records. All `#[repr(C)]`, without implicit padding,
//!   at most 8-byte aligned (ring buffer records must be), their sizes pinned by `const`
//!   assertions so a layout change fails the build on both sides.
//! * [`fields`]: which socket words the programs read, and how they are told where.
//! * [`config`]: what the daemon patches into the object before loading it.
//! * [`programs`]: the object's tracepoints, programs, maps, globals and counter slots.
//! * [`kernel`]: kernel ABI numbers (TCP states, address families).
//! * [`nested`]: the per-CPU hit stack that records hits the kernel skipped.
#![no_std]

pub mod config;
pub mod fields;
pub mod kernel;
pub mod nested;
pub mod programs;
pub mod records;

pub use config::{FdWalk, ProgramConfig, TaskConfig};
pub use fields::{ABSENT, BitField, FieldLoad, SockField};
pub use records::{
    CloseEvent, EventHeader, EventKind, NO_REASON, Owner, OwnerEvent, ResetEvent, StateEvent,
};
