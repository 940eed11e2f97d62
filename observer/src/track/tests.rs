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
    t.set_preexisting_owners([(7, owner)].into_iter().collect());
    let received_reset = Snapshot { sk_err: 104, ..Snapshot::default() };
    let mut decided = feed(&mut t, &[change(SOCK, 1, Established, Close, received_reset)]);
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
