//! Live socket counts per namespace and state, against `ss -tan` in each namespace —
//! TIME_WAIT included, and sockets older than the daemon included (a restarted daemon
//! still sees an old CLOSE_WAIT leak).

use std::{
    collections::BTreeMap,
    net::TcpStream,
    time::{Duration, Instant},
};

use crate::{
    daemon::{Daemon, wait_until},
    net::{Namespace, Pair},
    sock,
};

const PORT: u16 = 7602;
const ESTABLISHED: usize = 3;
const CLOSE_WAIT: usize = 2;
const TIME_WAIT: usize = 4;

/// `ss -tan` state names → the daemon's label values.
fn label_of_ss_state(state: &str) -> &str {
    match state {
        "ESTAB" => "established",
        "SYN-SENT" => "syn_sent",
        "SYN-RECV" => "syn_recv",
        "FIN-WAIT-1" => "fin_wait1",
        "FIN-WAIT-2" => "fin_wait2",
        "TIME-WAIT" => "time_wait",
        "CLOSE-WAIT" => "close_wait",
        "LAST-ACK" => "last_ack",
        "LISTEN" => "listen",
        "CLOSING" => "closing",
        "UNCONN" => "close",
        other => panic!("unexpected ss state {other}"),
    }
}

fn ss_counts(namespace: &Namespace) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::new();
    for state in namespace.socket_states("") {
        *counts.entry(label_of_ss_state(&state).to_string()).or_default() += 1.0;
    }
    counts
}

fn daemon_counts(daemon: &Daemon, namespace: &Namespace) -> BTreeMap<String, f64> {
    let prefix = format!("observer_tcp_sockets{{netns=\"{}\",state=\"", namespace.inode());
    daemon
        .metrics()
        .into_iter()
        .filter_map(|(key, value)| {
            let state = key.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            Some((state.to_string(), value))
        })
        .collect()
}

/// Polls until the daemon's counts equal ss's in both namespaces (the inventory is
/// refreshed at each scrape), then asserts them.
fn assert_counts_match_ss(daemon: &Daemon, pair: &Pair) {
    for namespace in [&pair.client, &pair.server] {
        let mut last = (BTreeMap::new(), BTreeMap::new());
        let matched = wait_until(Duration::from_secs(10), || {
            last = (ss_counts(namespace), daemon_counts(daemon, namespace));
            last.0 == last.1
        });
        assert!(matched, "{}: ss says {:?}, observer says {:?}", namespace.name(), last.0, last.1);
    }
}

#[test]
fn state_counts_match_ss_per_namespace_also_after_a_restart() {
    let pair = Pair::new();
    let listener = pair.listen(PORT);
    let mut keep = Vec::new();
    for _ in 0..ESTABLISHED {
        let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(PORT))).unwrap();
        keep.push((client, listener.accept().unwrap().0));
    }
    // The clients close, the server never does: CLOSE_WAIT on the server (the leak),
    // FIN_WAIT2 on the client.
    let mut leaked = Vec::new();
    for _ in 0..CLOSE_WAIT {
        let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(PORT))).unwrap();
        let server = listener.accept().unwrap().0;
        drop(client);
        leaked.push(server);
    }
    // Both close, the client first: TIME_WAIT on the client.
    for _ in 0..TIME_WAIT {
        let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(PORT))).unwrap();
        let server = listener.accept().unwrap().0;
        drop(client);
        sock::read_to_end(&server);
        drop(server);
    }
    let expected_client = BTreeMap::from([
        ("established".to_string(), ESTABLISHED as f64),
        ("fin_wait2".to_string(), CLOSE_WAIT as f64),
        ("time_wait".to_string(), TIME_WAIT as f64),
    ]);
    let settled =
        wait_until(Duration::from_secs(10), || ss_counts(&pair.client) == expected_client);
    assert!(settled, "client sockets did not settle: {:?}", ss_counts(&pair.client));
    // The TIME_WAIT sockets are at least this old from here on.
    let time_wait_since = Instant::now();

    let first = Daemon::start("inventory-1", &[]);
    assert_counts_match_ss(&first, &pair);
    let leak = first
        .metric_sum("observer_tcp_close_wait_age_seconds_count", &[("port", &PORT.to_string())]);
    assert_eq!(leak, CLOSE_WAIT as f64, "CLOSE_WAIT sockets on port {PORT}");
    first.stop();

    // Sockets older than the daemon are counted by the next one from its start.
    let second_started = Instant::now();
    let second = Daemon::start("inventory-2", &[]);
    // TIME_WAIT ages are the kernel's (its timewait timer), not first-seen times: they
    // reach back before this daemon started, by the first daemon's whole life.
    let time_wait_age = second.metric_sum(
        "observer_tcp_socket_oldest_age_seconds",
        &[("netns", &pair.client.inode().to_string()), ("state", "time_wait")],
    );
    let before_start = second_started.duration_since(time_wait_since).as_secs_f64();
    assert!(
        // 50 ms: the kernel counts in jiffies.
        time_wait_age >= before_start - 0.05 && time_wait_age <= 60.0,
        "oldest TIME_WAIT age {time_wait_age} s, yet the sockets were in TIME_WAIT {before_start} \
         s before this daemon started"
    );
    assert_counts_match_ss(&second, &pair);
    let server_netns = pair.server.inode().to_string();
    let oldest = format!(
        "observer_tcp_socket_oldest_age_seconds{{netns=\"{server_netns}\",state=\"close_wait\"}}"
    );
    assert!(second.metrics().contains_key(&oldest), "{oldest} missing");
    let open: Vec<serde_json::Value> = serde_json::from_str(&second.get(&format!(
        "/connections?status=open&netns={server_netns}&state=close_wait&port={PORT}"
    )))
    .unwrap();
    assert_eq!(open.len(), CLOSE_WAIT, "open CLOSE_WAIT sockets listed: {open:#?}");
    // Older than this daemon: the role is inferred from the listener, the owner is who
    // held the socket when the daemon started (this test process).
    assert!(
        open.iter().all(|c| c["port"] == PORT
            && c["role"] == "server"
            && c["owner"]["pid"] == std::process::id()),
        "{open:#?}"
    );

    // A connection older than this daemon, reset by the peer: the kernel closes it in
    // softirq, yet the verdict names the process that held it when the daemon started.
    let (client, server) = keep.pop().unwrap();
    sock::set_linger_zero(&client);
    drop(client);
    let mut verdicts = Vec::new();
    let judged = wait_until(crate::daemon::VERDICT_TIMEOUT, || {
        let body = second.get(&format!("/connections?status=closed&netns={server_netns}"));
        verdicts = serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap();
        !verdicts.is_empty()
    });
    second.stop();
    assert!(judged, "no verdict for the reset connection");
    assert_eq!(verdicts.len(), 1, "{verdicts:#?}");
    assert_eq!((&verdicts[0]["class"], &verdicts[0]["cause"]), (&"rst".into(), &"received".into()));
    assert_eq!(verdicts[0]["owner"]["pid"], std::process::id(), "{verdicts:#?}");
    drop((server, keep, leaked, listener));
}
