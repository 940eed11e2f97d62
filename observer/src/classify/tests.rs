//! Table tests of the decision, on histories built step by step as the tracker builds them.

use super::*;
use crate::tcp::TcpState::*;

const MS: u64 = 1_000_000;

/// A history built step by step, as the tracker would.
struct Build {
    history: History,
    now: u64,
}

fn client() -> Build {
    Build::new(Role::Client).to(Close, SynSent).to(SynSent, Established)
}

fn server() -> Build {
    Build::new(Role::Server).to(Listen, SynRecv).to(SynRecv, Established)
}

fn sock(edit: impl FnOnce(&mut Snapshot)) -> Snapshot {
    let mut s = Snapshot { has_socket: true, ..Snapshot::default() };
    edit(&mut s);
    s
}

impl Build {
    fn new(role: Role) -> Self {
        Self { history: History { role: Some(role), ..History::default() }, now: 0 }
    }

    fn to(mut self, old: TcpState, new: TcpState) -> Self {
        self.now += 10 * MS;
        if old != new && new != Close {
            self.history.last_change = Some(Transition { old, new, timestamp_ns: self.now });
        }
        self
    }

    /// The next transition happens in the same softirq as the previous one.
    fn at_once(mut self) -> Self {
        self.now -= 10 * MS - 1000;
        self
    }

    fn reset(
        mut self,
        direction: ResetDirection,
        reason: Option<ResetReason>,
        reply: bool,
    ) -> Self {
        let after_close = self.history.close.is_some();
        self.history.resets.push(ResetSeen {
            direction,
            reason,
            answers_packet: reply,
            after_close,
        });
        self
    }

    fn rst_in(self) -> Self {
        self.reset(ResetDirection::Received, None, false)
    }

    fn rst_out(self, reason: Option<ResetReason>) -> Self {
        self.reset(ResetDirection::Sent, reason, false)
    }

    fn rst_reply(self, reason: Option<ResetReason>) -> Self {
        self.reset(ResetDirection::Sent, reason, true)
    }

    fn close(mut self, previous: TcpState, snapshot: Snapshot) -> Self {
        self = self.to(previous, Close);
        self.history.close = Some(super::Close { previous, timestamp_ns: self.now, snapshot });
        self
    }

    fn verdict(&self) -> (Class, Cause, Option<&'static str>) {
        match classify(&self.history) {
            Outcome::Connection(v) => (v.class(), v.cause, v.detail),
            other => panic!("expected a connection verdict, got {other:?}"),
        }
    }
}

fn orphan(edit: impl FnOnce(&mut Snapshot)) -> Snapshot {
    sock(|s| {
        s.has_socket = false;
        s.flags.dead = true;
        s.shutdown = SHUTDOWN_MASK;
        edit(s);
    })
}

const TIMEOUT: i32 = errno::ETIMEDOUT;

#[test]
fn graceful_closes() {
    // Our FIN ACKed first: hand-over to a FIN_WAIT2 timewait socket.
    let active = client()
        .to(Established, FinWait1)
        .to(FinWait1, FinWait2)
        .at_once()
        .close(FinWait2, orphan(|_| {}));
    assert_eq!(active.verdict(), (Class::Fin, Cause::Active, Some("fin_wait2")));

    // The peer's FIN came with the ACK of ours.
    let three_way = client()
        .to(Established, FinWait1)
        .to(FinWait1, FinWait2)
        .at_once()
        .close(FinWait2, orphan(|s| s.flags.done = true));
    assert_eq!(three_way.verdict(), (Class::Fin, Cause::Active, Some("three_way")));

    // The peer's FIN came later (FIN_WAIT2 kept by a long linger2).
    let later = client()
        .to(Established, FinWait1)
        .to(FinWait1, FinWait2)
        .close(FinWait2, orphan(|s| s.flags.done = true));
    assert_eq!(later.verdict(), (Class::Fin, Cause::Active, Some("time_wait")));

    let passive = server()
        .to(Established, CloseWait)
        .to(CloseWait, LastAck)
        .close(LastAck, orphan(|s| s.flags.done = true));
    assert_eq!(passive.verdict(), (Class::Fin, Cause::Passive, None));

    let simultaneous = client()
        .to(Established, FinWait1)
        .to(FinWait1, Closing)
        .close(Closing, orphan(|s| s.flags.done = true));
    assert_eq!(simultaneous.verdict(), (Class::Fin, Cause::Simultaneous, None));

    // shutdown(SHUT_WR), then the peer's response and FIN; fd still open.
    let half_close = client().to(Established, FinWait1).to(FinWait1, FinWait2).close(
        FinWait2,
        sock(|s| {
            s.shutdown = SHUTDOWN_MASK;
            s.flags.done = true;
        }),
    );
    assert_eq!(half_close.verdict(), (Class::Fin, Cause::Active, Some("time_wait")));
}

#[test]
fn listeners_and_open_sockets_are_not_counted() {
    let listener = Build::new(Role::Unknown).to(Close, Listen).close(Listen, sock(|_| {}));
    assert_eq!(classify(&listener.history), Outcome::Listener);
    assert_eq!(classify(&client().history), Outcome::Open);
}

#[test]
fn resets_received() {
    let reset = client().rst_in().close(Established, sock(|s| s.sk_err = errno::ECONNRESET));
    assert_eq!(reset.verdict(), (Class::Rst, Cause::Received, None));

    // Writing to a peer that already closed: its timewait socket answers RST.
    let epipe = client()
        .to(Established, CloseWait)
        .rst_in()
        .close(CloseWait, sock(|s| s.sk_err = errno::EPIPE));
    assert_eq!(epipe.verdict(), (Class::Rst, Cause::Received, None));

    // The RST's own event lost (ring full): sk_err still tells, and the detail says
    // the verdict was inferred.
    let lost = client().close(Established, sock(|s| s.sk_err = errno::ECONNRESET));
    assert_eq!(lost.verdict(), (Class::Rst, Cause::Received, Some("reset_event_missing")));

    let refused = Build::new(Role::Client)
        .to(Close, SynSent)
        .rst_in()
        .close(SynSent, sock(|s| s.sk_err = errno::ECONNREFUSED));
    assert_eq!(refused.verdict(), (Class::Rst, Cause::Refused, None));
}

#[test]
fn close_time_aborts_with_and_without_reasons() {
    for reason in [None, Some(ResetReason::TcpAbortOnClose)] {
        let unread = server()
            .close(
                Established,
                sock(|s| {
                    s.shutdown = SHUTDOWN_MASK;
                    s.unread_bytes = 100;
                    // Unread data wins over SO_LINGER {1, 0}.
                    s.flags.linger = true;
                }),
            )
            .rst_out(reason);
        assert_eq!(unread.verdict(), (Class::Rst, Cause::UnreadData, None), "{reason:?}");
    }
    for reason in [None, Some(ResetReason::TcpState)] {
        let linger = client()
            .close(
                Established,
                sock(|s| {
                    s.shutdown = SHUTDOWN_MASK;
                    s.flags.linger = true;
                    s.unread_bytes = 1; // the peer's FIN, unread: not data
                    s.flags.done = true;
                }),
            )
            .rst_out(reason);
        assert_eq!(linger.verdict(), (Class::Rst, Cause::LingerZero, None), "{reason:?}");

        let disconnect = client().close(Established, sock(|_| {})).rst_out(reason);
        assert_eq!(disconnect.verdict(), (Class::Rst, Cause::Disconnect, None));

        let child = server()
            .close(
                Established,
                sock(|s| {
                    s.has_socket = false;
                    s.unread_bytes = 10;
                }),
            )
            .rst_out(reason);
        assert_eq!(child.verdict(), (Class::Rst, Cause::ListenerClosed, None));
    }
    // close() in FIN_WAIT2 with TCP_LINGER2 < 0.
    for reason in [None, Some(ResetReason::TcpAbortOnLinger)] {
        let linger2 = client()
            .to(Established, FinWait1)
            .to(FinWait1, FinWait2)
            .to(FinWait2, FinWait2)
            .close(FinWait2, orphan(|s| s.linger2 = -1))
            .rst_out(reason);
        assert_eq!(linger2.verdict(), (Class::Rst, Cause::Linger2, None), "{reason:?}");
    }
}

#[test]
fn abort_on_close_for_data_already_read_on_old_kernels() {
    let spurious = server().close(Established, sock(|s| s.shutdown = SHUTDOWN_MASK)).rst_out(None);
    assert_eq!(spurious.verdict(), (Class::Rst, Cause::UnreadData, Some("data_already_read")));
    let neither = server().close(Established, sock(|s| s.shutdown = SHUTDOWN_MASK));
    assert_eq!(neither.verdict().1, Cause::Unknown);
}

#[test]
fn data_after_close() {
    for reason in [None, Some(ResetReason::TcpAbortOnData)] {
        // tcp_reset() is faked locally, then the segment is answered with an RST.
        let data = server()
            .to(Established, FinWait1)
            .rst_in()
            .close(FinWait1, orphan(|s| s.sk_err = errno::ECONNRESET))
            .rst_reply(reason);
        assert_eq!(data.verdict(), (Class::Rst, Cause::DataAfterClose, None), "{reason:?}");

        // Orphan in FIN_WAIT1 gets its ACK with linger2 < 0: no fake RST_RX.
        let fin_wait1 = client()
            .to(Established, FinWait1)
            .to(FinWait1, FinWait2)
            .at_once()
            .close(FinWait2, orphan(|s| s.linger2 = -1))
            .rst_reply(reason);
        assert_eq!(fin_wait1.verdict(), (Class::Rst, Cause::Linger2, Some("fin_wait1")));
    }
}

#[test]
fn timeouts() {
    let retransmit = client().close(
        Established,
        sock(|s| {
            s.sk_err = TIMEOUT;
            s.retransmits = 5;
            s.send_window = 64000;
        }),
    );
    assert_eq!(retransmit.verdict(), (Class::Timeout, Cause::Retransmit, None));

    // The soft error (ICMP host unreachable) replaces ETIMEDOUT.
    let soft = client().close(
        Established,
        sock(|s| {
            s.sk_err = errno::EHOSTUNREACH;
            s.sk_err_soft = errno::EHOSTUNREACH;
            s.retransmits = 3;
            s.send_window = 1;
        }),
    );
    assert_eq!(soft.verdict(), (Class::Timeout, Cause::Retransmit, Some("EHOSTUNREACH")));

    let user_timeout = client().close(
        Established,
        sock(|s| {
            s.sk_err = TIMEOUT;
            s.retransmits = 2;
            s.send_window = 1;
            s.user_timeout_ms = 1500;
        }),
    );
    assert_eq!(user_timeout.verdict(), (Class::Timeout, Cause::Retransmit, Some("user_timeout")));

    let orphan_retries = client().to(Established, FinWait1).close(
        FinWait1,
        orphan(|s| {
            s.sk_err = TIMEOUT;
            s.retransmits = 3;
            s.send_window = 1;
        }),
    );
    assert_eq!(orphan_retries.verdict(), (Class::Timeout, Cause::Retransmit, Some("orphan")));

    for reason in [None, Some(ResetReason::TcpKeepaliveTimeout)] {
        let keepalive = client().rst_out(reason).close(
            Established,
            sock(|s| {
                s.sk_err = TIMEOUT;
                s.flags.keepalive = true;
                s.probes_out = 2;
                s.send_window = 1;
            }),
        );
        assert_eq!(keepalive.verdict(), (Class::Timeout, Cause::Keepalive, None));
    }

    let syn = Build::new(Role::Client).to(Close, SynSent).close(
        SynSent,
        sock(|s| {
            s.sk_err = TIMEOUT;
            s.retransmits = 2;
        }),
    );
    assert_eq!(syn.verdict(), (Class::Timeout, Cause::Syn, None));

    let zero_window = client().close(
        Established,
        sock(|s| {
            s.sk_err = TIMEOUT;
            s.probes_out = 4;
            s.send_window = 0;
        }),
    );
    assert_eq!(zero_window.verdict(), (Class::Timeout, Cause::ZeroWindow, None));

    // A keepalive socket that was busy retransmitting timed out on retransmissions.
    let keepalive_on_but_rto = client().close(
        Established,
        sock(|s| {
            s.sk_err = TIMEOUT;
            s.flags.keepalive = true;
            s.retransmits = 4;
            s.send_window = 10;
        }),
    );
    assert_eq!(keepalive_on_but_rto.verdict(), (Class::Timeout, Cause::Retransmit, None));

    for reason in [None, Some(ResetReason::TcpState)] {
        let fin_wait2 = client()
            .to(Established, FinWait1)
            .to(FinWait1, FinWait2)
            .rst_out(reason)
            .close(FinWait2, orphan(|_| {}));
        assert_eq!(fin_wait2.verdict(), (Class::Timeout, Cause::FinWait2, None));
    }
}

#[test]
fn other_endings() {
    for reason in [None, Some(ResetReason::TcpState)] {
        let killed =
            client().rst_out(reason).close(Established, sock(|s| s.sk_err = errno::ECONNABORTED));
        assert_eq!(killed.verdict(), (Class::Other, Cause::Killed, None));
    }
    let killed_connecting = Build::new(Role::Client)
        .to(Close, SynSent)
        .close(SynSent, sock(|s| s.sk_err = errno::ECONNABORTED));
    assert_eq!(killed_connecting.verdict(), (Class::Other, Cause::Killed, None));

    let cancelled = Build::new(Role::Client).to(Close, SynSent).close(
        SynSent,
        sock(|s| {
            s.shutdown = SHUTDOWN_MASK;
            s.retransmits = 1;
            s.packets_out = 1;
        }),
    );
    assert_eq!(cancelled.verdict(), (Class::Other, Cause::Cancelled, None));

    let unreachable = Build::new(Role::Client)
        .to(Close, SynSent)
        .close(SynSent, sock(|s| s.sk_err = errno::EHOSTUNREACH));
    assert_eq!(unreachable.verdict(), (Class::Other, Cause::Unreachable, Some("EHOSTUNREACH")));

    let port_unreachable = Build::new(Role::Client)
        .to(Close, SynSent)
        .close(SynSent, sock(|s| s.sk_err = errno::ECONNREFUSED));
    assert_eq!(
        port_unreachable.verdict(),
        (Class::Other, Cause::Unreachable, Some("ECONNREFUSED"))
    );

    for reason in [None, Some(ResetReason::TcpAbortOnMemory)] {
        let memory =
            client().to(Established, FinWait1).close(FinWait1, orphan(|_| {})).rst_out(reason);
        assert_eq!(memory.verdict(), (Class::Other, Cause::Memory, None));
    }

    let teardown = client().to(Established, FinWait1).close(FinWait1, orphan(|_| {}));
    assert_eq!(
        teardown.verdict(),
        (Class::Other, Cause::Unknown, Some("orphan_closed_without_reset"))
    );
}

#[test]
fn every_cause_has_one_class_and_a_unique_name() {
    let mut names: Vec<_> = Cause::ALL.iter().map(|c| c.name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), Cause::ALL.len());
}
