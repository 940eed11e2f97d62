//! Every TCP socket of every network namespace on the host, as the kernel's socket-diag
//! netlink interface lists them — the same source and the same counts as `ss -tan`.
//!
//! The tracepoint never shows TIME_WAIT sockets (they are mini-sockets, not `struct
//! sock`) nor sockets that existed before the daemon started, so the live state counts
//! come from here, not from counting transitions. A dump runs on a short-lived thread
//! that enters each namespace in turn (`setns` changes only the calling thread, and a
//! netlink socket answers for the namespace it was created in); the thread then exits,
//! so no other thread ever runs in a foreign namespace and no namespace is kept alive.
//!
//! Namespaces seen: the daemon's own, the named ones under `/run/netns`, and those of
//! every running process (`/proc/<pid>/ns/net`), deduplicated by inode.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    io,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use netlink_packet_core::{
    DecodeError, Emitable as _, ErrorBuffer, ErrorMessage, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NlasIterator, Parseable as _,
};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetResponseHeader};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use crate::{classify::Role, tcp::TcpState};

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

/// How long a socket stays in TIME_WAIT: the kernel's `TCP_TIMEWAIT_LEN`, a constant
/// (not a sysctl) on every kernel we support. The timer restarts at this length when
/// the peer retransmits its FIN.
const TIME_WAIT_LENGTH: Duration = Duration::from_secs(60);

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

/// The sockets of one network namespace.
#[derive(Clone, Debug, Default)]
pub struct NamespaceSockets {
    /// Inode of the namespace (as in `readlink /proc/PID/ns/net`).
    pub netns: u32,
    pub sockets: Vec<DiagSocket>,
}

impl NamespaceSockets {
    /// The service port of a socket: its local port if something in this namespace
    /// listens on it (the server side), else the remote one.
    pub fn service_port(&self, listening: &HashSet<u16>, socket: &DiagSocket) -> u16 {
        service_port(listening, socket.local.port(), socket.remote.port())
    }

    /// What a dump alone tells of a socket's role: on a port this namespace listens on,
    /// it is the server side (a child of that listener); talking to a listener of this
    /// same namespace over loopback, the client. Anything else is unknown.
    pub fn role(&self, listening: &HashSet<u16>, socket: &DiagSocket) -> Role {
        if socket.state == TcpState::Listen {
            Role::Unknown
        } else if listening.contains(&socket.local.port()) {
            Role::Server
        } else if socket.remote.ip().is_loopback() && listening.contains(&socket.remote.port()) {
            Role::Client
        } else {
            Role::Unknown
        }
    }

    pub fn listening_ports(&self) -> HashSet<u16> {
        self.sockets
            .iter()
            .filter(|s| s.state == TcpState::Listen)
            .map(|s| s.local.port())
            .collect()
    }
}

/// See [`NamespaceSockets::service_port`].
fn service_port(listening: &HashSet<u16>, local: u16, remote: u16) -> u16 {
    if listening.contains(&local) { local } else { remote }
}

/// What the metrics need of one namespace: counts and oldest age per state, and the
/// CLOSE_WAIT sockets' ages by service port. Kept instead of the sockets themselves,
/// which may be hundreds of thousands (TIME_WAIT under churn).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceSummary {
    pub netns: u32,
    /// state → (sockets, seconds the oldest has been in it).
    pub states: BTreeMap<TcpState, (u64, f64)>,
    /// (service port, seconds in CLOSE_WAIT) of each CLOSE_WAIT socket.
    pub close_wait_ages: Vec<(u16, f64)>,
}

impl NamespaceSummary {
    /// Summarises a listing, given each socket's age.
    pub fn of(namespace: &NamespaceSockets, mut age: impl FnMut(&DiagSocket) -> f64) -> Self {
        let mut tally = Tally::new(namespace.netns);
        for socket in &namespace.sockets {
            tally.add(socket, age(socket));
        }
        tally.finish()
    }
}

/// A [`NamespaceSummary`] built while the namespace is being listed, so that its
/// sockets need not be kept.
struct Tally {
    summary: NamespaceSummary,
    listening: HashSet<u16>,
    /// (local port, remote port, seconds in CLOSE_WAIT) of each CLOSE_WAIT socket: which
    /// port is the service is known once all the listeners have been seen.
    close_wait: Vec<(u16, u16, f64)>,
}

impl Tally {
    fn new(netns: u32) -> Self {
        Self {
            summary: NamespaceSummary { netns, ..NamespaceSummary::default() },
            listening: HashSet::new(),
            close_wait: Vec::new(),
        }
    }

    fn add(&mut self, socket: &DiagSocket, age: f64) {
        let entry = self.summary.states.entry(socket.state).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(age);
        match socket.state {
            TcpState::Listen => {
                self.listening.insert(socket.local.port());
            }
            TcpState::CloseWait => {
                self.close_wait.push((socket.local.port(), socket.remote.port(), age));
            }
            _ => {}
        }
    }

    fn finish(mut self) -> NamespaceSummary {
        self.summary.close_wait_ages = self
            .close_wait
            .into_iter()
            .map(|(local, remote, age)| (service_port(&self.listening, local, remote), age))
            .collect();
        self.summary
    }
}

/// The inventory as the metrics see it.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub namespaces: Vec<NamespaceSummary>,
    /// Namespaces that could not be entered or dumped.
    pub failures: u64,
}

/// Socket counts of every namespace, refreshed on demand, and when each socket was
/// first seen in its current state.
///
/// A TIME_WAIT socket's age is what its timewait timer has run (the kernel knows it;
/// under churn they are most of the host's sockets, so none of them is remembered).
/// Other ages are measured from the first dump that showed the socket in that state, so
/// they are exact to the refresh interval for sockets that changed state while the
/// daemon ran, and lower bounds (time since the daemon's first dump) for older ones.
pub struct Inventory {
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    taken_at: Option<Instant>,
    /// How long the latest listing took.
    took: Duration,
    latest: Arc<Summary>,
    /// netns → socket cookie → when the socket was first seen in its state. Updated in
    /// place (not rebuilt) at each refresh: there may be hundreds of thousands of sockets.
    first_seen: HashMap<u32, HashMap<u64, Seen, foldhash::fast::RandomState>>,
    /// Flipped at each refresh; entries it did not mark were not listed again.
    parity: bool,
}

/// A socket's entry in [`State::first_seen`], in one word: its state (4 bits), the
/// parity of the refresh that last listed it (1 bit), and since when it has been in that
/// state (milliseconds after [`Inventory`]'s start, 59 bits).
#[derive(Clone, Copy, Debug)]
struct Seen(u64);

impl Seen {
    const SINCE_BITS: u32 = 59;
    const SINCE_MASK: u64 = (1 << Self::SINCE_BITS) - 1;

    fn new(state: TcpState, parity: bool, since_ms: u64) -> Self {
        Self(
            (state as u64) << (Self::SINCE_BITS + 1)
                | u64::from(parity) << Self::SINCE_BITS
                | since_ms & Self::SINCE_MASK,
        )
    }

    fn state(self) -> TcpState {
        TcpState::ALL[(self.0 >> (Self::SINCE_BITS + 1)) as usize]
    }

    fn parity(self) -> bool {
        self.0 >> Self::SINCE_BITS & 1 == 1
    }

    fn since_ms(self) -> u64 {
        self.0 & Self::SINCE_MASK
    }
}

impl Default for Inventory {
    fn default() -> Self {
        Self::new()
    }
}

/// A listing is reused for at least this many times as long as it took.
const COST_LIMIT: u32 = 20;

/// How long a listing that took `took` is reused at least: listing every socket of a
/// host costs ~0.3 µs per socket and namespace (the kernel walks all its sockets for each
/// namespace), so with millions of them scrapes would otherwise keep a core busy. This
/// keeps the inventory under 1/[`COST_LIMIT`] of a core, whatever the host holds.
pub fn reuse_time(took: Duration) -> Duration {
    took * COST_LIMIT
}

impl Inventory {
    pub fn new() -> Self {
        Self { started: Instant::now(), state: Mutex::new(State::default()) }
    }

    /// The latest summary, taken anew if it is older than `max_age` and than its
    /// [`reuse_time`] (blocking: call from a blocking thread). Sockets are counted as the
    /// kernel lists them, never kept all at once.
    pub fn refresh(&self, max_age: Duration) -> Arc<Summary> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let reuse_for = max_age.max(reuse_time(state.took));
        if state.taken_at.is_some_and(|at| at.elapsed() < reuse_for) {
            return Arc::clone(&state.latest);
        }
        let now = Instant::now();
        let now_ms = now.duration_since(self.started).as_millis() as u64;
        state.parity = !state.parity;
        let parity = state.parity;
        let first_seen = &mut state.first_seen;
        let mut namespaces = Vec::new();
        let failures = for_each_namespace(Detail::StatesOnly, |netns, namespace| {
            let seen = first_seen.entry(netns).or_default();
            let mut tally = Tally::new(netns);
            namespace.list(|socket| {
                let age_ms = match socket.time_wait_left {
                    Some(left) if socket.state == TcpState::TimeWait => {
                        TIME_WAIT_LENGTH.saturating_sub(left).as_millis() as u64
                    }
                    _ => {
                        let entry = seen.entry(socket.cookie).or_insert(Seen::new(
                            socket.state,
                            parity,
                            now_ms,
                        ));
                        let since =
                            if entry.state() == socket.state { entry.since_ms() } else { now_ms };
                        *entry = Seen::new(socket.state, parity, since);
                        now_ms.saturating_sub(since)
                    }
                };
                tally.add(&socket, age_ms as f64 / 1000.0);
            })?;
            namespaces.push(tally.finish());
            Ok(())
        });
        first_seen.retain(|_, seen| {
            seen.retain(|_, entry| entry.parity() == parity);
            // Give back what a burst of sockets (TIME_WAIT under churn) made it grow to.
            if seen.capacity() > 4 * seen.len().max(1024) {
                seen.shrink_to(2 * seen.len());
            }
            !seen.is_empty()
        });
        state.latest = Arc::new(Summary { namespaces, failures });
        state.taken_at = Some(now);
        state.took = now.elapsed();
        log::debug!(
            "socket inventory: {} sockets in {} namespaces listed in {:?}",
            state
                .latest
                .namespaces
                .iter()
                .flat_map(|n| n.states.values())
                .map(|s| s.0)
                .sum::<u64>(),
            state.latest.namespaces.len(),
            state.took
        );
        crate::memory::release_freed_heap();
        Arc::clone(&state.latest)
    }

    /// The latest summary without refreshing.
    pub fn latest(&self) -> Arc<Summary> {
        Arc::clone(&self.state.lock().unwrap_or_else(PoisonError::into_inner).latest)
    }
}

/// Every socket of every namespace, listed now (blocking).
pub fn list_all() -> Vec<NamespaceSockets> {
    let mut namespaces = Vec::new();
    for_each_namespace(Detail::WithCounters, |netns, namespace| {
        let mut sockets = Vec::new();
        namespace.list(|socket| sockets.push(socket))?;
        namespaces.push(NamespaceSockets { netns, sockets });
        Ok(())
    });
    namespaces
}

/// Network namespaces visible from here: (inode, a path that opens it).
pub fn network_namespaces() -> Vec<(u32, PathBuf)> {
    let mut candidates = vec![PathBuf::from("/proc/self/ns/net")];
    for directory in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(directory) {
            candidates.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                candidates.push(entry.path().join("ns/net"));
            }
        }
    }
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter_map(|path| {
            // Processes come and go, and named namespaces are removed: skip what vanished.
            let inode = std::fs::metadata(&path).ok()?.ino() as u32;
            seen.insert(inode).then_some((inode, path))
        })
        .collect()
}

/// One network namespace, ready to be listed from the inventory thread.
struct Namespace<'a> {
    path: &'a Path,
    detail: Detail,
}

impl Namespace<'_> {
    /// Enters the namespace and hands each of its sockets to `visit` as the kernel lists
    /// them.
    fn list(self, visit: impl FnMut(DiagSocket)) -> io::Result<()> {
        let namespace = File::open(self.path)?;
        nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)?;
        dump_tcp_sockets(self.detail, visit)
    }
}

/// Hands each namespace in turn to `visit` (with its inode) on a thread of its own (see
/// the module documentation); returns how many namespaces could not be listed.
fn for_each_namespace(
    detail: Detail,
    mut visit: impl FnMut(u32, Namespace<'_>) -> io::Result<()> + Send,
) -> u64 {
    std::thread::scope(|scope| {
        let dumper =
            std::thread::Builder::new().name("inventory".into()).spawn_scoped(scope, move || {
                let mut failures = 0;
                for (netns, path) in network_namespaces() {
                    if let Err(error) = visit(netns, Namespace { path: &path, detail }) {
                        log::debug!("cannot list the sockets of {}: {error}", path.display());
                        failures += 1;
                    }
                }
                failures
            });
        match dumper.map(|thread| thread.join()) {
            Ok(Ok(failures)) => failures,
            _ => {
                log::warn!("the socket inventory thread failed");
                1
            }
        }
    })
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
    use std::net::{TcpListener, TcpStream};

    use super::*;

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
    fn a_listing_is_reused_in_proportion_to_its_cost() {
        assert_eq!(reuse_time(Duration::from_millis(2)), Duration::from_millis(40));
        assert_eq!(reuse_time(Duration::from_millis(100)), Duration::from_secs(2));
        let inventory = Inventory::new();
        let started = Instant::now();
        let first = inventory.refresh(Duration::ZERO);
        let took = inventory.state.lock().unwrap().took;
        assert!(took > Duration::ZERO);
        // Asked again at once with no age allowed: reused, unless its reuse time passed.
        let second = inventory.refresh(Duration::ZERO);
        assert!(Arc::ptr_eq(&first, &second) || started.elapsed() >= reuse_time(took));
    }

    #[test]
    fn first_seen_entries_keep_their_parts() {
        for state in TcpState::ALL {
            for parity in [false, true] {
                for since_ms in [0, 1, 86_400_000 * 365 * 100] {
                    let seen = Seen::new(state, parity, since_ms);
                    assert_eq!(
                        (seen.state(), seen.parity(), seen.since_ms()),
                        (state, parity, since_ms)
                    );
                }
            }
        }
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
