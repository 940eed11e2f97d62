//! Endings by timeout: a timer gave up. The network is cut so nothing answers.

use std::{io::Write as _, net::TcpStream, time::Duration};

use super::{Mib, assert_verdict, barrier, verdicts_besides_barrier};
use crate::{
    daemon::{daemon, wait_until},
    net::Pair,
    sock,
};

/// Timers here take 2–4 s; allow for a slow machine.
const TIMER: Duration = Duration::from_secs(30);

/// Keepalive probes go unanswered after a cable cut. A second, idle connection without
/// keepalive never notices and never ends.
#[test]
fn keepalive_timeout() {
    let pair = Pair::new();
    let (client, server) = pair.connect(7201);
    let (idle_client, idle_server) = pair.connect(7202);
    sock::set_fast_keepalive(&client);
    let client_mib = Mib::snapshot(&pair.client);
    pair.cut_cable();
    let verdict = daemon().verdicts_within(&pair.client, 1, TIMER).remove(0);
    assert_verdict(&verdict, "client", "timeout", "keepalive");
    assert_eq!(verdict.sk_err, libc::ETIMEDOUT);
    assert_eq!(verdict.port, 7201);
    let after = pair.client.counters();
    assert_eq!(client_mib.before.delta(&after, "TcpExtTCPAbortOnTimeout"), 1);
    assert!(client_mib.before.delta(&after, "TcpExtTCPKeepAlive") >= 2, "keepalive probes sent");

    // The connection without keepalive is still established, with no verdict.
    pair.mend_cable();
    barrier(&pair);
    assert_eq!(verdicts_besides_barrier(&pair.client).len(), 1);
    assert_eq!(pair.client.socket_states("dport = :7202"), ["ESTAB"]);
    assert!(verdicts_besides_barrier(&pair.server).is_empty());
    drop((client, server, idle_client, idle_server));
}

/// Data sent after a cable cut is retransmitted until tcp_retries2 gives up.
#[test]
fn retransmission_timeout() {
    let pair = Pair::new();
    pair.client.sysctl("net.ipv4.tcp_retries2", "3");
    let (client, server) = pair.connect(7203);
    let client_mib = Mib::snapshot(&pair.client);
    pair.cut_cable();
    (&client).write_all(b"into the void").unwrap();
    let verdict = daemon().verdicts_within(&pair.client, 1, TIMER).remove(0);
    assert_verdict(&verdict, "client", "timeout", "retransmit");
    assert_eq!(verdict.sk_err, libc::ETIMEDOUT);
    let after = pair.client.counters();
    assert_eq!(client_mib.before.delta(&after, "TcpExtTCPAbortOnTimeout"), 1);
    assert!(client_mib.before.delta(&after, "TcpRetransSegs") >= 3);
    drop((client, server));
}

/// A SYN into a cut cable: tcp_syn_retries gives up.
#[test]
fn syn_timeout() {
    let pair = Pair::new();
    pair.client.sysctl("net.ipv4.tcp_syn_retries", "1");
    let client_mib = Mib::snapshot(&pair.client);
    pair.cut_cable();
    let error = pair.client.enter(|| TcpStream::connect(Pair::server_addr(7204))).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ETIMEDOUT));
    let verdict = daemon().verdicts_within(&pair.client, 1, TIMER).remove(0);
    assert_verdict(&verdict, "client", "timeout", "syn");
    assert_eq!(verdict.states, ["syn_sent", "close"]);
    client_mib.assert_deltas(&[("TcpExtTCPAbortOnTimeout", 1), ("TcpAttemptFails", 1)]);
}

/// The peer stops reading; its window closes; TCP_USER_TIMEOUT ends window probing.
#[test]
fn zero_window_timeout() {
    let pair = Pair::new();
    let listener = pair.listen(7205);
    sock::set_receive_buffer_listener(&listener, 4096);
    let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(7205))).unwrap();
    let (server, _) = listener.accept().unwrap();
    sock::set_user_timeout(&client, Duration::from_millis(1000));
    let client_mib = Mib::snapshot(&pair.client);
    client.set_nonblocking(true).unwrap();
    let chunk = [0u8; 65536];
    let filled = wait_until(
        TIMER,
        || matches!((&client).write(&chunk), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
    );
    assert!(filled, "send buffer never filled");
    let verdict = daemon().verdicts_within(&pair.client, 1, TIMER).remove(0);
    assert_verdict(&verdict, "client", "timeout", "zero_window");
    let after = pair.client.counters();
    assert_eq!(client_mib.before.delta(&after, "TcpExtTCPAbortOnTimeout"), 1);
    assert!(client_mib.before.delta(&after, "TcpExtTCPWinProbe") >= 1, "window probes sent");
    drop((client, server));
}

/// An orphan waits in FIN_WAIT2 for a FIN that never comes; its timer resets it.
///
/// With tcp_fin_timeout above 60 s the orphan stays a full socket in FIN_WAIT2 (below,
/// it becomes an invisible timewait socket); lowering it once the timer is armed makes
/// the timer give up with an RST at its next run.
#[test]
fn fin_wait2_timeout() {
    let pair = Pair::new();
    pair.client.sysctl("net.ipv4.tcp_fin_timeout", "62");
    let (client, server) = pair.connect(7206);
    let client_mib = Mib::snapshot(&pair.client);
    drop(client);
    let orphaned =
        wait_until(TIMER, || pair.client.socket_states("dport = :7206") == ["FIN-WAIT-2"]);
    assert!(orphaned, "client never reached FIN_WAIT2");
    pair.client.sysctl("net.ipv4.tcp_fin_timeout", "30");
    let verdict = daemon().verdicts_within(&pair.client, 1, TIMER).remove(0);
    assert_verdict(&verdict, "client", "timeout", "fin_wait2");
    assert_verdict(&daemon().verdict(&pair.server), "server", "rst", "received");
    client_mib.assert_deltas(&[("TcpOutRsts", 1)]);
    drop(server);
}
