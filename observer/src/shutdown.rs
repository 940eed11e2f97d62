//! SIGINT and SIGTERM (systemd's stop) both cancel one token; every task watches it.
//! Stop order: the pipeline drains the ring and settles closed sockets, the HTTP server
//! finishes in-flight requests, then the eBPF object is dropped, which detaches.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            () = token.cancelled() => return,
        }
        log::info!("shutting down");
        token.cancel();
    });
    Ok(())
}
