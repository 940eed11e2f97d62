//! Who owns each socket: the process named in every verdict, on both sides of a
//! connection, including closes the kernel makes in softirq or a timer (a peer's RST, a
//! retransmission timeout) on behalf of whichever task it interrupted.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use crate::{
    actor::Actor,
    daemon::{Connection, daemon},
    net::{Pair, SERVER_V4},
    sock,
};

const PORT: u16 = 7601;

#[test]
fn every_verdict_names_the_owning_process_on_both_sides() {
    let pair = Pair::new();
    let mut server = Actor::spawn("obs-server", &pair.server, |cue| {
        let listener = TcpListener::bind((SERVER_V4, PORT)).expect("bind");
        cue.ready();
        // 1: the client closes first; we read to the end and close (passive FIN).
        let (first, _) = listener.accept().expect("accept");
        sock::read_to_end(&first);
        drop(first);
        // 2: we reset it (SO_LINGER {1, 0}); the client receives the RST in softirq.
        let (second, _) = listener.accept().expect("accept");
        sock::set_linger_zero(&second);
        drop(second);
        // 3: held open while the client times out, then reset too.
        let (third, _) = listener.accept().expect("accept");
        cue.ready();
        cue.wait();
        sock::set_linger_zero(&third);
        drop(third);
    });
    server.until_ready();

    let mut client = Actor::spawn("obs-client", &pair.client, |cue| {
        let mut first = TcpStream::connect((SERVER_V4, PORT)).expect("connect");
        first.write_all(b"hello").expect("write");
        drop(first);
        let mut buffer = [0u8; 16];
        // The server resets this one as soon as it has accepted it. When this process is
        // slow to run again after the handshake (seen in the 6.1 guest under emulation),
        // the RST is in before connect() returns, and connect() reports it.
        let reset = match TcpStream::connect((SERVER_V4, PORT)) {
            Ok(mut second) => second.read(&mut buffer).expect_err("the server resets"),
            Err(error) => error,
        };
        assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset, "{reset}");
        let mut third = TcpStream::connect((SERVER_V4, PORT)).expect("connect");
        sock::set_user_timeout(&third, Duration::from_millis(500));
        cue.ready();
        cue.wait();
        third.write_all(b"into the void").expect("write");
        let timeout = third.read(&mut buffer).expect_err("the connection times out");
        assert_eq!(timeout.raw_os_error(), Some(libc::ETIMEDOUT));
        drop(third);
    });
    let (client_pid, server_pid) = (client.pid, server.pid);
    client.until_ready();
    server.until_ready();
    pair.black_hole();
    client.go();
    client.join();
    server.go();
    server.join();

    // Verdicts come in the order the connections reached CLOSE, which differs from the
    // order they were opened in: compare them sorted.
    let sides = [
        (
            &pair.client,
            "client",
            client_pid,
            "obs-client",
            [("fin", "active"), ("rst", "received"), ("timeout", "retransmit")],
        ),
        (
            &pair.server,
            "server",
            server_pid,
            "obs-server",
            [("fin", "passive"), ("rst", "linger_zero"), ("rst", "linger_zero")],
        ),
    ];
    for (namespace, role, pid, comm, expected) in sides {
        let verdicts = daemon().verdicts(namespace, 3);
        assert_eq!(sorted_verdicts(&verdicts, role), expected);
        for verdict in &verdicts {
            assert_owner(verdict, pid, comm, namespace);
        }
    }
}

fn sorted_verdicts<'a>(verdicts: &'a [Connection], role: &str) -> Vec<(&'a str, &'a str)> {
    assert!(verdicts.iter().all(|v| v.role == role), "roles: {verdicts:#?}");
    let mut pairs: Vec<_> = verdicts.iter().map(Connection::verdict).collect();
    pairs.sort();
    pairs
}

#[track_caller]
fn assert_owner(verdict: &Connection, pid: u32, comm: &str, namespace: &crate::net::Namespace) {
    assert_eq!(verdict.owner(), Some((pid, comm.to_string())), "owner of {verdict:#?}");
    assert_eq!(verdict.netns, namespace.inode(), "netns of {verdict:#?}");
}

/// With `--metrics.comm-label --metrics.netns-label`, closes are counted per process name
/// and namespace too.
#[test]
fn optional_labels_name_the_process_and_namespace() {
    const LABELED_PORT: u16 = 7604;
    let labeled = crate::daemon::Daemon::start(
        "labels",
        &["--metrics.comm-label".into(), "--metrics.netns-label".into()],
    );
    let pair = Pair::new();
    let listener = pair.listen(LABELED_PORT);
    let client = Actor::spawn("obs-labeled", &pair.client, |_| {
        let stream = TcpStream::connect((SERVER_V4, LABELED_PORT)).expect("connect");
        sock::set_linger_zero(&stream);
        drop(stream);
    });
    drop(listener.accept().expect("accept"));
    client.join();
    let netns = pair.client.inode().to_string();
    let labels = [
        ("class", "rst"),
        ("cause", "linger_zero"),
        ("comm", "obs-labeled"),
        ("netns", netns.as_str()),
    ];
    let counted = crate::daemon::wait_until(crate::daemon::VERDICT_TIMEOUT, || {
        labeled.metric_sum("observer_tcp_closes_total", &labels) == 1.0
    });
    let exposition = labeled.get("/metrics");
    labeled.stop();
    assert!(counted, "no close labelled {labels:?}:\n{exposition}");
}

/// A server-side socket the kernel closes on its own (the peer's RST, handled in
/// softirq) is owned by the process that accepted it: the accept() capture (a trampoline
/// on inet_accept()) tells, or, on kernels without trampolines, its listener's owner —
/// the same process here.
#[test]
fn a_reset_accepted_socket_names_the_process_that_accepted_it() {
    reset_accepted_socket(daemon(), 7605, Listener::InTheAcceptor);
}

/// With the opt-in accept() system-call tracepoints, the process that accepted a socket
/// is named even where inet_accept() cannot be traced and another process listened:
/// here the listener is this test's, handed to the acceptor by fork().
#[test]
fn a_reset_accepted_socket_names_its_acceptor_with_the_accept_syscall_tracepoints() {
    let traced = crate::daemon::Daemon::start(
        "accept-syscalls",
        &["--bpf.accept-syscall-tracepoints".into()],
    );
    reset_accepted_socket(&traced, 7606, Listener::HandedOver);
    traced.stop();
}

/// Who calls listen(): the accepting process itself, or this one before it forks it.
enum Listener {
    InTheAcceptor,
    HandedOver,
}

fn reset_accepted_socket(daemon: &crate::daemon::Daemon, port: u16, listener: Listener) {
    let pair = Pair::new();
    let handed_over = match listener {
        Listener::HandedOver => Some(pair.listen(port)),
        Listener::InTheAcceptor => None,
    };
    let mut server = Actor::spawn("obs-acceptor", &pair.server, move |cue| {
        let listener =
            handed_over.unwrap_or_else(|| TcpListener::bind((SERVER_V4, port)).expect("bind"));
        cue.ready();
        let (accepted, _) = listener.accept().expect("accept");
        cue.ready();
        // Held, untouched, until the peer's RST has closed it.
        cue.wait();
        drop(accepted);
    });
    server.until_ready();
    let mut client = Actor::spawn("obs-resetter", &pair.client, |cue| {
        let stream = TcpStream::connect((SERVER_V4, port)).expect("connect");
        cue.ready();
        cue.wait();
        sock::set_linger_zero(&stream);
        drop(stream);
    });
    client.until_ready();
    server.until_ready();
    client.go();
    client.join();
    let server_side = daemon.verdicts(&pair.server, 1);
    assert_eq!(sorted_verdicts(&server_side, "server"), [("rst", "received")]);
    assert_owner(&server_side[0], server.pid, "obs-acceptor", &pair.server);
    server.go();
    server.join();
}
