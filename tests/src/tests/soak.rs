//! Bounded memory, measured (not run by `cargo xtask test`: `cargo xtask soak`).
//!
//! * `socket_flood`: 100,000 idle established connections plus 100,000 SYN_SENT sockets
//!   to a black hole (held by helper processes), watched by a daemon with the default limits and one capped at
//!   50,000 sockets: RSS before and after, sockets tracked, evictions counted.
//! * `steady_churn`: connections opened and closed at a steady rate for
//!   `OBSERVER_SOAK_SECONDS` (default 1800): RSS and tracked sockets sampled every
//!   minute must stay flat.
//!
//! Both daemons follow only the test's client namespace (`--debug.only-netns`), so the
//! figures do not depend on what else runs on the host. Figures go to stderr and to
//! `$OBSERVER_SOAK_REPORT` if set; docs/reliability.md records them.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

use crate::{
    daemon::{Daemon, rss_kib, wait_until},
    net::Pair,
};

fn report(line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("OBSERVER_SOAK_REPORT") {
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(path).expect("report");
        writeln!(file, "{line}").unwrap();
    }
}

fn gauge(daemon: &Daemon, name: &str) -> f64 {
    daemon.metric_sum(name, &[])
}

fn describe(name: &str, daemon: &Daemon) -> String {
    let (rss, peak) = rss_kib(daemon.pid);
    format!(
        "{name}: rss {rss} KiB (peak {peak}), tracked {}, evicted {}, events {}, lost {}",
        gauge(daemon, "observer_tracker_sockets"),
        daemon.metric_sum("observer_tracker_dropped_sockets_total", &[("reason", "capacity")]),
        gauge(daemon, "observer_events_total"),
        gauge(daemon, "observer_events_lost_total"),
    )
}

const IDLE: usize = 100_000;
const SYN_SENT: usize = 100_000;
const CAPPED: usize = 50_000;
/// Sockets per helper process: below the 20,000 descriptors a process may have where
/// raising RLIMIT_NOFILE is not allowed (no CAP_SYS_RESOURCE in containers).
const PER_HELPER: usize = 12_500;
const LISTEN_PORTS: [u16; 4] = [20_001, 20_002, 20_003, 20_004];

/// Helper processes holding the flood's sockets (this test binary, running
/// [`flood_helper`]); they close everything when dropped.
struct Helpers(Vec<std::process::Child>);

impl Helpers {
    /// Starts `count / PER_HELPER` helpers making `mode` sockets in `namespace`, and
    /// waits until each reports its sockets made.
    fn start(&mut self, namespace: &str, mode: &str, count: usize) {
        let mut started = Vec::new();
        for index in 0..count / PER_HELPER {
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--ignored", "--exact", "tests::soak::flood_helper", "--nocapture"])
                .env("OBSERVER_FLOOD_NETNS", format!("/run/netns/{namespace}"))
                .env("OBSERVER_FLOOD_MODE", mode)
                .env("OBSERVER_FLOOD_INDEX", index.to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("helper");
            started.push(child);
        }
        for child in &mut started {
            let stdout = child.stdout.take().unwrap();
            let ready = std::io::BufRead::lines(std::io::BufReader::new(stdout))
                .map_while(Result::ok)
                .any(|line| line.starts_with("flood-helper ready"));
            assert!(ready, "a flood helper failed");
        }
        self.0.extend(started);
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Not a test: the flood's helper process (see [`Helpers`]); does nothing unless
/// started by [`socket_flood`].
#[test]
#[ignore = "helper of socket_flood"]
fn flood_helper() {
    let Some(netns) = std::env::var_os("OBSERVER_FLOOD_NETNS") else { return };
    let mode = std::env::var("OBSERVER_FLOOD_MODE").unwrap();
    let index: usize = std::env::var("OBSERVER_FLOOD_INDEX").unwrap().parse().unwrap();
    let namespace = std::fs::File::open(netns).unwrap();
    nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let mut sockets: Vec<OwnedFd> = Vec::with_capacity(PER_HELPER);
    for i in 0..PER_HELPER {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        if mode == "established" {
            // Left in the listener's accept queue: established on both ends, and the
            // server side holds no descriptor.
            let port = LISTEN_PORTS[(index * PER_HELPER + i) % LISTEN_PORTS.len()];
            socket.connect(&Pair::server_addr(port).into()).expect("connect");
        } else {
            socket.set_nonblocking(true).unwrap();
            let target = SocketAddr::from(([10, 77, 0, 2], 30_000 + (i % 16) as u16));
            let _ = socket.connect(&target.into()); // EINPROGRESS: SYN_SENT
        }
        sockets.push(socket.into());
    }
    println!("flood-helper ready");
    std::io::stdout().flush().unwrap();
    // Hold them until the parent closes our stdin or kills us.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
#[ignore = "benchmark: cargo xtask soak"]
fn socket_flood() {
    let pair = Pair::new();
    for namespace in [&pair.client, &pair.server] {
        namespace.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    }
    pair.server.sysctl("net.ipv4.tcp_max_syn_backlog", "65536");
    pair.server.sysctl("net.core.somaxconn", "65536");
    let only = ["--debug.only-netns".to_string(), pair.client.inode().to_string()];
    let default = Daemon::start("flood-default", &only);
    let mut capped_args = only.to_vec();
    capped_args.extend(["--tracker.max-sockets".to_string(), CAPPED.to_string()]);
    let capped = Daemon::start("flood-capped", &capped_args);
    report(&format!("flood: before: {}", describe("default", &default)));
    report(&format!("flood: before: {}", describe("capped", &capped)));

    let _listeners: Vec<_> =
        LISTEN_PORTS.iter().map(|port| pair.listen_with_backlog(*port, 65_535)).collect();
    let mut helpers = Helpers(Vec::new());
    let started = Instant::now();
    helpers.start(pair.client.name(), "established", IDLE);
    report(&format!("flood: {IDLE} idle established connections in {:?}", started.elapsed()));
    // SYN_SENT to a black hole: connects that never complete.
    pair.black_hole();
    let started = Instant::now();
    helpers.start(pair.client.name(), "syn_sent", SYN_SENT);
    report(&format!("flood: {SYN_SENT} SYN_SENT sockets in {:?}", started.elapsed()));

    let total = (IDLE + SYN_SENT) as f64;
    let settled = wait_until(Duration::from_secs(60), || {
        let seen = gauge(&default, "observer_tracker_sockets");
        seen >= total - gauge(&default, "observer_events_lost_total")
    });
    report(&format!("flood: after ({settled}): {}", describe("default", &default)));
    report(&format!("flood: after: {}", describe("capped", &capped)));

    let capped_tracked = gauge(&capped, "observer_tracker_sockets") as usize;
    let evicted = capped
        .metric_sum("observer_tracker_dropped_sockets_total", &[("reason", "capacity")])
        as usize;
    let lost = gauge(&capped, "observer_events_lost_total") as usize;
    assert!(capped_tracked <= CAPPED, "{capped_tracked} tracked with a cap of {CAPPED}");
    // Every socket beyond the cap is either evicted (counted) or was never seen (lost,
    // counted): nothing vanishes silently.
    assert!(
        evicted + lost + capped_tracked >= IDLE + SYN_SENT,
        "evicted {evicted} + lost {lost} + tracked {capped_tracked} < {}",
        IDLE + SYN_SENT
    );
    let (default_rss, _) = rss_kib(default.pid);
    let (capped_rss, _) = rss_kib(capped.pid);
    assert!(capped_rss < default_rss, "the cap bounds memory: {capped_rss} vs {default_rss} KiB");
    drop(helpers);
    pair.heal();
    for daemon in [&default, &capped] {
        daemon.stop();
        daemon.wait_exit(Duration::from_secs(10));
    }
}

/// One connection: the client sends a little, closes; the server reads to the end and
/// closes; every 10th is reset by the client instead.
fn churn_once(pair: &Pair, listener: &std::net::TcpListener, port: u16, n: u64) {
    let mut client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(port))).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut buffer = [0u8; 4];
    server.read_exact(&mut buffer).unwrap();
    if n.is_multiple_of(10) {
        crate::sock::set_linger_zero(&client);
    }
    drop(client);
    // To the FIN, or the RST (an error here).
    let _ = server.read_to_end(&mut Vec::new());
    drop(server);
}

#[test]
#[ignore = "benchmark: cargo xtask soak"]
fn steady_churn() {
    let seconds: u64 = std::env::var("OBSERVER_SOAK_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1800);
    let per_second: u64 = 200;
    let pair = Pair::new();
    pair.client.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let only = ["--debug.only-netns".to_string(), pair.client.inode().to_string()];
    let daemon = Daemon::start("soak", &only);
    let port = 20_101;
    let listener = pair.listen_with_backlog(port, 4096);
    report(&format!(
        "soak: {seconds} s at {per_second} connections/s; minute, {}",
        describe("daemon", &daemon)
    ));
    let started = Instant::now();
    let mut made = 0u64;
    let mut samples = Vec::new();
    let mut next_sample = Duration::from_secs(60);
    while started.elapsed() < Duration::from_secs(seconds) {
        // Paced: `per_second` connections in each second, then wait for the next.
        let due = (started.elapsed().as_millis() as u64 * per_second) / 1000;
        while made < due {
            churn_once(&pair, &listener, port, made);
            made += 1;
        }
        if started.elapsed() >= next_sample {
            let (rss, _) = rss_kib(daemon.pid);
            let tracked = gauge(&daemon, "observer_tracker_sockets");
            samples.push((rss, tracked));
            report(&format!(
                "soak: minute {:>3}: {made} connections, {}",
                next_sample.as_secs() / 60,
                describe("daemon", &daemon)
            ));
            next_sample += Duration::from_secs(60);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let judged = || daemon.metric_sum("observer_tcp_closes_total", &[("role", "client")]);
    wait_until(Duration::from_secs(10), || judged() as u64 >= made);
    let closes = judged();
    report(&format!("soak: done: {made} connections, {closes} client verdicts"));
    assert!(samples.len() >= 2, "run at least two minutes for a trend");
    // Flat: after the first sample (warm-up), RSS grows by less than 10 % and the
    // tracked sockets stay within the few seconds of TIME_WAIT-free churn in flight.
    let (first_rss, _) = samples[0];
    let (last_rss, _) = *samples.last().unwrap();
    let max_tracked = samples.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    report(&format!(
        "soak: rss first {first_rss} KiB, last {last_rss} KiB; tracked at most {max_tracked}"
    ));
    assert!(last_rss * 10 <= first_rss * 11, "RSS grew: {first_rss} -> {last_rss} KiB");
    assert!(max_tracked < 1000.0, "tracked sockets grow: {max_tracked}");
    assert_eq!(closes as u64, made, "every client connection judged");
    daemon.stop();
    daemon.wait_exit(Duration::from_secs(10));
}
