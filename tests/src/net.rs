//! Network namespaces the tests create, and the two-host topology they use.
//!
//! Each scenario gets a fresh pair of namespaces ("client" and "server") joined by a
//! veth pair; all traffic stays inside them. Dropping a [`Pair`] deletes both
//! namespaces, and with them the veth pair.

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use nix::sched::{CloneFlags, setns};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// On the server's subnet, but no host answers for it.
pub const ABSENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const CLIENT_MAC: &str = "02:77:00:00:00:01";
const SERVER_MAC: &str = "02:77:00:00:00:02";
/// Frames sent to this address are dropped by the peer (not its MAC).
const NOWHERE_MAC: &str = "02:77:00:00:00:99";
/// The veth end in each namespace.
pub const DEVICE: &str = "veth0";

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Namespace {
    name: String,
    handle: File,
    /// The daemon's last verdict before this namespace existed: namespace inodes are
    /// reused, so only later verdicts can be about this namespace.
    pub first_seq: u64,
    /// When it was created: verdicts on connections that closed earlier belong to an
    /// older namespace that had the same inode.
    pub created_at: std::time::SystemTime,
}

impl Namespace {
    pub fn create(name: String) -> Self {
        // A leftover from an interrupted run would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let first_seq = crate::daemon::daemon().last_seq();
        let created_at = std::time::SystemTime::now();
        let handle = File::open(format!("/run/netns/{name}")).expect("open the namespace");
        let namespace = Self { name, handle, first_seq, created_at };
        namespace.ip(&["link", "set", "lo", "up"]);
        namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace inode: what the daemon reports as `netns`.
    pub fn inode(&self) -> u64 {
        self.handle.metadata().expect("stat the namespace").ino()
    }

    /// Runs `f` with this thread inside the namespace: sockets it creates live there.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let original = File::open("/proc/thread-self/ns/net").expect("own namespace");
        setns(&self.handle, CloneFlags::CLONE_NEWNET).expect("enter namespace");
        let result = f();
        setns(&original, CloneFlags::CLONE_NEWNET).expect("leave namespace");
        result
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(program);
        run("ip", &full)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// The namespace's MIB counters (`nstat -asz`): the kernel's own ground truth.
    pub fn counters(&self) -> Counters {
        let text = self.exec(&["nstat", "-a", "-s", "-z"]);
        let values = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                Some((fields.next()?.to_string(), fields.next()?.parse().ok()?))
            })
            .collect();
        Counters(values)
    }

    /// `ss -tin` output (TCP internals: rto, backoff, …) for sockets matching a filter.
    pub fn socket_details(&self, filter: &str) -> String {
        let mut args = vec!["ss", "-H", "-t", "-i", "-a", "-n"];
        args.extend(filter.split_whitespace());
        self.exec(&args)
    }

    /// `ss` state of sockets matching a filter, e.g. "dport = :7000".
    pub fn socket_states(&self, filter: &str) -> Vec<String> {
        let mut args = vec!["ss", "-H", "-t", "-a", "-n"];
        args.extend(filter.split_whitespace());
        self.exec(&args)
            .lines()
            .filter_map(|line| line.split_whitespace().next().map(str::to_string))
            .collect()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// MIB counters at one instant.
#[derive(Clone, Debug)]
pub struct Counters(HashMap<String, i64>);

impl Counters {
    pub fn get(&self, name: &str) -> i64 {
        *self.0.get(name).unwrap_or_else(|| panic!("nstat has no counter {name}"))
    }

    /// How much `name` grew from `self` to `later`.
    pub fn delta(&self, later: &Counters, name: &str) -> i64 {
        later.get(name) - self.get(name)
    }
}

/// Counts namespaces created by this process, to keep names unique.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Two hosts: `client` (10.77.0.1, fd77::1) and `server` (10.77.0.2, fd77::2), with
/// static neighbour entries so that cutting the link never turns into ARP failures.
pub struct Pair {
    pub client: Namespace,
    pub server: Namespace,
    /// CLOCK_MONOTONIC at creation, for recording fixtures.
    created_ns: u64,
}

impl Drop for Pair {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            crate::record::save(&[&self.client, &self.server], self.created_ns);
        }
    }
}

impl Pair {
    pub fn new() -> Self {
        let created_ns = crate::record::monotonic_ns();
        let id = format!("obs{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let client = Namespace::create(format!("{id}-c"));
        let server = Namespace::create(format!("{id}-s"));
        client.ip(&[
            "link",
            "add",
            DEVICE,
            "address",
            CLIENT_MAC,
            "type",
            "veth",
            "peer",
            "name",
            DEVICE,
            "address",
            SERVER_MAC,
            "netns",
            server.name(),
        ]);
        let pair = Self { client, server, created_ns };
        for (namespace, v4, v6) in
            [(&pair.client, CLIENT_V4, CLIENT_V6), (&pair.server, SERVER_V4, SERVER_V6)]
        {
            namespace.ip(&["addr", "add", &format!("{v4}/24"), "dev", DEVICE]);
            namespace.ip(&["addr", "add", &format!("{v6}/64"), "dev", DEVICE, "nodad"]);
            namespace.ip(&["link", "set", DEVICE, "up"]);
        }
        pair.point_neighbours(CLIENT_MAC, SERVER_MAC);
        pair
    }

    /// Static neighbour entries: what each side believes its peer's MAC is.
    fn point_neighbours(&self, client_mac: &str, server_mac: &str) {
        for (namespace, peer_v4, peer_v6, mac) in [
            (&self.client, SERVER_V4, SERVER_V6, server_mac),
            (&self.server, CLIENT_V4, CLIENT_V6, client_mac),
        ] {
            for peer in [IpAddr::V4(peer_v4), IpAddr::V6(peer_v6)] {
                namespace.ip(&[
                    "neigh",
                    "replace",
                    &peer.to_string(),
                    "lladdr",
                    mac,
                    "dev",
                    DEVICE,
                    "nud",
                    "permanent",
                ]);
            }
        }
    }

    /// Cuts the cable: the server's end goes down, so the client's link loses carrier
    /// and everything it sends is dropped; the server's routes go away.
    pub fn cut_cable(&self) {
        self.server.ip(&["link", "set", DEVICE, "down"]);
    }

    /// Plugs the cable back in.
    pub fn mend_cable(&self) {
        self.server.ip(&["link", "set", DEVICE, "up"]);
        self.server.ip(&["addr", "replace", &format!("{SERVER_V6}/64"), "dev", DEVICE, "nodad"]);
        self.point_neighbours(CLIENT_MAC, SERVER_MAC);
    }

    /// Silently drops everything in both directions, without touching links or routes
    /// (each side addresses its frames to a MAC the other does not have).
    pub fn black_hole(&self) {
        self.point_neighbours(NOWHERE_MAC, NOWHERE_MAC);
    }

    pub fn heal(&self) {
        self.point_neighbours(CLIENT_MAC, SERVER_MAC);
    }

    pub fn listen(&self, port: u16) -> TcpListener {
        self.listen_with_backlog(port, 128)
    }

    /// A listener whose accept queue holds `backlog` connections (past that the kernel
    /// drops SYNs and final ACKs: ListenOverflows).
    pub fn listen_with_backlog(&self, port: u16, backlog: i32) -> TcpListener {
        let socket = self
            .server
            .enter(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))
            .expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket.bind(&SocketAddr::from((SERVER_V4, port)).into()).expect("bind");
        socket.listen(backlog).expect("listen");
        socket.into()
    }

    /// An established IPv4 connection: (client's stream, server's accepted stream).
    pub fn connect(&self, port: u16) -> (TcpStream, TcpStream) {
        let listener = self.listen(port);
        let client = self.client.enter(|| TcpStream::connect((SERVER_V4, port))).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    pub fn server_addr(port: u16) -> SocketAddr {
        SocketAddr::from((SERVER_V4, port))
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}
