//! The kernel's socket-diag netlink interface, as `ss` uses it: one dump lists every TCP
//! socket of the calling thread's network namespace, both families.

use std::{io, net::SocketAddr, time::Duration};

use netlink_packet_core::{
    DecodeError, Emitable as _, ErrorBuffer, ErrorMessage, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NlasIterator, Parseable as _,
};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetResponseHeader};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use crate::tcp::TcpState;

/// One socket as socket-diag reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct DiagSocket {
    /// Request sockets (NEW_SYN_RECV) are reported as SYN_RECV, as `ss` shows them.
    pub state: TcpState,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Socket cookie: the value `bpf_get_socket_cookie` gives the same socket.
    pub cookie: u64,
    /// Socket inode (0 for TIME_WAIT and request sockets, which have no file).
    pub inode: u32,
    pub stats: Option<TcpStats>,
    /// For a TIME_WAIT socket, the time left on its timewait timer.
    pub time_wait_left: Option<Duration>,
}

/// `struct inet_diag_msg` (include/uapi/linux/inet_diag.h): `idiag_timer` at byte 2
/// (3 = the timewait timer) and `idiag_expires` (milliseconds left) at byte 52. Read
/// from the raw message: netlink-packet-sock-diag drops the expiry of this timer.
fn time_wait_left(message: &[u8]) -> Option<Duration> {
    const TIMER_AT: usize = 2;
    const EXPIRES_AT: usize = 52;
    const TIMEWAIT_TIMER: u8 = 3;
    if *message.get(TIMER_AT)? != TIMEWAIT_TIMER {
        return None;
    }
    let expires = message.get(EXPIRES_AT..EXPIRES_AT + 4)?;
    Some(Duration::from_millis(u64::from(u32::from_ne_bytes(expires.try_into().ok()?))))
}

/// Counters from the socket's `struct tcp_info` (stable uapi layout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub total_retrans: u32,
    pub srtt_us: u32,
}

impl TcpStats {
    /// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h), unchanged since 4.x.
    fn parse(info: &[u8]) -> Option<Self> {
        let u32_at = |at: usize| Some(u32::from_ne_bytes(info.get(at..at + 4)?.try_into().ok()?));
        let u64_at = |at: usize| Some(u64::from_ne_bytes(info.get(at..at + 8)?.try_into().ok()?));
        Some(Self {
            srtt_us: u32_at(68)?,
            total_retrans: u32_at(100)?,
            bytes_acked: u64_at(120)?,
            bytes_received: u64_at(128)?,
        })
    }
}

/// How much of each socket a dump asks the kernel for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Identity and state: enough for counts and ages.
    StatesOnly,
    /// Also `tcp_info` (bytes, retransmits, RTT), for `/connections`.
    WithCounters,
}

/// Hands every TCP socket of the calling thread's network namespace, both families, to
/// `visit`.
///
/// Asked with the original inet_diag request (`TCPDIAG_GETSOCK`), which the kernel still
/// answers and which lists both families in one walk of its socket tables; the
/// per-family `SOCK_DIAG_BY_FAMILY` request `ss` uses walks them once per family. The
/// tables are shared by every namespace, so each walk passes every socket of the host:
/// with 100 000 sockets this halves the inventory's cost. Answers are the same
/// `inet_diag_msg` records either way.
pub fn dump_tcp_sockets(detail: Detail, mut visit: impl FnMut(DiagSocket)) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    socket.send(&dump_request(detail), 0)?;

    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkBuffer::new_checked(&receive[offset..size]).map_err(invalid)?;
            let length = message.length() as usize;
            match message.message_type() {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let error = ErrorBuffer::new_checked(&message.payload())
                        .and_then(|buffer| ErrorMessage::parse(&buffer))
                        .map_err(invalid)?;
                    if let Some(code) = error.code {
                        return Err(io::Error::from_raw_os_error(-code.get()));
                    }
                }
                TCPDIAG_GETSOCK => visit(parse_socket(message.payload(), detail)?),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// The original inet_diag request (`TCPDIAG_GETSOCK` with a `struct inet_diag_req`).
const TCPDIAG_GETSOCK: u16 = 18;
/// `struct inet_diag_req` (include/uapi/linux/inet_diag.h): family, source and
/// destination prefix lengths, extensions (one byte each), the 48-byte socket id (all
/// zero: no filter), the states (u32), and `idiag_dbs` (u32, unused).
const INET_DIAG_REQ_LEN: usize = 60;
const INET_DIAG_REQ_EXT_AT: usize = 3;
const INET_DIAG_REQ_STATES_AT: usize = 52;
/// `struct inet_diag_msg`, after which come the attributes.
const INET_DIAG_MSG_LEN: usize = 72;
/// The attribute carrying `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;

/// All states `ss -a` asks for, TCP_ESTABLISHED (1) to TCP_BOUND_INACTIVE (13).
const ALL_STATES: u32 = (1 << 14) - 2;

fn dump_request(detail: Detail) -> Vec<u8> {
    let mut body = [0u8; INET_DIAG_REQ_LEN];
    body[INET_DIAG_REQ_EXT_AT] = match detail {
        Detail::StatesOnly => 0,
        Detail::WithCounters => ExtensionFlags::INFO.bits(),
    };
    body[INET_DIAG_REQ_STATES_AT..INET_DIAG_REQ_STATES_AT + 4]
        .copy_from_slice(&ALL_STATES.to_ne_bytes());
    let mut header = NetlinkHeader::default();
    header.message_type = TCPDIAG_GETSOCK;
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.length = (header.buffer_len() + body.len()) as u32;
    let mut request = vec![0u8; header.length as usize];
    header.emit(&mut request);
    request[header.buffer_len()..].copy_from_slice(&body);
    request
}

/// One `struct inet_diag_msg` and its attributes; `tcp_info` only if it was asked for.
fn parse_socket(payload: &[u8], detail: Detail) -> io::Result<DiagSocket> {
    let header = InetResponseHeader::parse(payload).map_err(invalid)?;
    let id = &header.socket_id;
    let stats = match detail {
        Detail::StatesOnly => None,
        Detail::WithCounters => payload.get(INET_DIAG_MSG_LEN..).and_then(|attributes| {
            NlasIterator::new(attributes)
                .flatten()
                .find(|nla| nla.kind() == INET_DIAG_INFO)
                .and_then(|nla| TcpStats::parse(nla.value()))
        }),
    };
    let state = match TcpState::from_kernel(u32::from(header.state)) {
        TcpState::NewSynRecv => TcpState::SynRecv,
        state => state,
    };
    Ok(DiagSocket {
        state,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        cookie: u64::from_ne_bytes(id.cookie),
        inode: header.inode,
        stats,
        time_wait_left: time_wait_left(payload),
    })
}

fn invalid(error: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        time::Instant,
    };

    use super::*;
    use crate::inventory::TIME_WAIT_LENGTH;

    /// Needs no privilege: dumping one's own namespace is allowed to everyone.
    #[test]
    fn lists_a_connection_of_our_own() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let mut sockets = Vec::new();
        dump_tcp_sockets(Detail::WithCounters, |socket| sockets.push(socket))
            .expect("sock_diag dump");
        let local = client.local_addr().unwrap();
        // By both ends: TIME_WAIT leftovers of other connections may share the local port.
        let remote = listener.local_addr().unwrap();
        let found =
            sockets.iter().find(|s| s.local == local && s.remote == remote).expect("our client");
        assert_eq!(found.state, TcpState::Established);
        assert_ne!(found.cookie, 0);
        assert!(found.stats.is_some());
        assert!(
            sockets
                .iter()
                .any(|s| s.state == TcpState::Listen && s.local == listener.local_addr().unwrap())
        );
    }

    /// One dump lists both families.
    #[test]
    fn lists_ipv6_sockets_in_the_same_dump() {
        let listener = TcpListener::bind("[::1]:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let v4_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sockets = Vec::new();
        dump_tcp_sockets(Detail::StatesOnly, |socket| sockets.push(socket))
            .expect("sock_diag dump");
        let (local, remote) = (client.local_addr().unwrap(), listener.local_addr().unwrap());
        assert!(sockets.iter().any(|s| s.local == local && s.remote == remote));
        assert!(sockets.iter().any(|s| s.local == v4_listener.local_addr().unwrap()));
        assert!(sockets.iter().all(|s| s.stats.is_none()), "tcp_info was not asked for");
    }

    /// The timewait timer's expiry, which the netlink crate drops, read from the raw
    /// message of a real TIME_WAIT socket.
    #[test]
    fn a_time_wait_socket_shows_its_timer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (local, remote) = (client.local_addr().unwrap(), listener.local_addr().unwrap());
        // The client closes first, so it is the one left in TIME_WAIT.
        drop(client);
        drop(server);
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let mut found = None;
            dump_tcp_sockets(Detail::StatesOnly, |socket| {
                // The whole 4-tuple: an older TIME_WAIT socket of another connection
                // from the same local port (host namespace, any earlier test's traffic)
                // has less time left.
                if socket.local == local
                    && socket.remote == remote
                    && socket.state == TcpState::TimeWait
                {
                    found = Some(socket);
                }
            })
            .expect("sock_diag dump");
            match found {
                Some(socket) => break socket,
                None if Instant::now() < deadline => std::thread::yield_now(),
                None => panic!("{local} never reached TIME_WAIT"),
            }
        };
        let left = found.time_wait_left.expect("a timewait timer");
        assert!(
            left <= TIME_WAIT_LENGTH && left > TIME_WAIT_LENGTH - Duration::from_secs(10),
            "{left:?} left on the timewait timer of {local} -> {remote}"
        );
    }

    #[test]
    fn only_the_timewait_timer_is_read() {
        let mut message = [0u8; 72];
        message[52..56].copy_from_slice(&1500u32.to_ne_bytes());
        message[2] = 3;
        assert_eq!(time_wait_left(&message), Some(Duration::from_millis(1500)));
        message[2] = 1; // the retransmission timer
        assert_eq!(time_wait_left(&message), None);
        message[2] = 3;
        assert_eq!(time_wait_left(&message[..40]), None, "a truncated message");
    }

    #[test]
    fn parses_tcp_info_counters() {
        let mut info = vec![0u8; 232];
        info[68..72].copy_from_slice(&1234u32.to_ne_bytes());
        info[100..104].copy_from_slice(&3u32.to_ne_bytes());
        info[120..128].copy_from_slice(&1000u64.to_ne_bytes());
        info[128..136].copy_from_slice(&2000u64.to_ne_bytes());
        let stats = TcpStats::parse(&info).unwrap();
        assert_eq!(
            stats,
            TcpStats { srtt_us: 1234, total_retrans: 3, bytes_acked: 1000, bytes_received: 2000 }
        );
        assert_eq!(TcpStats::parse(&info[..100]), None);
    }
}
