//! The blocking scans (`/proc`, socket-diag netlink) run on tokio's blocking pool, off
//! the thread that drains the rings. One that fails (a panic in the scan) leaves its
//! caller with what it had, and is logged: the first failure of each scan as a warning,
//! later ones at debug level, so a scrape loop cannot flood the log.

use std::sync::atomic::{AtomicBool, Ordering};

/// A kind of scan, named in the log.
pub struct Scan {
    name: &'static str,
    warned: AtomicBool,
}

impl Scan {
    pub const fn new(name: &'static str) -> Self {
        Self { name, warned: AtomicBool::new(false) }
    }

    /// Runs `scan` on the blocking pool; `None` if it failed (logged).
    pub async fn run<T: Send + 'static>(
        &self,
        scan: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        match tokio::task::spawn_blocking(scan).await {
            Ok(result) => Some(result),
            Err(error) => {
                if self.warned.swap(true, Ordering::Relaxed) {
                    log::debug!("{} failed again: {error}", self.name);
                } else {
                    log::warn!("{} failed ({error}); its results are missing", self.name);
                }
                None
            }
        }
    }
}

/// Listing every socket of every network namespace.
pub static SOCKETS: Scan = Scan::new("the socket inventory");
/// Reading every process's descriptor table for the holders of sockets.
pub static HOLDERS: Scan = Scan::new("the scan of socket holders in /proc");
