//! Hostile workloads: clients of the HTTP side cannot blind the capture or lock a scraper
//! out — many `/connections` listers during a connection storm, floods of idle and slow
//! connections under a small open-file limit, and query strings nobody should send.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    daemon::{Daemon, binary, latency_budget, rss_kib, wait_until},
    net::Namespace,
};

/// Raises this test process's soft open-file limit to its hard one: the floods below
/// hold thousands of sockets.
fn raise_open_files() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

fn web_address(daemon: &Daemon) -> SocketAddr {
    daemon.base_url.trim_start_matches("http://").parse().expect("host:port")
}

/// How long a fresh client takes to get `/metrics`, or `None` if it failed.
fn scrape(daemon: &Daemon, timeout: Duration) -> Option<Duration> {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(timeout)).build().into();
    let started = Instant::now();
    let mut response = agent.get(&format!("{}/metrics", daemon.base_url)).call().ok()?;
    response.body_mut().read_to_string().ok()?;
    Some(started.elapsed())
}

/// Asserts that a fresh client gets `/metrics` within 2 s (scaled under emulation);
/// returns how long it took.
fn assert_scrapes(daemon: &Daemon, during: &str) -> Duration {
    let budget = latency_budget(Duration::from_secs(2));
    let took = scrape(daemon, budget);
    assert!(took.is_some(), "no scrape within {budget:?} {during}\n{}", daemon.log_tail());
    took.unwrap_or_default()
}

/// Opens and closes connections to `ports` as fast as it can until `stop`, the client
/// closing first (so each leaves a TIME_WAIT socket); returns how many it made.
fn churn(ports: &[u16], stop: &AtomicBool, at_most: u64) -> u64 {
    let listeners: Vec<TcpListener> = ports
        .iter()
        .map(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).expect("listen"))
        .collect();
    let mut made = 0;
    while !stop.load(Ordering::Relaxed) && made < at_most {
        let index = (made as usize) % listeners.len();
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST, ports[index])).expect("connect");
        let (mut server, _) = listeners[index].accept().expect("accept");
        drop(client);
        let _ = server.read(&mut [0; 1]);
        drop(server);
        made += 1;
    }
    made
}

/// 16 clients listing `/connections` as fast as they can, on a host holding 30 000
/// TIME_WAIT sockets, while a loopback storm runs: the capture loses nothing and accounts
/// for every close (a verdict, or a counted drop), and a scrape still answers within 2 s
/// throughout.
#[test]
fn connection_listers_cannot_blind_the_capture() {
    const TIME_WAIT: u64 = 30_000;
    const LISTERS: usize = 16;
    const STORM: Duration = Duration::from_secs(8);
    let namespace = Namespace::create(format!("obs{}-listers", std::process::id()));
    // Start and end of different parity: 7.x kernels warn otherwise (connect() takes
    // even ports, bind() odd ones).
    namespace.sysctl("net.ipv4.ip_local_port_range", "10000 64999");
    namespace.sysctl("net.ipv4.tcp_max_tw_buckets", "262144");
    let daemon = Daemon::start(
        "listers",
        &["--debug.only-netns".to_string(), namespace.inode().to_string()],
    );
    let storm_ports: Vec<u16> = (7601..7609).collect();
    let never = AtomicBool::new(false);
    // TIME_WAIT lasts 60 s: under emulation, making 30 000 takes long enough for the
    // first ones to expire, so top up until the namespace holds enough.
    let park = |count| namespace.enter(|| churn(&[7590, 7591, 7592, 7593], &never, count));
    let mut parked = park(TIME_WAIT + 2_000);
    let mut time_wait = namespace.socket_states("state time-wait").len() as u64;
    while time_wait < TIME_WAIT && parked < 3 * TIME_WAIT {
        parked += park(TIME_WAIT - time_wait + 2_000);
        time_wait = namespace.socket_states("state time-wait").len() as u64;
    }
    assert!(time_wait >= TIME_WAIT, "only {time_wait} TIME_WAIT sockets after {parked}");
    // The storm reuses its own TIME_WAIT ports, not to run out of them.
    namespace.sysctl("net.ipv4.tcp_tw_reuse", "1");

    let stop = Arc::new(AtomicBool::new(false));
    let listed = Arc::new(AtomicU64::new(0));
    let listers: Vec<_> = (0..LISTERS)
        .map(|_| {
            let (stop, listed, url) = (
                Arc::clone(&stop),
                Arc::clone(&listed),
                format!("{}/connections", daemon.base_url),
            );
            std::thread::spawn(move || {
                let agent = ureq::Agent::new_with_defaults();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut response) = agent.get(&url).call()
                        && response.body_mut().read_to_string().is_ok()
                    {
                        listed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let storm_stop = Arc::new(AtomicBool::new(false));
    let storms: Vec<_> = (0..2)
        .map(|worker| {
            let ports = storm_ports[worker * 4..worker * 4 + 4].to_vec();
            let stop = Arc::clone(&storm_stop);
            namespace.enter(|| std::thread::spawn(move || churn(&ports, &stop, u64::MAX)))
        })
        .collect();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < STORM {
        slowest = slowest.max(assert_scrapes(&daemon, "during the storm"));
        std::thread::sleep(Duration::from_millis(250));
    }
    storm_stop.store(true, Ordering::Relaxed);
    let stormed: u64 = storms.into_iter().map(|storm| storm.join().expect("storm")).sum();
    stop.store(true, Ordering::Relaxed);
    listers.into_iter().for_each(|lister| lister.join().expect("lister"));

    // Both ends of every connection close, each with its verdict — or, for a socket the
    // tracker had to give up (its final event came out of order), a counted drop.
    let expected = 2.0 * (parked + stormed) as f64;
    let closes = || daemon.metric_sum("observer_tcp_closes_total", &[]);
    let dropped = || daemon.metric_sum("observer_tracker_dropped_sockets_total", &[]);
    wait_until(Duration::from_secs(30), || closes() + dropped() >= expected);
    let lost = daemon.metric_sum("observer_events_lost_total", &[]);
    let (_, rss) = rss_kib(daemon.pid);
    eprintln!(
        "{LISTERS} listers answered {} times over {time_wait} TIME_WAIT sockets while {stormed} \
         connections churned in {STORM:?}; slowest scrape {slowest:?}; {} of {expected} closes \
         counted, {} sockets dropped, {lost} events lost; peak RSS {} MiB",
        listed.load(Ordering::Relaxed),
        closes(),
        dropped(),
        rss / 1024
    );
    assert_eq!(lost, 0.0, "events lost\n{}", daemon.log_tail());
    assert_eq!(closes() + dropped(), expected, "closes counted\n{}", daemon.log_tail());
    assert!(listed.load(Ordering::Relaxed) > LISTERS as u64, "the listers got no answers");
    assert!(rss < 256 * 1024, "peak RSS {rss} KiB");
    daemon.stop();
}

/// A wrapper that starts the daemon under an open-file limit of 1 024, soft and hard, as
/// a systemd service without `LimitNOFILE` would get for its soft limit.
fn under_open_file_limit() -> PathBuf {
    let wrapper = std::env::temp_dir().join(format!("observer-nofile-{}", std::process::id()));
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nulimit -n 1024\nexec {} \"$@\"\n", binary().display()),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod wrapper");
    wrapper
}

/// 2 000 idle connections and 200 that send a byte of a request head every 2 s, against
/// a daemon limited to 1 024 open files: a scrape still answers within 2 s, and every one
/// of those connections is closed by the daemon once the header timeout has passed.
#[test]
fn idle_and_slow_connections_cannot_lock_a_scraper_out() {
    raise_open_files();
    let daemon = Daemon::start_binary(&under_open_file_limit(), "idle-flood", &[]);
    let address = web_address(&daemon);
    let idle: Vec<TcpStream> = (0..2000).filter_map(|_| TcpStream::connect(address).ok()).collect();
    let mut slow: Vec<TcpStream> =
        (0..200).filter_map(|_| TcpStream::connect(address).ok()).collect();
    let opened = Instant::now();
    let mut scrapes = Vec::new();
    while opened.elapsed() < Duration::from_secs(8) {
        for stream in &mut slow {
            let _ = stream.write_all(b"G");
        }
        scrapes.push(assert_scrapes(&daemon, "among idle connections"));
        std::thread::sleep(Duration::from_secs(2));
    }
    let closed = |stream: &TcpStream| {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        matches!((&*stream).read(&mut [0; 64]), Ok(0) | Err(_))
    };
    let idle_closed = idle.iter().filter(|stream| closed(stream)).count();
    let slow_closed = slow.iter().filter(|stream| closed(stream)).count();
    eprintln!(
        "{} idle and {} slow connections: scrapes took {:?} at most; closed by the daemon: \
         {idle_closed} idle, {slow_closed} slow",
        idle.len(),
        slow.len(),
        scrapes.iter().max()
    );
    assert_eq!((idle_closed, slow_closed), (idle.len(), slow.len()));
    assert!(daemon.get("/healthz").starts_with("ok"));
    daemon.stop();
}

/// Random query strings: duplicated, unknown and huge keys and values are answered 200 or
/// 400, never anything else, and an unknown key is refused rather than ignored.
#[test]
fn any_query_string_gets_200_or_400() {
    let daemon = Daemon::start("queries", &[]);
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let status = |query: &str| {
        agent
            .get(&format!("{}/connections?{query}", daemon.base_url))
            .call()
            .map(|response| response.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(status("port=80&limit=5"), 200);
    assert_eq!(status("prot=80"), 400, "a typo must not list everything");
    assert_eq!(status("port=80&port=81"), 400);
    assert_eq!(status("limit=10001"), 400);
    let keys = ["status", "state", "after", "port", "netns", "pid", "class", "cause", "limit", "x"];
    let values = [
        "",
        "0",
        "-1",
        "80",
        "65536",
        "open",
        "closed",
        "fin",
        "%00",
        "%FF%FE",
        "9999999999999999999999",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for _ in 0..300 {
        let pairs: Vec<String> = (0..next(4))
            .map(|_| {
                let value = if next(10) == 0 {
                    "9".repeat(4000)
                } else {
                    values[next(values.len())].to_string()
                };
                format!("{}={value}", keys[next(keys.len())])
            })
            .collect();
        let query = pairs.join("&");
        let code = status(&query);
        assert!(code == 200 || code == 400, "{code} for {query:.200}");
    }
    daemon.stop();
}
