//! `observer` (the exporter): the composition root. It wires the events file, the web
//! configuration, the listener, the programs, the start-up scans and the reader task,
//! and serves HTTP until shutdown.

use std::{
    fs::File,
    io::{BufWriter, Write as _},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    capture::{
        decode::{Decoder, SocketEvent},
        reader::{Pipeline, Sink},
    },
    classify::Cause,
    cli::{CommonArgs, DaemonArgs},
    clock::Clock,
    error::Error,
    export::{
        connections::RecentConnections,
        http::{self, AppState},
        metrics::{CloseLabels, Metrics},
        report::{self, ConnectionReport},
        server, web_config,
    },
    inventory::{self, Inventory},
    kernel::{self, privileges},
    owner::{self, CgroupNames},
    scan,
    track::{ClosedConnection, Tracker},
};

/// How long a client may take to send a request head (or a TLS handshake), and to wait
/// with a kept-alive connection for its next request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a request may take (a `/connections` answer over a large host included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Feeds `/connections`, the log, and `--debug.events-file`.
struct DaemonSink {
    recent: Arc<RecentConnections>,
    /// The capture thread's own cache: one shared with HTTP would make it wait for
    /// requests that hold it.
    cgroups: CgroupNames,
    events_file: Option<BufWriter<File>>,
}

impl Sink for DaemonSink {
    fn event(&mut self, event: &SocketEvent) {
        if let Some(file) = &mut self.events_file {
            let written = serde_json::to_writer(&mut *file, event)
                .map_err(std::io::Error::from)
                .and_then(|()| file.write_all(b"\n"));
            if let Err(error) = written {
                log::error!("cannot write to the events file, no longer recording: {error}");
                self.events_file = None;
            }
        }
    }

    fn closed(&mut self, connection: ClosedConnection) {
        let cgroup =
            connection.owner.as_ref().and_then(|owner| self.cgroups.resolve(owner.cgroup_id));
        if connection.verdict.cause == Cause::Unknown {
            report::log_unknown(&ConnectionReport::closed(
                &connection,
                &Clock::now(),
                cgroup.clone(),
            ));
        }
        self.recent.push(connection, cgroup);
    }

    fn flush(&mut self) {
        if let Some(file) = &mut self.events_file
            && let Err(error) = file.flush()
        {
            log::error!("cannot write to the events file, no longer recording: {error}");
            self.events_file = None;
        }
    }
}

/// The exporter: serves metrics until `shutdown` is cancelled.
pub async fn run(
    args: DaemonArgs,
    common: CommonArgs,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let events_file = args.events_file.as_deref().map(create_events_file).transpose()?;
    // Cheap checks first: a bad config file or a busy port is reported before the
    // programs are loaded.
    let web_config = web_config::LiveConfig::load(args.web_config_file.as_deref())?;
    let cgroup_root = owner::cgroup::hierarchy(common.cgroupfs.as_deref())?;
    let may_load = privileges::check()?;
    let open_files = server::raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(args.listen_address)
        .await
        .map_err(|source| Error::Listen { address: args.listen_address, source })?;
    let address = listener.local_addr().unwrap_or(args.listen_address);
    let (layout, attached) = kernel::attach(&common, may_load)?;
    scan::start()
        .map_err(|source| Error::Io { context: "cannot start the scan thread", source })?;

    let close_labels = CloseLabels {
        netns: args.netns_label,
        comm: args.comm_label,
        max_values: args.max_label_values,
    };
    let metrics = Arc::new(Metrics::new(args.max_ports, close_labels));
    metrics.set_accept_owner(attached.accept_owners.name());
    let recent =
        Arc::new(RecentConnections::new(args.max_recent).counting_evictions(Arc::clone(&metrics)));
    let healthy = Arc::new(AtomicBool::new(true));
    let tracker = Arc::new(Mutex::new(Tracker::new(common.max_sockets)));
    let inventory = Arc::new(Inventory::new());
    let cgroups = Arc::new(Mutex::new(CgroupNames::new(cgroup_root.clone())));
    // The first inventory: sockets older than the daemon are counted from the start.
    let first = Arc::clone(&inventory);
    if let Some(snapshot) = scan::SOCKETS.run(move || first.refresh(Duration::ZERO)).await {
        metrics.set_inventory(&snapshot);
        if snapshot.failures > 0 {
            log::warn!(
                "{} network namespace(s) could not be listed (needs CAP_SYS_ADMIN and \
                 CAP_SYS_PTRACE); their sockets are not counted",
                snapshot.failures
            );
        }
    }
    // Sockets older than the daemon: who holds them now is the best owner there is.
    let startup_holders = Arc::new(
        scan::HOLDERS
            .run({
                let root = cgroup_root.clone();
                move || owner::socket_holders(root.as_deref())
            })
            .await
            .unwrap_or_default(),
    );
    let startup_sockets = scan::SOCKETS.run(inventory::list_all).await.unwrap_or_default();
    tracker.lock().unwrap_or_else(PoisonError::into_inner).set_preexisting_owners(
        owners_by_cookie(&startup_sockets, &startup_holders),
        listener_owners(&startup_sockets, &startup_holders),
    );
    spawn_inventory_refresh(
        Arc::clone(&inventory),
        Arc::clone(&metrics),
        args.inventory_interval,
        shutdown.clone(),
    );
    let limits = server::Limits {
        max_connections: args.max_connections,
        header_timeout: HEADER_TIMEOUT,
        max_requests: args.max_requests,
        request_timeout: REQUEST_TIMEOUT,
    }
    .within_open_file_limit(open_files);
    let routes = http::router(AppState {
        metrics: Arc::clone(&metrics),
        recent: Arc::clone(&recent),
        healthy: Arc::clone(&healthy),
        telemetry_path: args.telemetry_path.clone(),
        tracker: Arc::clone(&tracker),
        inventory,
        listing: Arc::new(inventory::SharedListing::default()),
        cgroups,
        startup_holders,
    });
    // Authentication outermost: a client that authenticated once is let in before the
    // in-flight bound, which a flood of wrong passwords cannot then fill.
    let app = web_config.protect(server::bounded(routes, limits));
    let scheme = if web_config.current().tls.is_some() { "https" } else { "http" };
    reload_on_hangup(Arc::clone(&web_config), shutdown.clone())
        .map_err(|source| Error::Io { context: "cannot install signal handlers", source })?;
    let server = tokio::spawn(server::serve(listener, app, web_config, limits, shutdown.clone()));
    log::info!("listening on {scheme}://{address}{}", args.telemetry_path);

    let sink = DaemonSink { recent, cgroups: CgroupNames::new(cgroup_root), events_file };
    let pipeline = Pipeline::new(attached, Decoder::new(&layout), tracker, metrics, sink);
    let result = match pipeline.spawn(shutdown.clone()) {
        Ok(stopped) => {
            // The capture and scan threads keep what they need; this one serves HTTP.
            privileges::drop_all_on_this_thread();
            log::info!("capabilities kept by the capture and scan threads only");
            stopped.await
        }
        Err(error) => Err(error),
    };
    healthy.store(false, Ordering::Relaxed);
    shutdown.cancel();
    if let Err(join) = server.await {
        log::error!("HTTP server task failed: {join}");
    }
    result
}

/// Reads the web config file again at each SIGHUP (certificate rotation, user changes).
fn reload_on_hangup(
    config: Arc<web_config::LiveConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                received = hangup.recv() => {
                    if received.is_none() {
                        return;
                    }
                    config.reload();
                }
                () = shutdown.cancelled() => return,
            }
        }
    });
    Ok(())
}

/// `--debug.events-file`: created afresh, readable by its owner only (events name every
/// peer of the host), and never through a symbolic link (a planted link must not make a
/// privileged daemon overwrite another file).
fn create_events_file(path: &std::path::Path) -> Result<BufWriter<File>, Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        // An existing file keeps its mode through `open`.
        .and_then(|file| {
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            Ok(BufWriter::new(file))
        })
        .map_err(|source| Error::Io {
            context: "cannot create the events file (a symbolic link is refused)",
            source,
        })
}

/// The startup holders of the inventoried sockets, by cookie (the key events carry).
fn owners_by_cookie(
    namespaces: &[inventory::NamespaceSockets],
    holders: &std::collections::HashMap<u32, owner::Process>,
) -> std::collections::HashMap<u64, owner::Process> {
    namespaces
        .iter()
        .flat_map(|namespace| &namespace.sockets)
        .filter_map(|socket| Some((socket.cookie, *holders.get(&socket.inode)?)))
        .collect()
}

/// The owners of the listening sockets among `namespaces`, by (namespace, port): what
/// the sockets they accept start with (see `Tracker::set_preexisting_owners`).
fn listener_owners(
    namespaces: &[inventory::NamespaceSockets],
    holders: &std::collections::HashMap<u32, owner::Process>,
) -> Vec<((u32, u16), owner::Process)> {
    namespaces
        .iter()
        .flat_map(|namespace| {
            namespace
                .sockets
                .iter()
                .filter(|socket| socket.state == crate::tcp::TcpState::Listen)
                .filter_map(|socket| {
                    Some(((namespace.netns, socket.local.port()), *holders.get(&socket.inode)?))
                })
        })
        .collect()
}

/// Refreshes the socket inventory every `interval` (ages stay precise between scrapes).
fn spawn_inventory_refresh(
    inventory: Arc<Inventory>,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
            let inventory = Arc::clone(&inventory);
            if let Some(snapshot) = scan::SOCKETS.run(move || inventory.refresh(interval / 2)).await
            {
                metrics.set_inventory(&snapshot);
            }
        }
    });
}
