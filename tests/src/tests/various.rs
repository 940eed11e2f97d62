//! Other endings (killed, cancelled, unreachable), socket gauges, address families.

use std::{
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use super::{Mib, assert_verdict};
use crate::{
    daemon::{daemon, wait_until},
    net::{ABSENT_V4, CLIENT_V6, DEVICE, Pair, SERVER_V4, SERVER_V6},
    sock,
};

/// `ss -K` kills the socket (SOCK_DESTROY): ECONNABORTED, and an RST to the peer.
#[test]
fn killed_with_ss() {
    let pair = Pair::new();
    let client_mib = Mib::snapshot(&pair.client);
    let (client, server) = pair.connect(7301);
    pair.client.exec(&["ss", "-K", "dst", &SERVER_V4.to_string(), "dport", "=", ":7301"]);
    let verdict = daemon().verdict(&pair.client);
    assert_verdict(&verdict, "client", "other", "killed");
    assert_eq!(verdict.sk_err, libc::ECONNABORTED);
    assert_verdict(&daemon().verdict(&pair.server), "server", "rst", "received");
    client_mib.assert_deltas(&[("TcpOutRsts", 1), ("TcpEstabResets", 1)]);
    drop((client, server));
}

/// close() while the SYN is still unanswered.
#[test]
fn cancelled_connect() {
    let pair = Pair::new();
    let _listener = pair.listen(7302);
    pair.black_hole();
    let client_mib = Mib::snapshot(&pair.client);
    let socket = pair.client.enter(|| Socket::new(Domain::IPV4, Type::STREAM, None)).unwrap();
    socket.set_nonblocking(true).unwrap();
    let error = socket.connect(&Pair::server_addr(7302).into()).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EINPROGRESS));
    assert_eq!(pair.client.socket_states("dport = :7302"), ["SYN-SENT"]);
    drop(socket);
    let verdict = daemon().verdict(&pair.client);
    assert_verdict(&verdict, "client", "other", "cancelled");
    // The kernel does not count a connect abandoned by close() as a failed attempt.
    client_mib.assert_deltas(&[("TcpAttemptFails", 0), ("TcpExtTCPAbortOnTimeout", 0)]);
}

/// connect() to an address nobody answers ARP for: host unreachable.
#[test]
fn unreachable_host() {
    let pair = Pair::new();
    for (key, value) in [("mcast_solicit", "1"), ("retrans_time_ms", "100")] {
        pair.client.sysctl(&format!("net.ipv4.neigh.{DEVICE}.{key}"), value);
    }
    let client_mib = Mib::snapshot(&pair.client);
    let error = pair.client.enter(|| TcpStream::connect((ABSENT_V4, 7303))).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EHOSTUNREACH));
    let verdict = daemon().verdict(&pair.client);
    assert_verdict(&verdict, "client", "other", "unreachable");
    assert_eq!(verdict.detail.as_deref(), Some("EHOSTUNREACH"));
    client_mib.assert_deltas(&[("TcpAttemptFails", 1), ("TcpExtTCPAbortOnTimeout", 0)]);
}

/// Peers close, the application never does: sockets pile up in CLOSE_WAIT.
#[test]
fn close_wait_leak() {
    const LEAKS: usize = 5;
    let pair = Pair::new();
    let gauge = || daemon().metric_sum("observer_tcp_sockets", &[("state", "close_wait")]);
    let before = gauge();
    let mut leaked = Vec::new();
    for _ in 0..LEAKS {
        let (client, server) = pair.connect(7304);
        drop(server);
        leaked.push(client);
    }
    let risen = wait_until(Duration::from_secs(10), || gauge() >= before + LEAKS as f64);
    assert!(risen, "close_wait gauge stayed at {} (before: {before})", gauge());
    for client in &leaked {
        assert_eq!(sock::tcp_state(client), sock::TCP_CLOSE_WAIT);
    }
    drop(leaked);
    let fallen = wait_until(Duration::from_secs(10), || gauge() <= before);
    assert!(fallen, "close_wait gauge stayed at {} after closing", gauge());
    let verdicts = daemon().verdicts(&pair.client, LEAKS);
    assert!(verdicts.iter().all(|v| v.verdict() == ("fin", "passive")), "{verdicts:#?}");
}

#[test]
fn ipv6() {
    let pair = Pair::new();
    let address = SocketAddr::from((SERVER_V6, 7305));
    let listener = pair.server.enter(|| TcpListener::bind(address)).unwrap();
    let client = pair.client.enter(|| TcpStream::connect(address)).unwrap();
    let (server, _) = listener.accept().unwrap();
    drop(client);
    let client_verdict = daemon().verdict(&pair.client);
    assert_verdict(&client_verdict, "client", "fin", "active");
    assert_eq!(client_verdict.family, "ipv6");
    assert_eq!(client_verdict.remote, "[fd77::2]:7305");
    assert!(client_verdict.local.starts_with(&format!("[{CLIENT_V6}]:")), "{client_verdict:#?}");
    drop(server);
    let server_verdict = daemon().verdict(&pair.server);
    assert_verdict(&server_verdict, "server", "fin", "passive");
    assert_eq!(server_verdict.local, "[fd77::2]:7305");
}

/// An IPv6 listener accepting an IPv4 client: the child is an AF_INET6 socket with
/// v4-mapped addresses.
#[test]
fn ipv4_mapped() {
    let pair = Pair::new();
    let listener = pair.server.enter(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, 7306))).unwrap();
    let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(7306))).unwrap();
    let (server, _) = listener.accept().unwrap();
    sock::set_linger_zero(&server);
    drop(server);
    let server_verdict = daemon().verdict(&pair.server);
    assert_verdict(&server_verdict, "server", "rst", "linger_zero");
    assert_eq!(server_verdict.family, "ipv6");
    assert_eq!(server_verdict.local, "[::ffff:10.77.0.2]:7306");
    let client_verdict = daemon().verdict(&pair.client);
    assert_verdict(&client_verdict, "client", "rst", "received");
    assert_eq!(client_verdict.family, "ipv4");
    drop(client);
}
