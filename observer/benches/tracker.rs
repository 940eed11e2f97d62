//! Speed and memory of the userspace pipeline (decoded events → tracker → verdicts),
//! on synthetic connection lifecycles shaped like the recorded kernel streams.
//!
//! `cargo xtask bench` (or `cargo bench -p observer --bench tracker`) prints:
//! * throughput: events per second through `Tracker::ingest` + classification;
//! * memory per tracked live socket (heap bytes, counted by a wrapping allocator);
//! * heap under churn: millions of connections through a small table, a tenth of them
//!   with their final event lost, must stay flat (bounded by the table, not the churn);
//! * the decoder: time per ring-buffer record, for the two record kinds of a transition
//!   (with this kernel's BTF layout; skipped without one).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::SocketAddr,
    num::NonZeroUsize,
    sync::atomic::{AtomicIsize, Ordering},
    time::Instant,
};

use observer::{
    capture::decode::{Decoder, Snapshot, SocketEvent, StateChange},
    inventory::{Detail, Inventory, Summary, dump_tcp_sockets},
    kernel::layout::KernelLayout,
    owner::{Comm, Process},
    tcp::{SockFlags, TcpState},
    track::Tracker,
};

/// Counts live heap bytes.
struct Counting;

static HEAP: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now =
            HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed) + layout.size() as isize;
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap() -> isize {
    HEAP.load(Ordering::Relaxed)
}

fn change(socket: u64, ts: u64, old: TcpState, new: TcpState, snapshot: Snapshot) -> SocketEvent {
    SocketEvent::State(StateChange {
        timestamp_ns: ts,
        socket,
        cookie: socket,
        netns: 4026531840,
        old,
        new,
        local: SocketAddr::from(([10, 0, 0, 1], (socket % 60000) as u16 + 1024)),
        remote: SocketAddr::from(([10, 0, 0, 2], 443)),
        snapshot,
        // connect() and close() name the process, as in the kernel.
        owner: matches!(new, TcpState::SynSent | TcpState::FinWait1).then_some(Process {
            pid: 4242,
            tid: 4242,
            comm: Comm::from("client"),
            cgroup_id: 1,
        }),
    })
}

/// The five transitions of an actively closed client connection.
fn lifecycle(socket: u64, start: u64, with_close: bool, out: &mut Vec<SocketEvent>) {
    use TcpState::*;
    let orphan = Snapshot {
        shutdown: 3,
        flags: SockFlags { dead: true, ..SockFlags::default() },
        bytes_acked: 100,
        bytes_received: 200,
        ..Snapshot::default()
    };
    out.push(change(socket, start, Close, SynSent, Snapshot::default()));
    out.push(change(socket, start + 1_000, SynSent, Established, Snapshot::default()));
    out.push(change(socket, start + 2_000, Established, FinWait1, Snapshot::default()));
    out.push(change(socket, start + 3_000, FinWait1, FinWait2, orphan));
    if with_close {
        out.push(change(socket, start + 3_000, FinWait2, Close, orphan));
    }
}

fn throughput() {
    const CONNECTIONS: u64 = 200_000;
    let mut events = Vec::with_capacity(CONNECTIONS as usize * 5);
    for i in 0..CONNECTIONS {
        // Sockets are reused like slab memory: a small set of addresses.
        lifecycle(0xffff_8880_0000_0000 + (i % 4096) * 4096, i * 10_000, true, &mut events);
    }
    let mut tracker = Tracker::new(NonZeroUsize::new(262_144).unwrap());
    let mut decided = Vec::new();
    let mut verdicts = 0usize;
    let started = Instant::now();
    for (index, event) in events.iter().enumerate() {
        tracker.ingest(event, &mut decided);
        if index % 1024 == 0 {
            tracker.expire(event_time(event), &mut decided);
            verdicts += decided.len();
            black_box(decided.drain(..).count());
        }
    }
    tracker.flush(&mut decided);
    verdicts += decided.len();
    let elapsed = started.elapsed();
    println!(
        "throughput: {} events, {verdicts} verdicts in {elapsed:.2?}: {:.0} ns/event, {:.2} M events/s",
        events.len(),
        elapsed.as_nanos() as f64 / events.len() as f64,
        events.len() as f64 / elapsed.as_secs_f64() / 1e6
    );
    assert_eq!(verdicts, CONNECTIONS as usize);
}

fn event_time(event: &SocketEvent) -> u64 {
    match event {
        SocketEvent::State(change) => change.timestamp_ns,
        SocketEvent::Reset(reset) => reset.timestamp_ns,
        SocketEvent::Accepted(accepted) => accepted.timestamp_ns,
    }
}

fn memory_per_socket() {
    const SOCKETS: u64 = 100_000;
    let before = heap();
    let mut tracker = Tracker::new(NonZeroUsize::new(SOCKETS as usize).unwrap());
    let mut decided = Vec::new();
    let mut events = Vec::new();
    for i in 0..SOCKETS {
        events.clear();
        lifecycle(0x1000 + i * 4096, i, false, &mut events);
        // Established and idle: the first two transitions.
        for event in &events[..2] {
            tracker.ingest(event, &mut decided);
        }
    }
    let per_socket = (heap() - before) as f64 / SOCKETS as f64;
    println!("memory: {SOCKETS} live established sockets tracked, {per_socket:.0} heap bytes each");
    black_box(&tracker);
}

fn bounded_under_churn() {
    const CAPACITY: usize = 10_000;
    const CONNECTIONS: u64 = 2_000_000;
    let mut tracker = Tracker::new(NonZeroUsize::new(CAPACITY).unwrap());
    let mut decided = Vec::new();
    let mut events = Vec::new();
    let mut heap_at_quarter = 0;
    let base = heap();
    PEAK.store(base, Ordering::Relaxed);
    for i in 0..CONNECTIONS {
        events.clear();
        // One connection in ten loses its final event (as when the ring overflows), so
        // its entry is never settled by a verdict and must be evicted.
        lifecycle(0x1000 + i * 4096, i * 1_000, i % 10 != 0, &mut events);
        for event in &events {
            tracker.ingest(event, &mut decided);
        }
        if i % 256 == 0 {
            tracker.expire(i * 1_000, &mut decided);
            decided.clear();
        }
        if i == CONNECTIONS / 4 {
            heap_at_quarter = heap() - base;
        }
    }
    let heap_at_end = heap() - base;
    let stats = tracker.stats();
    println!(
        "churn: {CONNECTIONS} connections through a {CAPACITY}-socket table, 10% without a \
         final event: heap {:.1} MiB after 1/4, {:.1} MiB at the end (peak {:.1} MiB); \
         {} evicted undecided",
        heap_at_quarter as f64 / 1048576.0,
        heap_at_end as f64 / 1048576.0,
        (PEAK.load(Ordering::Relaxed) - base) as f64 / 1048576.0,
        stats.evicted
    );
    assert!(tracker.len() <= CAPACITY);
    assert!(
        (heap_at_end as f64) < 1.5 * heap_at_quarter as f64,
        "heap grew with churn: {heap_at_quarter} -> {heap_at_end}"
    );
}

/// Heap the socket inventory keeps per kernel socket (first-seen times), and at the peak
/// of its first refresh (the table growing), with real loopback connections in this
/// process's namespace.
fn inventory_memory() {
    const CONNECTIONS: usize = 5_000;
    let limit = libc::rlimit { rlim_cur: 65536, rlim_max: 65536 };
    // SAFETY: plain syscall with a valid pointer; failure only limits the bench.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let address = listener.local_addr().unwrap();
    let mut connections = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let client = std::net::TcpStream::connect(address).expect("connect");
        connections.push((client, listener.accept().expect("accept").0));
    }
    let inventory = Inventory::new();
    let before = heap();
    PEAK.store(before, Ordering::Relaxed);
    let summary = inventory.refresh(std::time::Duration::ZERO);
    let time_wait = |summary: &Summary| -> u64 {
        summary
            .namespaces
            .iter()
            .filter_map(|n| n.states.get(&TcpState::TimeWait))
            .map(|s| s.0)
            .sum()
    };
    // TIME_WAIT sockets left by earlier runs cost nothing (see below): not counted here.
    let sockets: u64 = summary
        .namespaces
        .iter()
        .flat_map(|n| n.states.values())
        .map(|(count, _)| count)
        .sum::<u64>()
        - time_wait(&summary);
    let kept = (heap() - before) as f64 / sockets as f64;
    let peak = (PEAK.load(Ordering::Relaxed) - before) as f64 / sockets as f64;
    println!(
        "inventory: {sockets} kernel sockets (not TIME_WAIT) in {} namespaces: {kept:.0} heap bytes \
         each kept (first-seen times), {peak:.0} at the peak of the first refresh (sockets \
         counted as listed)",
        summary.namespaces.len()
    );
    black_box(&summary);

    // The same connections ended by the clients: TIME_WAIT sockets, whose ages the
    // kernel's timewait timer gives, so nothing is kept for them.
    for (client, server) in connections {
        drop(client);
        drop(server);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut listed = 0;
        dump_tcp_sockets(Detail::StatesOnly, |socket| {
            listed += u64::from(socket.state == TcpState::TimeWait);
        })
        .expect("sock_diag dump");
        if listed >= CONNECTIONS as u64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the clients never reached TIME_WAIT");
    }
    let inventory = Inventory::new();
    let before = heap();
    let summary = inventory.refresh(std::time::Duration::ZERO);
    let kept = (heap() as f64 - before as f64) / time_wait(&summary) as f64;
    println!(
        "inventory: {} TIME_WAIT sockets: {kept:.0} heap bytes each kept (ages from the kernel's timer)",
        time_wait(&summary)
    );
}

/// Time per record through `Decoder::decode`, records laid out in the ring's alignment
/// (8 bytes) as the kernel writes them: a mid-connection transition and a final one.
fn decoding() {
    use observer_common::{CloseEvent, EventKind, StateEvent};
    let Ok(layout) = KernelLayout::from_running_kernel() else {
        println!("decoder: skipped (no kernel BTF to take the layout from)");
        return;
    };
    let decoder = Decoder::new(&layout);
    for (name, kind, size) in [
        ("state", EventKind::State, size_of::<StateEvent>()),
        ("close", EventKind::Close, size_of::<CloseEvent>()),
    ] {
        // Held in u64 words: the ring's 8-byte alignment. AF_INET, all else zero.
        let mut words = vec![0u64; size / 8];
        // SAFETY: viewing initialised u64s as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
        };
        bytes[..4].copy_from_slice(&(kind as u32).to_ne_bytes());
        // The family is the first identity word, right after the header.
        let at = size_of::<observer_common::EventHeader>();
        bytes[at..at + 2].copy_from_slice(&2u16.to_ne_bytes());
        let bytes = &*bytes;
        let rounds = 2_000_000;
        let start = Instant::now();
        for _ in 0..rounds {
            black_box(decoder.decode(black_box(bytes)).expect("decodes"));
        }
        let ns = start.elapsed().as_nanos() as f64 / rounds as f64;
        println!("decoder: {ns:.1} ns per {name} record ({size} bytes)");
    }
}

fn main() {
    decoding();
    throughput();
    memory_per_socket();
    bounded_under_churn();
    inventory_memory();
}
