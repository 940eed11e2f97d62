//! Integration scenarios for observer: real TCP connections between network namespaces,
//! ended in every way the product distinguishes, checked against the daemon's verdicts
//! (`/connections`, `/metrics`) and the kernel's own MIB counters (`nstat`).
//!
//! Run with `cargo xtask test` (as root): it builds the daemon and sets `OBSERVER_BIN`.
//! All scenarios are compiled into this library's test binary (one binary to copy into a
//! VM); each lives in `src/tests/<topic>.rs`.

pub mod actor;
pub mod daemon;
pub mod net;
pub mod prometheus;
pub mod record;
pub mod sock;

#[cfg(test)]
mod tests;
