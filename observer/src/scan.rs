//! The blocking scans (`/proc`, socket-diag netlink), on a thread of their own.
//!
//! That thread, `observer-scan`, is the one besides the capture thread that keeps the
//! capabilities the daemon did not drop (docs/security.md): entering other network
//! namespaces takes CAP_SYS_ADMIN, reading other users' `/proc/<pid>/fd`
//! CAP_SYS_PTRACE. Every other thread — the ones that parse HTTP, check passwords, write
//! `watch` output — holds none ([`crate::kernel::privileges::drop_all_on_this_thread`]).
//! Scans run there one at a time, in the order asked.
//!
//! A scan that fails (a panic in it) leaves its caller with what it had, and is logged:
//! the first failure of each scan as a warning, later ones at debug level, so a scrape
//! loop cannot flood the log.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
};

type Job = Box<dyn FnOnce() + Send>;

/// The scan thread's queue; started by [`start`].
static QUEUE: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

/// Starts the scan thread, which keeps the capabilities the calling thread has now.
/// Call it before that thread gives them up.
pub fn start() -> std::io::Result<()> {
    let (queue, jobs) = mpsc::channel::<Job>();
    std::thread::Builder::new().name("observer-scan".into()).spawn(move || {
        for job in jobs {
            job();
        }
    })?;
    if QUEUE.set(Mutex::new(queue)).is_err() {
        log::debug!("the scan thread was already running");
    }
    Ok(())
}

/// A kind of scan, named in the log.
pub struct Scan {
    name: &'static str,
    warned: AtomicBool,
}

impl Scan {
    pub const fn new(name: &'static str) -> Self {
        Self { name, warned: AtomicBool::new(false) }
    }

    /// Runs `scan` on the scan thread; `None` if it failed (logged).
    pub async fn run<T: Send + 'static>(
        &self,
        scan: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(std::panic::catch_unwind(AssertUnwindSafe(scan)));
        });
        let queued = match QUEUE.get() {
            Some(queue) => queue.lock().unwrap_or_else(PoisonError::into_inner).send(job).is_ok(),
            None => false,
        };
        let failure = match (queued, result.await) {
            (true, Ok(Ok(result))) => return Some(result),
            (true, Ok(Err(_))) => "it panicked",
            _ => "the scan thread is not running",
        };
        if self.warned.swap(true, Ordering::Relaxed) {
            log::debug!("{} failed again: {failure}", self.name);
        } else {
            log::warn!("{} failed ({failure}); its results are missing", self.name);
        }
        None
    }
}

/// Listing every socket of every network namespace.
pub static SOCKETS: Scan = Scan::new("the socket inventory");
/// Reading every process's descriptor table for the holders of sockets.
pub static HOLDERS: Scan = Scan::new("the scan of socket holders in /proc");
