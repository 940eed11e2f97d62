//! observer: tells how every TCP connection on a Linux host ended — graceful FIN
//! (active, passive, simultaneous), RST (sent or received, and why), timeout
//! (retransmission, keepalive, SYN, zero window) or something else — and exports the
//! counts to Prometheus.
//!
//! # Layout, in the order data flows
//!
//! The kernel side (`observer-ebpf`) only captures evidence; the records it writes are
//! defined once, in `observer-common`. Here:
//!
//! 1. [`kernel`]: where `struct sock` fields live in the running kernel (BTF), loading
//!    and attaching the programs, the drop counters, least privilege.
//! 2. [`capture`]: the reader task — drains each CPU's ring buffer, merges them in time
//!    order, decodes records into [`capture::decode::SocketEvent`]s.
//! 3. [`track`]: follows each socket to its final transition, in bounded memory, and
//!    waits until the evidence is complete.
//! 4. [`classify`]: the pure decision — one [`classify::Verdict`] per connection.
//! 5. [`export`]: Prometheus metrics, connection records, the HTTP server.
//!
//! Beside the flow: [`inventory`] (every socket the kernel lists now, by socket-diag
//! netlink, in every network namespace), [`owner`] (processes, cgroups, containers),
//! [`tcp`] (the TCP vocabulary every stage shares), [`scan`] (the blocking scans, off
//! the runtime), [`memory`].
//!
//! The two entry points, [`daemon::run`] (the exporter) and [`watch::run`] (`observer
//! watch`), wire those together; [`cli`], [`error`] and [`shutdown`] serve the binary.
//! Both take their shutdown trigger as a token so tests and the binary decide when to
//! stop.

pub mod capture;
pub mod classify;
pub mod cli;
pub mod clock;
pub mod daemon;
pub mod error;
pub mod export;
pub mod inventory;
pub mod kernel;
pub mod memory;
pub mod owner;
pub mod scan;
pub mod shutdown;
pub mod tcp;
pub mod track;
pub mod watch;
