//! Endings by RST, sent or received, and why.

use std::{
    io::Write as _,
    net::{Shutdown, TcpStream},
    time::Duration,
};

use super::{Mib, assert_verdict};
use crate::{
    daemon::{daemon, wait_until},
    net::Pair,
    sock,
};

/// close() with data the application never read: the kernel resets (RFC 2525).
#[test]
fn unread_data() {
    let pair = Pair::new();
    let server_mib = Mib::snapshot(&pair.server);
    let (client, server) = pair.connect(7101);
    (&client).write_all(&[7; 100]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || sock::unread_bytes(&server) == 100));
    drop(server);
    assert_verdict(&daemon().verdict(&pair.server), "server", "rst", "unread_data");
    assert_verdict(&daemon().verdict(&pair.client), "client", "rst", "received");
    server_mib.assert_deltas(&[("TcpExtTCPAbortOnClose", 1), ("TcpOutRsts", 1)]);
}

#[test]
fn linger_zero() {
    let pair = Pair::new();
    let client_mib = Mib::snapshot(&pair.client);
    let (client, server) = pair.connect(7102);
    sock::set_linger_zero(&client);
    drop(client);
    assert_verdict(&daemon().verdict(&pair.client), "client", "rst", "linger_zero");
    let server_verdict = daemon().verdict(&pair.server);
    assert_verdict(&server_verdict, "server", "rst", "received");
    assert_eq!(server_verdict.sk_err, libc::ECONNRESET);
    // SO_LINGER 0 counts as TCPAbortOnData, not TCPAbortOnLinger (that is TCP_LINGER2).
    client_mib.assert_deltas(&[
        ("TcpExtTCPAbortOnData", 1),
        ("TcpExtTCPAbortOnLinger", 0),
        ("TcpOutRsts", 1),
    ]);
    drop(server);
}

/// The peer closed; we write anyway and its timewait socket answers RST.
#[test]
fn write_after_peer_closed() {
    let pair = Pair::new();
    let client_mib = Mib::snapshot(&pair.client);
    let (client, server) = pair.connect(7103);
    drop(server);
    assert_verdict(&daemon().verdict(&pair.server), "server", "fin", "active");
    assert!(wait_until(Duration::from_secs(5), || sock::tcp_state(&client) == sock::TCP_CLOSE_WAIT));
    (&client).write_all(b"too late").unwrap();
    let client_verdict = daemon().verdict(&pair.client);
    assert_verdict(&client_verdict, "client", "rst", "received");
    assert_eq!(client_verdict.sk_err, libc::EPIPE, "RST in CLOSE_WAIT reports EPIPE");
    client_mib.assert_deltas(&[("TcpEstabResets", 1)]);
}

#[test]
fn connection_refused() {
    let pair = Pair::new();
    let (client_mib, server_mib) = (Mib::snapshot(&pair.client), Mib::snapshot(&pair.server));
    let error = pair.client.enter(|| TcpStream::connect(Pair::server_addr(7104))).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    let verdict = daemon().verdict(&pair.client);
    assert_verdict(&verdict, "client", "rst", "refused");
    assert_eq!(verdict.port, 7104);
    client_mib.assert_deltas(&[("TcpAttemptFails", 1)]);
    server_mib.assert_deltas(&[("TcpOutRsts", 1)]);
    // No socket on the server side: nothing to judge there.
    assert!(daemon().connections(&pair.server).is_empty());
}

/// An established child in the accept queue when its listener closes.
#[test]
fn listener_closed() {
    let pair = Pair::new();
    let server_mib = Mib::snapshot(&pair.server);
    let listener = pair.listen(7105);
    let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(7105))).unwrap();
    drop(listener);
    let server_verdict = daemon().verdict(&pair.server);
    assert_verdict(&server_verdict, "server", "rst", "listener_closed");
    assert_verdict(&daemon().verdict(&pair.client), "client", "rst", "received");
    server_mib.assert_deltas(&[("TcpEstabResets", 1), ("TcpOutRsts", 1)]);
    drop(client);
}

/// connect(AF_UNSPEC) on a connected socket.
#[test]
fn disconnect() {
    let pair = Pair::new();
    let client_mib = Mib::snapshot(&pair.client);
    let (client, server) = pair.connect(7106);
    sock::disconnect(&client);
    assert_verdict(&daemon().verdict(&pair.client), "client", "rst", "disconnect");
    assert_verdict(&daemon().verdict(&pair.server), "server", "rst", "received");
    client_mib.assert_deltas(&[("TcpOutRsts", 1), ("TcpExtTCPAbortOnData", 0)]);
    drop((client, server));
}

/// close() in FIN_WAIT2 with TCP_LINGER2 < 0.
#[test]
fn linger2() {
    let pair = Pair::new();
    let client_mib = Mib::snapshot(&pair.client);
    let (client, server) = pair.connect(7107);
    sock::set_linger2(&client, -1);
    client.shutdown(Shutdown::Write).unwrap();
    assert!(wait_until(Duration::from_secs(5), || sock::tcp_state(&client) == sock::TCP_FIN_WAIT2));
    drop(client);
    assert_verdict(&daemon().verdict(&pair.client), "client", "rst", "linger2");
    assert_verdict(&daemon().verdict(&pair.server), "server", "rst", "received");
    client_mib.assert_deltas(&[("TcpExtTCPAbortOnLinger", 1)]);
    drop(server);
}

/// Data arrives after we closed: the kernel resets the connection.
///
/// The client's data and the server's FIN are both lost in a black hole, then
/// retransmitted together: the data reaches the server after its close().
#[test]
fn data_after_close() {
    let pair = Pair::new();
    let server_mib = Mib::snapshot(&pair.server);
    let (client, server) = pair.connect(7108);
    pair.black_hole();
    (&client).write_all(b"late request").unwrap();
    drop(server);
    pair.heal();
    assert_verdict(&daemon().verdict(&pair.server), "server", "rst", "data_after_close");
    assert_verdict(&daemon().verdict(&pair.client), "client", "rst", "received");
    server_mib.assert_deltas(&[("TcpExtTCPAbortOnData", 1)]);
    drop(client);
}

/// The server host restarts while the link is down; the client, unaware, sends and gets
/// an RST from the new server, which knows nothing of the connection.
#[test]
fn server_restart() {
    let pair = Pair::new();
    let (client, server) = pair.connect(7109);
    // The old server process dies with the cable out, then its orphaned socket gives up.
    pair.server.sysctl("net.ipv4.tcp_orphan_retries", "1");
    pair.cut_cable();
    let mut holder = sock::give_to_process(server);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let old_server = daemon().verdicts_within(&pair.server, 1, Duration::from_secs(30)).remove(0);
    assert_eq!(old_server.class, "timeout", "{old_server:#?}");
    // The new server process listens on the same port; the cable comes back.
    let listener = pair.listen(7109);
    pair.mend_cable();
    let client_mib = Mib::snapshot(&pair.client);
    (&client).write_all(b"hello again").unwrap();
    let client_verdict = daemon().verdict(&pair.client);
    assert_verdict(&client_verdict, "client", "rst", "received");
    assert_eq!(client_verdict.sk_err, libc::ECONNRESET);
    client_mib.assert_deltas(&[("TcpEstabResets", 1)]);
    drop(listener);
}
