//! The tracker fed event streams as the reader would feed them.

use super::*;
use crate::{
    capture::decode::{ResetDirection, Snapshot},
    classify::{Cause, Class},
    tcp::ResetReason,
};

const SOCK: SocketId = 0xffff_8880_0000_1000;

fn change(socket: SocketId, ts_ms: u64, old: TcpState, new: TcpState, s: Snapshot) -> SocketEvent {
    SocketEvent::State(StateChange {
        timestamp_ns: ts_ms * 1_000_000,
        socket,
        cookie: 7,
        netns: 1,
        old,
        new,
        local: "10.0.0.1:40000".parse().unwrap(),
        remote: "10.0.0.2:80".parse().unwrap(),
        snapshot: s,
        owner: None,
    })
}

fn tracker(capacity: usize) -> Tracker {
    Tracker::new(NonZeroUsize::new(capacity).unwrap())
}

fn feed(tracker: &mut Tracker, events: &[SocketEvent]) -> Vec<ClosedConnection> {
    let mut decided = Vec::new();
    for event in events {
        tracker.ingest(event, &mut decided);
    }
    decided
}

fn linger_zero() -> Snapshot {
    Snapshot {
        has_socket: true,
        shutdown: 3,
        flags: crate::tcp::SockFlags { linger: true, ..Default::default() },
        ..Snapshot::default()
    }
}

#[test]
fn waits_for_the_reset_that_follows_the_close() {
    use TcpState::*;
    let mut t = tracker(16);
    let mut decided = feed(
        &mut t,
        &[
            change(SOCK, 1, Close, SynSent, Snapshot::default()),
            change(SOCK, 2, SynSent, Established, Snapshot::default()),
            // Unread data at close: nothing in the snapshot says linger, the RST says why.
            change(
                SOCK,
                3,
                Established,
                Close,
                Snapshot { has_socket: true, shutdown: 3, unread_bytes: 5, ..Default::default() },
            ),
        ],
    );
    assert!(decided.is_empty());
    assert_eq!(t.next_deadline_ns(), Some(3_000_000 + EVIDENCE_WINDOW_NS));
    t.expire(3_000_000 + EVIDENCE_WINDOW_NS - 1, &mut decided);
    assert!(decided.is_empty(), "decided before the evidence window ended");
    t.ingest(
        &SocketEvent::Reset(Reset {
            timestamp_ns: 3_000_100,
            socket: SOCK,
            cookie: 7,
            direction: ResetDirection::Sent,
            state: Close,
            reason: Some(ResetReason::TcpAbortOnClose),
            answers_packet: false,
        }),
        &mut decided,
    );
    t.expire(3_000_000 + EVIDENCE_WINDOW_NS, &mut decided);
    assert_eq!(decided.len(), 1);
    let closed = &decided[0];
    assert_eq!(closed.verdict.cause, Cause::UnreadData);
    assert_eq!(closed.role, Role::Client);
    assert_eq!(closed.port, 80);
    assert_eq!(closed.states.to_vec(), vec![SynSent, Established, Close]);
    assert_eq!(closed.duration_ns, Some(2_000_000));
    assert!(t.is_empty());
    assert_eq!(t.live().count(), 0);
}

#[test]
fn address_reuse_settles_the_previous_socket_at_once() {
    use TcpState::*;
    let mut t = tracker(16);
    let decided = feed(
        &mut t,
        &[
            change(SOCK, 1, Close, SynSent, Snapshot::default()),
            change(SOCK, 2, SynSent, Established, Snapshot::default()),
            change(SOCK, 3, Established, Close, linger_zero()),
            change(SOCK, 4, Close, SynSent, Snapshot::default()),
        ],
    );
    assert_eq!(decided.len(), 1);
    assert_eq!(decided[0].verdict.cause, Cause::LingerZero);
    assert_eq!(t.len(), 1);
    let live: Vec<_> = t.live().map(|socket| socket.state).collect();
    assert_eq!(live, vec![SynSent]);
    // The stale deadline of the first lifetime must not settle the second.
    let mut later = Vec::new();
    t.expire(u64::MAX / 2, &mut later);
    assert!(later.is_empty());
}

#[test]
fn a_burst_of_closes_is_decided_in_batches() {
    use TcpState::*;
    let mut t = tracker(64);
    for i in 0..10 {
        let socket = SOCK + i * 4096;
        feed(
            &mut t,
            &[
                change(socket, 1, Close, SynSent, Snapshot::default()),
                change(socket, 2, SynSent, Established, Snapshot::default()),
                change(socket, 3, Established, Close, linger_zero()),
            ],
        );
    }
    let mut batch = Vec::new();
    let mut batches = 0;
    let mut decided = 0;
    loop {
        let more = t.expire_at_most(3_000_000 + EVIDENCE_WINDOW_NS, &mut batch, 3);
        assert!(batch.len() <= 3, "a batch of {}", batch.len());
        decided += batch.drain(..).count();
        batches += 1;
        if !more {
            break;
        }
    }
    assert_eq!((decided, batches), (10, 4));
    assert!(t.is_empty());
}

#[test]
fn capacity_bounds_memory_and_counts_evictions() {
    use TcpState::*;
    let mut t = tracker(4);
    for i in 0..100 {
        feed(&mut t, &[change(SOCK + i * 4096, i, Close, SynSent, Snapshot::default())]);
    }
    assert_eq!(t.len(), 4);
    assert_eq!(t.stats().evicted, 96);
    assert_eq!(t.live().count(), 4);
}

#[test]
fn listeners_are_tracked_but_not_reported() {
    use TcpState::*;
    let mut t = tracker(16);
    let mut decided = feed(
        &mut t,
        &[
            change(SOCK, 1, Close, Listen, Snapshot::default()),
            change(SOCK, 5, Listen, Close, Snapshot::default()),
            change(SOCK, 5, Close, Close, Snapshot { sk_err: 103, ..Default::default() }),
        ],
    );
    t.flush(&mut decided);
    assert!(decided.is_empty());
    assert!(t.is_empty());
}

#[test]
fn a_child_keeps_its_own_cookie_not_its_listeners() {
    use TcpState::*;
    let mut t = tracker(16);
    let with_cookie = |event: SocketEvent, cookie| match event {
        SocketEvent::State(change) => SocketEvent::State(StateChange { cookie, ..change }),
        other => other,
    };
    // Up to 6.12 the child's first event carries the listener's cookie (41).
    feed(
        &mut t,
        &[
            with_cookie(change(SOCK, 1, Listen, SynRecv, Snapshot::default()), 41),
            with_cookie(change(SOCK, 2, SynRecv, Established, Snapshot::default()), 42),
        ],
    );
    assert_eq!(t.live().map(|socket| socket.cookie).collect::<Vec<_>>(), vec![42]);
}

#[test]
fn sockets_older_than_the_daemon_get_their_startup_owner() {
    use TcpState::*;
    let mut t = tracker(16);
    let owner = Process { pid: 77, tid: 77, comm: "psql".into(), cgroup_id: 0 };
    t.set_preexisting_owners([(7, owner)].into_iter().collect(), []);
    let received_reset = Snapshot { sk_err: 104, ..Snapshot::default() };
    let mut decided = feed(&mut t, &[change(SOCK, 1, Established, Close, received_reset)]);
    t.flush(&mut decided);
    assert_eq!(decided.len(), 1);
    assert_eq!(decided[0].owner, Some(owner));
}

/// Where accept() is not traced, an accepted socket is its listener's owner's until a
/// system call on it names another process; a closed listener hands nothing on.
#[test]
fn an_accepted_socket_starts_with_its_listeners_owner() {
    use TcpState::*;
    const LISTENER: SocketId = SOCK + 0x100;
    const LATER: SocketId = SOCK + 0x200;
    let server = Process { pid: 10, tid: 10, comm: "nginx".into(), cgroup_id: 0 };
    let closer = Process { pid: 11, tid: 11, comm: "worker".into(), cgroup_id: 0 };
    let with_owner = |event: SocketEvent, owner: Option<Process>| match event {
        SocketEvent::State(change) => SocketEvent::State(StateChange { owner, ..change }),
        other => other,
    };
    let received_reset = Snapshot { sk_err: 104, ..Snapshot::default() };
    let mut t = tracker(16);
    let mut decided = feed(
        &mut t,
        &[
            with_owner(change(LISTENER, 1, Close, Listen, Snapshot::default()), Some(server)),
            // Reset by the peer in softirq: no system call of its own ever named it.
            change(SOCK, 2, Listen, SynRecv, Snapshot::default()),
            change(SOCK, 3, SynRecv, Established, Snapshot::default()),
            change(SOCK, 4, Established, Close, received_reset),
            // Closed by a process of its own: that one is the owner.
            change(SOCK + 1, 5, Listen, SynRecv, Snapshot::default()),
            change(SOCK + 1, 6, SynRecv, Established, Snapshot::default()),
            with_owner(
                change(SOCK + 1, 7, Established, FinWait1, Snapshot::default()),
                Some(closer),
            ),
            change(SOCK + 1, 8, FinWait1, Close, linger_zero()),
            // The listener closes; a later child on its port has no owner to start with.
            change(LISTENER, 9, Listen, Close, Snapshot::default()),
            change(LATER, 10, Listen, SynRecv, Snapshot::default()),
            change(LATER, 11, SynRecv, Established, Snapshot::default()),
            change(LATER, 12, Established, Close, received_reset),
        ],
    );
    t.flush(&mut decided);
    let owner_of = |socket_cookie_order: usize| decided[socket_cookie_order].owner.map(|p| p.pid);
    assert_eq!(decided.len(), 3, "{decided:#?}");
    assert_eq!([owner_of(0), owner_of(1), owner_of(2)], [Some(10), Some(11), None]);
}

/// A listener older than the daemon (its owner from the startup scan) hands its owner on.
#[test]
fn a_listener_older_than_the_daemon_hands_its_owner_on() {
    use TcpState::*;
    let owner = Process { pid: 20, tid: 20, comm: "postgres".into(), cgroup_id: 0 };
    let mut t = tracker(16);
    t.set_preexisting_owners(HashMap::new(), [((1, 40000), owner)]);
    let mut decided = feed(
        &mut t,
        &[
            change(SOCK, 1, Listen, SynRecv, Snapshot::default()),
            change(SOCK, 2, SynRecv, Established, Snapshot::default()),
            change(SOCK, 3, Established, Close, Snapshot { sk_err: 104, ..Snapshot::default() }),
        ],
    );
    t.flush(&mut decided);
    assert_eq!(decided.len(), 1);
    assert_eq!(decided[0].owner, Some(owner));
}

#[test]
fn sockets_opened_before_start_have_unknown_role_and_lower_port() {
    use TcpState::*;
    let mut t = tracker(16);
    let mut decided = feed(
        &mut t,
        &[
            change(SOCK, 1, Established, FinWait1, Snapshot::default()),
            change(SOCK, 2, FinWait1, FinWait2, Snapshot::default()),
            change(
                SOCK,
                2,
                FinWait2,
                Close,
                Snapshot {
                    flags: crate::tcp::SockFlags { dead: true, ..Default::default() },
                    shutdown: 3,
                    ..Default::default()
                },
            ),
        ],
    );
    t.flush(&mut decided);
    assert_eq!(decided.len(), 1);
    let closed = &decided[0];
    assert_eq!(closed.role, Role::Unknown);
    assert_eq!(closed.port, 80);
    assert_eq!(closed.duration_ns, None);
    assert_eq!((closed.verdict.class(), closed.verdict.cause), (Class::Fin, Cause::Active));
}
