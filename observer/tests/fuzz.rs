//! Hostile input: arbitrary ring-buffer bytes through the decoder, arbitrary event
//! sequences through the tracker and classifier. Never a panic; every connection gets
//! exactly one verdict, or its loss is counted.
//!
//! Property tests (proptest) with fixed case counts so `cargo xtask test` spends a few
//! seconds here; raise them with `PROPTEST_CASES=100000 cargo test --test fuzz` for a
//! longer hunt.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    num::NonZeroUsize,
};

use observer::{
    capture::decode::{
        Accepted, Decoder, Reset, ResetDirection, Snapshot, SocketEvent, StateChange,
    },
    classify::{self, History},
    clock::Clock,
    export::report::ConnectionReport,
    kernel::layout::{FieldDecoder, KernelLayout},
    owner::{CgroupNames, Comm, Process},
    tcp::{ResetReason, SockFlags, TcpState},
    track::{ClosedConnection, Tracker},
};
use observer_common::{CloseEvent, ProgramConfig, SockField, TaskConfig};
use proptest::{prelude::*, sample::select};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------- decoder

fn field_decoder() -> impl Strategy<Value = FieldDecoder> {
    (any::<bool>(), any::<u8>(), any::<u8>(), any::<bool>())
        .prop_map(|(present, shift, bits, signed)| FieldDecoder { present, shift, bits, signed })
}

/// A layout as BTF could describe it — or as a corrupt BTF could.
fn layout() -> impl Strategy<Value = KernelLayout> {
    (
        prop::collection::vec(field_decoder(), SockField::COUNT),
        prop::collection::hash_map(any::<u32>(), any_reason_value(), 0..4),
    )
        .prop_map(|(decoders, reset_reasons)| {
            let mut fields = [FieldDecoder::default(); SockField::COUNT];
            fields.copy_from_slice(&decoders);
            KernelLayout {
                config: ProgramConfig::UNSET,
                task_config: TaskConfig::UNSET,
                fields,
                reset_reasons,
                missing: vec![],
            }
        })
}

fn any_reason_value() -> impl Strategy<Value = ResetReason> {
    select(vec![ResetReason::TcpAbortOnClose, ResetReason::NoSocket, ResetReason::Other])
}

/// Bytes that start like a record of `kind`, so the field decoding runs on garbage.
fn record_of_kind() -> impl Strategy<Value = Vec<u8>> {
    (1..=5u32, prop::collection::vec(any::<u8>(), 4..size_of::<CloseEvent>() + 64)).prop_map(
        |(kind, mut bytes)| {
            bytes[..4].copy_from_slice(&kind.to_ne_bytes());
            bytes
        },
    )
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(
        layout in layout(),
        bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), record_of_kind()],
    ) {
        let decoder = Decoder::new(&layout);
        // Either an event or a DecodeError (counted as malformed by the pipeline).
        match decoder.decode(&bytes) {
            Ok(event) => {
                // What the daemon prints must serialise and read back.
                let json = serde_json::to_string(&event).unwrap();
                let _: SocketEvent = serde_json::from_str(&json).unwrap();
            }
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn field_decoder_never_panics(decoder in field_decoder(), raw in any::<u64>()) {
        let value = decoder.unsigned(raw);
        let signed = decoder.signed(raw);
        if !decoder.present || decoder.bits == 0 {
            prop_assert_eq!((value, signed), (0, 0));
        } else if decoder.bits < 64 {
            // Never wider than the field claims.
            prop_assert!(value < 1u64 << decoder.bits);
        }
    }
}

// ---------------------------------------------------------------- tracker

const BASE: u64 = 0xffff_8880_0000_0000;

fn any_state() -> impl Strategy<Value = TcpState> {
    select(TcpState::ALL.to_vec())
}

fn any_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        (any::<i32>(), any::<i32>(), any::<u8>(), any::<u8>(), any::<i64>(), any::<bool>()),
        (any::<i32>(), any::<u8>(), any::<u8>(), any::<u32>(), any::<u32>(), any::<u32>()),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(
                (sk_err, sk_err_soft, shutdown, flags, linger_time, has_socket),
                (linger2, retransmits, probes_out, user_timeout_ms, send_window, packets_out),
                (unread_bytes, bytes_acked, bytes_received, total_retrans, srtt_us),
            )| Snapshot {
                sk_err,
                sk_err_soft,
                shutdown,
                flags: SockFlags::from_kernel(u64::from(flags)),
                linger_time,
                has_socket,
                linger2,
                retransmits,
                probes_out,
                user_timeout_ms,
                send_window,
                packets_out,
                unread_bytes,
                bytes_acked,
                bytes_received,
                total_retrans,
                srtt_us,
            },
        )
}

fn any_reason() -> impl Strategy<Value = Option<ResetReason>> {
    prop_oneof![
        Just(None),
        select(vec![
            ResetReason::NotSpecified,
            ResetReason::NoSocket,
            ResetReason::TcpAbortOnClose,
            ResetReason::TcpAbortOnLinger,
            ResetReason::TcpAbortOnData,
            ResetReason::Other,
        ])
        .prop_map(Some),
    ]
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

/// Any time, with the edges of the clock well represented.
fn any_time() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u64>(), 0..1_000_000_000u64, (u64::MAX - 1_000_000_000)..=u64::MAX]
}

/// A completely arbitrary event on one of a few sockets, at an arbitrary time.
fn any_event() -> impl Strategy<Value = SocketEvent> {
    let state = (
        0..6u64,
        any_time(),
        any_state(),
        any_state(),
        any::<u16>(),
        any::<u16>(),
        any_snapshot(),
        any::<u64>(),
        prop::option::of(any_process()),
    )
        .prop_map(
            |(socket, timestamp_ns, old, new, local, remote, snapshot, cookie, owner)| {
                SocketEvent::State(StateChange {
                    timestamp_ns,
                    socket: BASE + socket * 4096,
                    cookie,
                    netns: 1,
                    old,
                    new,
                    local: addr(local),
                    remote: addr(remote),
                    snapshot,
                    owner,
                })
            },
        );
    let accepted = (0..6u64, any_time(), any::<u64>(), any_process()).prop_map(
        |(socket, timestamp_ns, cookie, owner)| {
            SocketEvent::Accepted(Accepted {
                timestamp_ns,
                socket: BASE + socket * 4096,
                cookie,
                owner,
            })
        },
    );
    let reset = (0..6u64, any_time(), any::<bool>(), any_state(), any_reason(), any::<bool>())
        .prop_map(|(socket, timestamp_ns, sent, state, reason, answers_packet)| {
            SocketEvent::Reset(Reset {
                timestamp_ns,
                socket: BASE + socket * 4096,
                cookie: 0,
                direction: if sent { ResetDirection::Sent } else { ResetDirection::Received },
                state,
                reason,
                answers_packet,
            })
        });
    prop_oneof![3 => state, 1 => reset, 1 => accepted]
}

fn any_process() -> impl Strategy<Value = Process> {
    (1..u32::MAX, any::<u32>(), any::<[u8; 16]>(), any::<u64>())
        .prop_map(|(pid, tid, comm, cgroup_id)| Process { pid, tid, comm: Comm(comm), cgroup_id })
}

#[derive(Clone, Debug)]
enum Step {
    Event(SocketEvent),
    /// The pipeline's periodic settle, at this time.
    Expire(u64),
}

fn check_tracker_invariants(tracker: &Tracker, capacity: usize) -> Result<(), TestCaseError> {
    prop_assert!(tracker.len() <= capacity, "{} tracked > capacity {capacity}", tracker.len());
    let live = tracker.live().count();
    prop_assert!(live <= tracker.len(), "{live} live > {} tracked", tracker.len());
    Ok(())
}

proptest! {
    #![proptest_config(config(3000))]

    /// Garbage in: no panic, memory within capacity, open sockets within the tracked, at most one
    /// verdict per final transition.
    #[test]
    fn tracker_survives_arbitrary_sequences(
        capacity in 1..8usize,
        steps in prop::collection::vec(
            prop_oneof![8 => any_event().prop_map(Step::Event), 1 => any_time().prop_map(Step::Expire)],
            0..80,
        ),
    ) {
        let mut tracker = Tracker::new(NonZeroUsize::new(capacity).unwrap());
        let mut decided = Vec::new();
        let mut finals = 0;
        for step in &steps {
            match step {
                Step::Event(event) => {
                    if let SocketEvent::State(change) = event
                        && change.new == TcpState::Close
                        && change.old != TcpState::Close
                    {
                        finals += 1;
                    }
                    tracker.ingest(event, &mut decided);
                }
                Step::Expire(now) => tracker.expire(*now, &mut decided),
            }
            check_tracker_invariants(&tracker, capacity)?;
        }
        tracker.flush(&mut decided);
        check_tracker_invariants(&tracker, capacity)?;
        prop_assert!(decided.len() <= finals, "{} verdicts for {finals} final transitions", decided.len());
        for closed in &decided {
            prop_assert_eq!(closed.states.last(), Some(TcpState::Close));
            // What /connections and watch print must render.
            let report = ConnectionReport::new(closed, &Clock::now(), &mut CgroupNames::new(None));
            serde_json::to_string(&report).unwrap();
            let _ = report.line();
        }
    }

    /// The classifier is total: any history yields an outcome.
    #[test]
    fn classifier_is_total(
        last_change in prop::option::of((any_state(), any_state(), any::<u64>())),
        close in prop::option::of((any_state(), any::<u64>(), any_snapshot())),
        resets in prop::collection::vec((any::<bool>(), any_reason(), any::<bool>(), any::<bool>()), 0..6),
    ) {
        let history = History {
            role: None,
            last_change: last_change
                .map(|(old, new, timestamp_ns)| classify::Transition { old, new, timestamp_ns }),
            close: close.map(|(previous, timestamp_ns, snapshot)| classify::Close {
                previous,
                timestamp_ns,
                snapshot,
            }),
            resets: resets
                .into_iter()
                .map(|(sent, reason, answers_packet, after_close)| classify::ResetSeen {
                    direction: if sent { ResetDirection::Sent } else { ResetDirection::Received },
                    reason,
                    answers_packet,
                    after_close,
                })
                .collect(),
        };
        let _ = classify::classify(&history);
    }
}

/// The ways a real socket's life goes, as (old, new) transitions.
const LIVES: &[(bool, &[(TcpState, TcpState)])] = {
    use TcpState::*;
    &[
        // (is a connection, transitions)
        (
            true,
            &[
                (Close, SynSent),
                (SynSent, Established),
                (Established, FinWait1),
                (FinWait1, FinWait2),
                (FinWait2, Close),
            ],
        ),
        (
            true,
            &[
                (Close, SynSent),
                (SynSent, Established),
                (Established, CloseWait),
                (CloseWait, LastAck),
                (LastAck, Close),
            ],
        ),
        (
            true,
            &[
                (Close, SynSent),
                (SynSent, Established),
                (Established, FinWait1),
                (FinWait1, Closing),
                (Closing, Close),
            ],
        ),
        (true, &[(Listen, SynRecv), (SynRecv, Established), (Established, Close)]),
        (true, &[(Listen, SynRecv), (SynRecv, Close)]),
        (true, &[(Close, SynSent), (SynSent, Close)]),
        (true, &[(Established, FinWait1), (FinWait1, FinWait2), (FinWait2, Close)]),
        (true, &[(CloseWait, LastAck), (LastAck, Close)]),
        (false, &[(Close, Listen), (Listen, Close)]),
    ]
};

/// An RST during a life: before which transition (or after the last), sent, reason.
type PlannedReset = (usize, bool, Option<ResetReason>);

/// One socket lifetime: which life, its snapshots, RSTs on the way.
fn lifetime() -> impl Strategy<Value = (usize, Vec<Snapshot>, Vec<PlannedReset>)> {
    (0..LIVES.len()).prop_flat_map(|life| {
        let steps = LIVES[life].1.len();
        (
            Just(life),
            prop::collection::vec(any_snapshot(), steps),
            prop::collection::vec((0..=steps, any::<bool>(), any_reason()), 0..3),
        )
    })
}

proptest! {
    #![proptest_config(config(2000))]

    /// Well-formed lives, interleaved across sockets and reusing socket addresses:
    /// with room for every socket, exactly one verdict per connection and none for
    /// listeners; with too little room, at most one verdict per connection and every
    /// connection without one counted as evicted.
    #[test]
    fn one_verdict_per_connection_or_a_counted_drop(
        lifetimes in prop::collection::vec(lifetime(), 1..40),
        addresses in 1..12u64,
        capacity in 1..16usize,
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..400),
        expire_every in 1..20usize,
    ) {
        // Per socket address, its lifetimes one after the other.
        let mut queues: Vec<Vec<(u64, SocketEvent)>> = vec![Vec::new(); addresses as usize];
        let mut connections = HashSet::new();
        for (index, (life, snapshots, resets)) in lifetimes.iter().enumerate() {
            let (is_connection, transitions) = LIVES[*life];
            let slot = index as u64 % addresses;
            let socket = BASE + slot * 4096;
            let cookie = index as u64 + 1;
            if is_connection {
                connections.insert(cookie);
            }
            let mut state = transitions[0].0;
            for (step, (old, new)) in transitions.iter().enumerate() {
                for (_, sent, reason) in resets.iter().filter(|(at, _, _)| *at == step) {
                    queues[slot as usize].push((cookie, reset(socket, cookie, *sent, state, *reason)));
                }
                queues[slot as usize].push((cookie, SocketEvent::State(StateChange {
                    timestamp_ns: 0,
                    socket,
                    cookie,
                    netns: 1,
                    old: *old,
                    new: *new,
                    local: addr(40000 + slot as u16),
                    remote: addr(80),
                    snapshot: snapshots[step],
                    owner: None,
                })));
                state = *new;
            }
            for (_, sent, reason) in resets.iter().filter(|(at, _, _)| *at == transitions.len()) {
                queues[slot as usize].push((cookie, reset(socket, cookie, *sent, TcpState::Close, *reason)));
            }
        }
        // Interleave the queues in an arbitrary order, keeping each one's own order.
        let mut cursors = vec![0; queues.len()];
        let mut stream = Vec::new();
        let mut picks = order.iter();
        loop {
            let open: Vec<usize> = (0..queues.len()).filter(|q| cursors[*q] < queues[*q].len()).collect();
            if open.is_empty() {
                break;
            }
            let queue = match picks.next() {
                Some(index) => open[index.index(open.len())],
                None => open[0],
            };
            stream.push(queues[queue][cursors[queue]].clone());
            cursors[queue] += 1;
        }

        let mut tracker = Tracker::new(NonZeroUsize::new(capacity).unwrap());
        let mut decided: Vec<ClosedConnection> = Vec::new();
        for (time, (_, mut event)) in stream.into_iter().enumerate() {
            let now = time as u64 * 1_000_000;
            match &mut event {
                SocketEvent::State(change) => change.timestamp_ns = now,
                SocketEvent::Reset(reset) => reset.timestamp_ns = now,
                SocketEvent::Accepted(accepted) => accepted.timestamp_ns = now,
            }
            tracker.ingest(&event, &mut decided);
            if time % expire_every == 0 {
                tracker.expire(now, &mut decided);
            }
            check_tracker_invariants(&tracker, capacity)?;
        }
        tracker.flush(&mut decided);
        check_tracker_invariants(&tracker, capacity)?;
        prop_assert_eq!(tracker.len(), 0, "every life ended, nothing may stay tracked");

        let mut verdicts: HashMap<u64, usize> = HashMap::new();
        for closed in &decided {
            *verdicts.entry(closed.cookie).or_default() += 1;
        }
        for (cookie, count) in &verdicts {
            prop_assert!(connections.contains(cookie), "verdict for a listener (cookie {cookie})");
            prop_assert_eq!(*count, 1, "cookie {} judged {} times", cookie, count);
        }
        let stats = tracker.stats();
        let undecided = connections.len() - verdicts.len();
        prop_assert_eq!(stats.replaced, 0, "no final transition was lost");
        prop_assert!(
            undecided as u64 <= stats.evicted,
            "{undecided} connections without verdict, only {} evictions counted", stats.evicted
        );
        if capacity >= addresses as usize {
            prop_assert_eq!(stats.evicted, 0);
            prop_assert_eq!(undecided, 0);
        }
    }
}

fn reset(
    socket: u64,
    cookie: u64,
    sent: bool,
    state: TcpState,
    reason: Option<ResetReason>,
) -> SocketEvent {
    SocketEvent::Reset(Reset {
        timestamp_ns: 0,
        socket,
        cookie,
        direction: if sent { ResetDirection::Sent } else { ResetDirection::Received },
        state,
        reason,
        answers_packet: false,
    })
}
