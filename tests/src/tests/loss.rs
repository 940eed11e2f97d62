//! Loss is always visible: a ring buffer far too small for a connection storm loses
//! events, and the daemon accounts for every one of them exactly, survives, and recovers.

use std::{net::TcpStream, time::Duration};

use super::scale::{CONNECTIONS, burst};
use crate::{
    daemon::{Daemon, wait_until},
    net::Pair,
    sock,
};

const PORT: u16 = 7402;
const RECOVERY_PORT: u16 = 7403;

/// State transitions of one client connection that closes first, gracefully:
/// CLOSE→SYN_SENT→ESTABLISHED→FIN_WAIT1→FIN_WAIT2 (or CLOSING)→CLOSE (TIME_WAIT is a
/// separate mini-socket the tracepoint does not show). No RST on this path.
const CLIENT_TRANSITIONS: usize = 5;

fn seen(daemon: &Daemon) -> f64 {
    daemon.metric_sum("observer_events_total", &[])
}

fn lost(daemon: &Daemon, reason: Option<&str>) -> f64 {
    match reason {
        Some(reason) => daemon.metric_sum("observer_events_lost_total", &[("reason", reason)]),
        None => daemon.metric_sum("observer_events_lost_total", &[]),
    }
}

/// What a daemon counted, by kind, for a failure message.
fn breakdown(daemon: &Daemon) -> String {
    let mut lines: Vec<String> = daemon
        .metrics()
        .into_iter()
        .filter(|(key, _)| {
            [
                "observer_events",
                "observer_tcp_transitions_total",
                "observer_tcp_resets_total",
                "observer_tracker",
            ]
            .iter()
            .any(|name| key.starts_with(name))
        })
        .map(|(key, value)| format!("{key} {value}"))
        .collect();
    lines.sort();
    lines.join(", ")
}

/// Events produced in the client namespace are known exactly: the namespace is new, both
/// daemons only record that namespace (`--debug.only-netns`), and every connection makes
/// the same five transitions there. A reference daemon with the default ring confirms the
/// count; the daemon with a 4 KiB ring must show `seen + lost` equal to it, not a guess.
#[test]
fn tiny_ring_accounts_for_every_event() {
    let pair = Pair::new();
    let only = ["--debug.only-netns".to_string(), pair.client.inode().to_string()];
    let reference = Daemon::start("loss-reference", &only);
    let mut args = only.to_vec();
    args.extend(["--bpf.ring-buffer-bytes".to_string(), "4096".to_string()]);
    let tiny = Daemon::start("loss-tiny", &args);

    let elapsed = burst(&pair, PORT);
    let produced = (CONNECTIONS * CLIENT_TRANSITIONS) as f64;
    let settled = |daemon: &Daemon| {
        wait_until(Duration::from_secs(30), || seen(daemon) + lost(daemon, None) >= produced)
    };
    assert!(settled(&reference), "reference saw {} of {produced}", seen(&reference));
    assert_eq!(
        (seen(&reference), lost(&reference, None)),
        (produced, 0.0),
        "the reference daemon must see every transition\nreference: {}\n{}",
        breakdown(&reference),
        reference.log_tail()
    );
    settled(&tiny);
    let (tiny_seen, ring_full, nested, malformed) = (
        seen(&tiny),
        lost(&tiny, Some("ring_full")),
        lost(&tiny, Some("nested")),
        lost(&tiny, Some("malformed")),
    );
    eprintln!(
        "tiny ring: {CONNECTIONS} connections in {elapsed:?}: produced {produced}, seen \
         {tiny_seen}, lost {ring_full} (ring full) + {nested} (nested) + {malformed} (malformed)"
    );
    assert!(ring_full > 0.0, "a 4 KiB ring lost nothing in a storm? seen {tiny_seen}");
    assert_eq!(
        tiny_seen + ring_full + nested + malformed,
        produced,
        "seen + lost must equal produced\nreference now: {}\ntiny now: {}\n{}",
        breakdown(&reference),
        breakdown(&tiny),
        tiny.log_tail()
    );

    // It survives and recovers: a later connection gets its verdict, and the books
    // still balance.
    let listener = pair.listen(RECOVERY_PORT);
    let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(RECOVERY_PORT)));
    let (server, _) = listener.accept().unwrap();
    drop(client.unwrap());
    sock::read_to_end(&server);
    drop(server);
    let judged = wait_until(Duration::from_secs(20), || {
        tiny.get("/connections?status=closed&port=7403").contains("\"cause\":\"active\"")
    });
    assert!(judged, "no verdict after the storm:\n{}", tiny.log_tail());
    let after = produced + CLIENT_TRANSITIONS as f64;
    wait_until(Duration::from_secs(10), || seen(&tiny) + lost(&tiny, None) >= after);
    assert_eq!(seen(&tiny) + lost(&tiny, None), after);
    assert!(tiny.get("/healthz").starts_with("ok"));

    for daemon in [&tiny, &reference] {
        daemon.stop();
        assert!(daemon.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
    }
    let log = std::fs::read_to_string(&tiny.log).unwrap();
    assert!(log.contains("ring buffer full"), "no warning in the log:\n{log}");
}

/// The `/connections` buffer keeps the newest `--connections.max-recent` verdicts and
/// counts the ones it pushed out.
#[test]
fn recent_buffer_overflow_is_counted() {
    let pair = Pair::new();
    let daemon = Daemon::start(
        "recent-overflow",
        &[
            "--debug.only-netns".to_string(),
            pair.client.inode().to_string(),
            "--connections.max-recent".to_string(),
            "2".to_string(),
        ],
    );
    let listener = pair.listen(7404);
    for _ in 0..3 {
        let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(7404))).unwrap();
        let (server, _) = listener.accept().unwrap();
        sock::set_linger_zero(&client);
        drop((client, server));
    }
    let judged = wait_until(Duration::from_secs(20), || {
        daemon.metric_sum("observer_tcp_closes_total", &[("port", "7404")]) >= 3.0
    });
    assert!(judged, "{}", daemon.log_tail());
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&daemon.get("/connections?status=closed")).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(daemon.metric_sum("observer_connections_evicted_total", &[]), 1.0);
    daemon.stop();
}
