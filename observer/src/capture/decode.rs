//! Ring-buffer records decoded into plain values: what happened to which socket, and
//! what the socket looked like at that instant.
//!
//! [`Decoder`] is pure (bytes in, [`SocketEvent`] out). The decoded types serialise to
//! JSON; `observer watch --events` prints them one per line, and the classifier's unit
//! tests replay such recordings (`observer/tests/streams/`).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use observer_common::{
    CloseEvent, EventHeader, EventKind, NO_REASON, OwnerEvent, ResetEvent, SockField, StateEvent,
    kernel::{AF_INET, AF_INET6},
};
use serde::{Deserialize, Serialize};

use crate::{
    kernel::layout::{FieldDecoder, KernelLayout},
    owner::process::Process,
    tcp::{ResetReason, SockFlags, TcpState},
};

/// The socket pointer: a socket's identity while it is alive (reused after it is freed,
/// which the tracker handles).
pub type SocketId = u64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SocketEvent {
    State(StateChange),
    Reset(Reset),
    Accepted(Accepted),
}

impl SocketEvent {
    /// When the kernel recorded it (CLOCK_MONOTONIC nanoseconds).
    pub fn timestamp_ns(&self) -> u64 {
        match self {
            SocketEvent::State(change) => change.timestamp_ns,
            SocketEvent::Reset(reset) => reset.timestamp_ns,
            SocketEvent::Accepted(accepted) => accepted.timestamp_ns,
        }
    }

    pub fn socket(&self) -> SocketId {
        match self {
            SocketEvent::State(change) => change.socket,
            SocketEvent::Reset(reset) => reset.socket,
            SocketEvent::Accepted(accepted) => accepted.socket,
        }
    }
}

/// A process received the socket from `accept()`: it owns it from now on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub timestamp_ns: u64,
    pub socket: SocketId,
    pub cookie: u64,
    pub owner: Process,
}

/// One `inet_sock_set_state` transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    /// CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    pub socket: SocketId,
    pub cookie: u64,
    pub netns: u32,
    pub old: TcpState,
    pub new: TcpState,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub snapshot: Snapshot,
    /// The process whose system call made this transition (connect, listen, close,
    /// shutdown); absent for transitions made in softirq or timers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Process>,
}

/// The socket's fields at the transition: the evidence the classifier decides on, and
/// the statistics reported with each closed connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    pub sk_err: i32,
    pub sk_err_soft: i32,
    pub shutdown: u8,
    pub flags: SockFlags,
    /// SO_LINGER time in jiffies (0 with `flags.linger`: abortive close).
    pub linger_time: i64,
    /// A `struct socket` is attached (false once orphaned or before accept()).
    pub has_socket: bool,
    /// TCP_LINGER2 (negative: abort FIN_WAIT2 on close).
    pub linger2: i32,
    pub retransmits: u8,
    pub probes_out: u8,
    pub user_timeout_ms: u32,
    pub send_window: u32,
    pub packets_out: u32,
    /// `rcv_nxt - copied_seq`: received but not read, +1 for an unread FIN.
    pub unread_bytes: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub total_retrans: u32,
    pub srtt_us: u32,
}

impl Snapshot {
    /// Data the application never read (a pending FIN alone does not count).
    pub fn has_unread_data(&self) -> bool {
        self.unread_bytes > u32::from(self.flags.done)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetDirection {
    Sent,
    Received,
}

impl ResetDirection {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Received => "received",
        }
    }
}

/// One RST sent (`tcp_send_reset`) or received (`tcp_receive_reset`) by a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    pub timestamp_ns: u64,
    pub socket: SocketId,
    pub cookie: u64,
    pub direction: ResetDirection,
    /// The socket's state then: CLOSE means after the final transition.
    pub state: TcpState,
    /// The kernel's reason (6.10+ for sent resets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ResetReason>,
    /// The RST answers a received segment (it is not an active reset).
    #[serde(default)]
    pub answers_packet: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is too short for its kind")]
    Truncated { len: usize },
    #[error("record of unknown kind {kind}")]
    UnknownKind { kind: u32 },
    #[error("accept record of {len} bytes without a process")]
    NoOwner { len: usize },
    #[error("state record with address family {family}, neither AF_INET nor AF_INET6")]
    UnknownFamily { family: u64 },
}

/// Turns raw records into [`SocketEvent`]s using the kernel's layout.
#[derive(Clone, Debug)]
pub struct Decoder {
    fields: [FieldDecoder; SockField::COUNT],
    reset_reasons: HashMap<u32, ResetReason>,
}

/// Evidence words of a [`CloseEvent`].
type Evidence = [u64; SockField::COUNT - SockField::IDENTITY];

/// An address as the program loaded it: two words of the kernel's `in6_addr`, in memory
/// order.
fn ipv6(words: &[u64]) -> Ipv6Addr {
    let mut octets = [0; 16];
    for (chunk, word) in octets.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

impl Decoder {
    pub fn new(layout: &KernelLayout) -> Self {
        Self { fields: layout.fields, reset_reasons: layout.reset_reasons.clone() }
    }

    pub fn decode(&self, record: &[u8]) -> Result<SocketEvent, DecodeError> {
        let header: EventHeader = read_record(record)?;
        match EventKind::from_u32(header.kind) {
            Some(EventKind::State) => {
                Ok(SocketEvent::State(self.state(&read_record(record)?, None)?))
            }
            Some(EventKind::Close) => {
                let raw: CloseEvent = read_record(record)?;
                Ok(SocketEvent::State(self.state(&raw.state, Some(&raw.evidence))?))
            }
            Some(EventKind::ResetSent) => {
                Ok(SocketEvent::Reset(self.reset(&read_record(record)?, ResetDirection::Sent)))
            }
            Some(EventKind::ResetReceived) => {
                Ok(SocketEvent::Reset(self.reset(&read_record(record)?, ResetDirection::Received)))
            }
            Some(EventKind::Accepted) => {
                let raw: OwnerEvent = read_record(record)?;
                Ok(SocketEvent::Accepted(Accepted {
                    timestamp_ns: raw.header.timestamp_ns,
                    socket: raw.header.skaddr,
                    cookie: raw.header.cookie,
                    owner: Process::from_kernel(&raw.owner)
                        .ok_or(DecodeError::NoOwner { len: record.len() })?,
                }))
            }
            None => Err(DecodeError::UnknownKind { kind: header.kind }),
        }
    }

    fn state(
        &self,
        raw: &StateEvent,
        evidence: Option<&Evidence>,
    ) -> Result<StateChange, DecodeError> {
        let identity = |f: SockField| self.fields[f as usize].unsigned(raw.identity[f as usize]);
        let family = identity(SockField::Family);
        // Ports are stored in network order except skc_num; inet_sport survives unhash.
        let local_port = match u16::from_be(identity(SockField::SourcePort) as u16) {
            0 => identity(SockField::LocalPort) as u16,
            port => port,
        };
        let remote_port = u16::from_be(identity(SockField::DestinationPort) as u16);
        let (local_ip, remote_ip) = if family == u64::from(AF_INET6) {
            let (local, remote) = raw.v6_addresses.split_at(2);
            (IpAddr::V6(ipv6(local)), IpAddr::V6(ipv6(remote)))
        } else if family == u64::from(AF_INET) || family == 0 {
            let v4 = |value: u64| IpAddr::V4(Ipv4Addr::from((value as u32).to_ne_bytes()));
            (v4(identity(SockField::SourceAddr4)), v4(identity(SockField::DestinationAddr4)))
        } else {
            return Err(DecodeError::UnknownFamily { family });
        };
        Ok(StateChange {
            timestamp_ns: raw.header.timestamp_ns,
            socket: raw.header.skaddr,
            cookie: raw.header.cookie,
            netns: raw.netns,
            old: TcpState::from_kernel(raw.old_state),
            new: TcpState::from_kernel(raw.new_state),
            local: SocketAddr::new(local_ip, local_port),
            remote: SocketAddr::new(remote_ip, remote_port),
            // Only the final transition carries evidence.
            snapshot: evidence.map(|evidence| self.snapshot(evidence)).unwrap_or_default(),
            owner: Process::from_kernel(&raw.owner),
        })
    }

    /// The evidence fields, which follow the identity ones.
    fn snapshot(&self, evidence: &Evidence) -> Snapshot {
        let word = |f: SockField| {
            (f as usize).checked_sub(SockField::IDENTITY).map_or(0, |index| evidence[index])
        };
        let field = |f: SockField| self.fields[f as usize].unsigned(word(f));
        let signed = |f: SockField| self.fields[f as usize].signed(word(f));
        let receive_next = field(SockField::ReceiveNext) as u32;
        let copied = field(SockField::CopiedSeq) as u32;
        Snapshot {
            sk_err: signed(SockField::Err) as i32,
            sk_err_soft: signed(SockField::ErrSoft) as i32,
            shutdown: field(SockField::Shutdown) as u8,
            flags: SockFlags::from_kernel(field(SockField::Flags)),
            linger_time: signed(SockField::LingerTime),
            has_socket: field(SockField::Socket) != 0,
            linger2: signed(SockField::Linger2) as i32,
            retransmits: field(SockField::Retransmits) as u8,
            probes_out: field(SockField::ProbesOut) as u8,
            user_timeout_ms: field(SockField::UserTimeout) as u32,
            send_window: field(SockField::SendWindow) as u32,
            packets_out: field(SockField::PacketsOut) as u32,
            unread_bytes: receive_next.wrapping_sub(copied),
            bytes_acked: field(SockField::BytesAcked),
            bytes_received: field(SockField::BytesReceived),
            total_retrans: field(SockField::TotalRetrans) as u32,
            srtt_us: (field(SockField::SrttUs) as u32) >> 3,
        }
    }

    fn reset(&self, raw: &ResetEvent, direction: ResetDirection) -> Reset {
        let reason = match raw.reason {
            NO_REASON => None,
            value => Some(self.reset_reasons.get(&value).copied().unwrap_or(ResetReason::Other)),
        };
        Reset {
            timestamp_ns: raw.header.timestamp_ns,
            socket: raw.header.skaddr,
            cookie: raw.header.cookie,
            direction,
            state: TcpState::from_kernel(raw.state),
            reason,
            answers_packet: raw.answers_packet != 0,
        }
    }
}

/// Copies a record out of the ring (records are only 8-byte aligned by contract, and the
/// copy releases the ring slot early).
fn read_record<T: Copy>(record: &[u8]) -> Result<T, DecodeError> {
    if record.len() < size_of::<T>() {
        return Err(DecodeError::Truncated { len: record.len() });
    }
    // SAFETY: length checked; T is a plain #[repr(C)] integer struct valid for any bits.
    Ok(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use observer_common::ProgramConfig;

    use super::*;

    fn layout() -> KernelLayout {
        let mut fields = [FieldDecoder::default(); SockField::COUNT];
        for field in SockField::ALL {
            let (bits, signed) = match field {
                SockField::Family | SockField::LocalPort | SockField::SourcePort => (16, false),
                SockField::DestinationPort => (16, false),
                SockField::Err | SockField::ErrSoft | SockField::Linger2 => (32, true),
                SockField::Shutdown | SockField::Retransmits | SockField::ProbesOut => (8, false),
                SockField::LingerTime => (64, true),
                SockField::Flags | SockField::Socket | SockField::Cookie => (64, false),
                SockField::BytesAcked | SockField::BytesReceived => (64, false),
                _ => (32, false),
            };
            fields[field as usize] = FieldDecoder { present: true, shift: 0, bits, signed };
        }
        let mut reset_reasons = HashMap::new();
        reset_reasons.insert(14, ResetReason::TcpState);
        KernelLayout {
            config: ProgramConfig { valid: 1, ..ProgramConfig::UNSET },
            task_config: observer_common::TaskConfig::UNSET,
            fields,
            reset_reasons,
            missing: vec![],
        }
    }

    fn bytes<T>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain #[repr(C)] value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn header(kind: EventKind) -> EventHeader {
        EventHeader { kind: kind as u32, cpu: 1, timestamp_ns: 5, skaddr: 0xffff_0001, cookie: 9 }
    }

    fn state_event(kind: EventKind, old_state: u32, new_state: u32) -> StateEvent {
        StateEvent {
            header: header(kind),
            identity: [0; SockField::IDENTITY],
            v6_addresses: [0; 4],
            old_state,
            new_state,
            netns: 4026531840,
            _pad: 0,
            owner: observer_common::Owner::NONE,
        }
    }

    /// Sets the low `bytes.len()` bytes of an identity word (as a load of the member's
    /// width zero-extends it), keeping whatever `raw` held above them.
    fn put(raw: &mut StateEvent, field: SockField, bytes: &[u8]) {
        let word = &mut raw.identity[field as usize];
        let mut octets = word.to_ne_bytes();
        octets[..bytes.len()].copy_from_slice(bytes);
        *word = u64::from_ne_bytes(octets);
    }

    /// Writes an IPv6 address into the two words the program loads it as.
    fn put_v6(raw: &mut StateEvent, remote: bool, address: Ipv6Addr) {
        let octets = address.octets();
        let at = if remote { 2 } else { 0 };
        for (word, chunk) in raw.v6_addresses[at..at + 2].iter_mut().zip(octets.chunks_exact(8)) {
            *word = u64::from_ne_bytes(chunk.try_into().unwrap());
        }
    }

    #[test]
    fn decodes_a_close_event_with_garbage_around_each_field() {
        let mut raw = CloseEvent {
            state: state_event(EventKind::Close, 4, 7),
            evidence: [0xdead_beef_dead_0000; SockField::COUNT - SockField::IDENTITY],
        };
        raw.state.identity = [0xdead_beef_dead_0000; SockField::IDENTITY];
        raw.state.v6_addresses = [0xa5a5_a5a5_a5a5_a5a5; 4];
        put(&mut raw.state, SockField::Family, &2u16.to_ne_bytes());
        put(&mut raw.state, SockField::DestinationPort, &40000u16.to_be_bytes());
        put(&mut raw.state, SockField::SourceAddr4, &[10, 0, 0, 2]);
        put(&mut raw.state, SockField::DestinationAddr4, &[10, 0, 0, 1]);
        put(&mut raw.state, SockField::SourcePort, &8080u16.to_be_bytes());
        let set = |raw: &mut CloseEvent, field: SockField, low: u64, bits: u32| {
            let mask = if bits == 64 { u64::MAX } else { (1 << bits) - 1 };
            let word = &mut raw.evidence[field as usize - SockField::IDENTITY];
            *word = (*word & !mask) | low;
        };
        set(&mut raw, SockField::Flags, 0b1_1011, 64);
        set(&mut raw, SockField::Err, u64::from(110u32), 32);
        set(&mut raw, SockField::Linger2, u64::from((-1i32) as u32), 32);
        set(&mut raw, SockField::Shutdown, 3, 8);
        set(&mut raw, SockField::ReceiveNext, 1100, 32);
        set(&mut raw, SockField::CopiedSeq, 1000, 32);
        set(&mut raw, SockField::SrttUs, 800, 32);

        let decoded = Decoder::new(&layout()).decode(&bytes(&raw)).unwrap();
        let SocketEvent::State(change) = decoded else { panic!("not a state event") };
        assert_eq!(change.old, TcpState::FinWait1);
        assert_eq!(change.new, TcpState::Close);
        assert_eq!(change.local, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(change.remote, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(change.snapshot.sk_err, 110);
        assert_eq!(change.snapshot.linger2, -1);
        assert_eq!(change.snapshot.shutdown, 3);
        assert_eq!(
            change.snapshot.flags,
            SockFlags { dead: true, done: true, keepalive: true, linger: true }
        );
        assert_eq!(change.snapshot.unread_bytes, 100);
        assert!(change.snapshot.has_unread_data());
        assert_eq!(change.snapshot.srtt_us, 100);
        assert_eq!(change.netns, 4026531840);
    }

    #[test]
    fn a_state_event_has_no_evidence() {
        let mut raw = state_event(EventKind::State, 2, 1);
        put(&mut raw, SockField::Family, &2u16.to_ne_bytes());
        put(&mut raw, SockField::LocalPort, &45000u16.to_ne_bytes());
        let decoded = Decoder::new(&layout()).decode(&bytes(&raw)).unwrap();
        let SocketEvent::State(change) = decoded else { panic!("not a state event") };
        assert_eq!(change.new, TcpState::Established);
        // Without inet_sport (still 0 here), skc_num gives the local port.
        assert_eq!(change.local.port(), 45000);
        assert_eq!(change.snapshot, Snapshot::default());
        // A close record cut to the size of a state record is truncated, not misread.
        let mut close = bytes(&raw);
        close[..4].copy_from_slice(&(EventKind::Close as u32).to_ne_bytes());
        assert_eq!(
            Decoder::new(&layout()).decode(&close),
            Err(DecodeError::Truncated { len: size_of::<StateEvent>() })
        );
    }

    #[test]
    fn decodes_ipv6_addresses_and_resets() {
        let mut raw = state_event(EventKind::State, 1, 4);
        put(&mut raw, SockField::Family, &10u16.to_ne_bytes());
        put_v6(&mut raw, false, Ipv6Addr::LOCALHOST);
        put_v6(&mut raw, true, "fd00::2".parse().unwrap());
        let decoder = Decoder::new(&layout());
        let SocketEvent::State(change) = decoder.decode(&bytes(&raw)).unwrap() else { panic!() };
        assert_eq!(change.local.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(change.remote.ip().to_string(), "fd00::2");

        let reset = ResetEvent {
            header: header(EventKind::ResetSent),
            state: 7,
            reason: 14,
            answers_packet: 0,
            _pad: 0,
        };
        let SocketEvent::Reset(reset) = decoder.decode(&bytes(&reset)).unwrap() else { panic!() };
        assert_eq!(reset.reason, Some(ResetReason::TcpState));
        assert_eq!(reset.state, TcpState::Close);
        assert_eq!(reset.direction, ResetDirection::Sent);
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let decoder = Decoder::new(&layout());
        assert_eq!(decoder.decode(&[1, 0, 0]), Err(DecodeError::Truncated { len: 3 }));
        let header = EventHeader { kind: 99, cpu: 0, timestamp_ns: 0, skaddr: 0, cookie: 0 };
        assert_eq!(decoder.decode(&bytes(&header)), Err(DecodeError::UnknownKind { kind: 99 }));
        let short_state = bytes(&EventHeader { kind: 1, ..header });
        assert_eq!(decoder.decode(&short_state), Err(DecodeError::Truncated { len: 32 }));
    }
}
