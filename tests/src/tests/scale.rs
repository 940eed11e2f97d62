//! Many connections at once: every one counted, no event lost.

use std::{
    io::Write as _,
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use super::Mib;
use crate::{
    daemon::{daemon, wait_until},
    net::Pair,
    sock,
};

pub(super) const CONNECTIONS: usize = 1000;
const CLIENT_THREADS: usize = 8;
const PORT: u16 = 7401;

/// Opens and closes `CONNECTIONS` connections to `port` from 8 threads at once; each
/// client sends 4 bytes and closes, the server reads to EOF and closes. The accept queue
/// can hold them all: clients do not wait for the server, and an overflowing queue makes
/// the kernel drop handshakes (a different scenario).
pub(super) fn burst(pair: &Pair, port: u16) -> Duration {
    let listener = pair.listen_with_backlog(port, CONNECTIONS as i32);
    let started = Instant::now();
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (stream, _) = listener.accept().expect("accept");
            sock::read_to_end(&stream);
        }
    });
    thread::scope(|scope| {
        for _ in 0..CLIENT_THREADS {
            scope.spawn(|| {
                pair.client.enter(|| {
                    for _ in 0..CONNECTIONS / CLIENT_THREADS {
                        let mut stream =
                            TcpStream::connect(Pair::server_addr(port)).expect("connect");
                        stream.write_all(b"ping").expect("write");
                    }
                })
            });
        }
    });
    server.join().unwrap();
    started.elapsed()
}

#[test]
fn burst_of_1000_connections() {
    let pair = Pair::new();
    let (client_mib, server_mib) = (Mib::snapshot(&pair.client), Mib::snapshot(&pair.server));
    let lost_before = daemon().metric_sum("observer_events_lost_total", &[]);
    let events_before = daemon().metric_sum("observer_events_total", &[]);
    let elapsed = burst(&pair, PORT);

    let count = |role: &str, cause: &str| {
        daemon().metric_sum(
            "observer_tcp_closes_total",
            &[("port", &PORT.to_string()), ("role", role), ("cause", cause)],
        ) as usize
    };
    let all_counted = wait_until(Duration::from_secs(30), || {
        count("client", "active") == CONNECTIONS && count("server", "passive") == CONNECTIONS
    });
    let total = daemon().metric_sum("observer_tcp_closes_total", &[("port", &PORT.to_string())]);
    assert!(
        all_counted,
        "client active: {}, server passive: {}, all verdicts on the port: {total}; \
         events lost: {}, sockets dropped: {}\ndaemon log:\n{}",
        count("client", "active"),
        count("server", "passive"),
        daemon().metric_sum("observer_events_lost_total", &[]) - lost_before,
        daemon().metric_sum("observer_tracker_dropped_sockets_total", &[]),
        daemon().log_tail(),
    );
    assert_eq!(
        total as usize,
        2 * CONNECTIONS,
        "no other verdict on the port: {:#?}",
        daemon()
            .metrics()
            .into_iter()
            .filter(|(key, _)| key.contains(&format!("port=\"{PORT}\"")))
            .collect::<Vec<_>>()
    );
    client_mib.assert_deltas(&[("TcpActiveOpens", CONNECTIONS as i64)]);
    server_mib
        .assert_deltas(&[("TcpPassiveOpens", CONNECTIONS as i64), ("TcpExtListenOverflows", 0)]);
    let lost = daemon().metric_sum("observer_events_lost_total", &[]) - lost_before;
    let events = daemon().metric_sum("observer_events_total", &[]) - events_before;
    eprintln!("burst: {CONNECTIONS} connections in {elapsed:?}, {events} events, {lost} lost");
    assert_eq!(lost, 0.0, "events lost during the burst");
    assert!(events >= (10 * CONNECTIONS) as f64, "at least 5 transitions per endpoint");
}
