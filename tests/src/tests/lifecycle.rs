//! Start, stop, crash, restart: nothing of ours stays loaded in the kernel.
//!
//! Other observer daemons (the shared one, other test runs on the host) load programs
//! with the same names at the same time, so a daemon's own programs, maps and links are
//! identified by the kernel IDs its file descriptors hold while it runs.

use std::{
    collections::BTreeSet,
    net::TcpStream,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use crate::{
    daemon::{Daemon, daemon, wait_until},
    net::{Pair, run},
    sock,
};

/// The BPF objects a process holds: (programs, maps, links), by kernel ID.
#[derive(Debug, Default, PartialEq)]
struct BpfObjects {
    programs: BTreeSet<u64>,
    maps: BTreeSet<u64>,
    links: BTreeSet<u64>,
}

impl BpfObjects {
    /// From `/proc/<pid>/fdinfo`: each BPF descriptor names its object's ID.
    fn held_by(pid: u32) -> Self {
        let mut objects = Self::default();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
            let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else { continue };
            for line in info.lines() {
                let id =
                    |prefix: &str| line.strip_prefix(prefix).map(|v| v.trim().parse().unwrap());
                if let Some(id) = id("prog_id:") {
                    objects.programs.insert(id);
                } else if let Some(id) = id("map_id:") {
                    objects.maps.insert(id);
                } else if let Some(id) = id("link_id:") {
                    objects.links.insert(id);
                }
            }
        }
        objects
    }

    /// What the kernel has loaded right now, host-wide (`bpftool`).
    fn loaded() -> Self {
        let ids = |kind: &str| -> BTreeSet<u64> {
            let json = run("bpftool", &["-j", kind, "show"]);
            let items: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
            items.iter().filter_map(|item| item["id"].as_u64()).collect()
        };
        Self { programs: ids("prog"), maps: ids("map"), links: ids("link") }
    }

    fn still_loaded(&self) -> Self {
        let loaded = Self::loaded();
        Self {
            programs: self.programs.intersection(&loaded.programs).copied().collect(),
            maps: self.maps.intersection(&loaded.maps).copied().collect(),
            links: self.links.intersection(&loaded.links).copied().collect(),
        }
    }
}

fn tracefs_mounted() -> bool {
    ["/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"]
        .iter()
        .any(|path| std::path::Path::new(path).is_dir())
}

/// Starts a daemon and returns it with the BPF objects it holds once attached.
fn start(name: &str, extra: &[String]) -> (Daemon, BpfObjects) {
    let daemon = Daemon::start(name, extra);
    let objects = BpfObjects::held_by(daemon.pid);
    // Six tp_btf programs (three tracepoints, primary and standby), each attached by a
    // link, and what names the owner of an accepted socket: one fexit program on
    // inet_accept() (a link) where the kernel has BPF trampolines; else nothing, or with
    // --bpf.accept-syscall-tracepoints the two accept() exit programs where tracefs is
    // mounted (attached by a link from 5.15, by a perf event before).
    let accept_programs = objects.programs.len().saturating_sub(6);
    let syscalls = extra.iter().any(|flag| flag == "--bpf.accept-syscall-tracepoints");
    let accept_choices: &[usize] = if syscalls && tracefs_mounted() { &[1, 2] } else { &[1, 0] };
    assert!(accept_choices.contains(&accept_programs), "{objects:?}");
    assert!((6..=6 + accept_programs).contains(&objects.links.len()), "{objects:?}");
    // A ring buffer per possible CPU, the array that lists them, LOST and RECORDED (the
    // rings are among what must be freed at exit).
    let maps_at_least = possible_cpus() + 3;
    assert!(objects.maps.len() >= maps_at_least, "{maps_at_least} maps at least: {objects:?}");
    let loaded = BpfObjects::loaded();
    assert!(objects.programs.is_subset(&loaded.programs), "bpftool must list them");
    (daemon, objects)
}

/// CPUs the kernel may bring online (`/sys/devices/system/cpu/possible`: "0-3", "0,2-5").
fn possible_cpus() -> usize {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    list.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((first, last)) => {
                last.parse::<usize>().expect("CPU number")
                    - first.parse::<usize>().expect("CPU number")
                    + 1
            }
            None => 1,
        })
        .sum()
}

/// Waits until none of `objects` is loaded any more; the kernel frees them once the last
/// descriptor closes (asynchronously, after an RCU grace period).
fn assert_freed(objects: &BpfObjects) {
    let freed =
        wait_until(Duration::from_secs(10), || objects.still_loaded() == BpfObjects::default());
    assert!(freed, "still loaded after exit: {:?}", objects.still_loaded());
}

/// One connection in `pair`, reset by the client; whether `daemon` judged its client end.
fn verdict_from(daemon: &Daemon, pair: &Pair, port: u16) -> bool {
    let listener = pair.listen(port);
    let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(port))).unwrap();
    let (server, _) = listener.accept().unwrap();
    sock::set_linger_zero(&client);
    drop((client, server));
    // Not `Daemon::connections`: its sequence numbers are the shared daemon's.
    let query = format!("/connections?status=closed&netns={}&port={port}", pair.client.inode());
    wait_until(Duration::from_secs(20), || daemon.get(&query).contains("\"role\":\"client\""))
}

/// SIGTERM: HTTP stops, the ring is drained (the last close reaches the events file),
/// every program, link and map is gone, all within a few seconds.
#[test]
fn sigterm_drains_and_unloads_everything() {
    let events =
        std::env::temp_dir().join(format!("observer-tests-{}-term.jsonl", std::process::id()));
    let (daemon, objects) =
        start("sigterm", &["--debug.events-file".into(), events.display().to_string()]);
    let pair = Pair::new();
    let port = 7701;
    let listener = pair.listen(port);
    let client = pair.client.enter(|| TcpStream::connect(Pair::server_addr(port))).unwrap();
    let (server, _) = listener.accept().unwrap();
    sock::set_linger_zero(&client);
    drop((client, server));
    // At once, before the daemon had a chance to read it on its own schedule.
    let asked = Instant::now();
    daemon.stop();
    let status = daemon.wait_exit(Duration::from_secs(5));
    let took = asked.elapsed();
    assert!(status.is_some_and(|s| s.success()), "exit {status:?} after {took:?}");
    eprintln!("SIGTERM to exit: {took:?}");
    assert!(TcpStream::connect(daemon.base_url.trim_start_matches("http://")).is_err());
    assert_freed(&objects);
    let recorded = std::fs::read_to_string(&events).unwrap();
    std::fs::remove_file(&events).unwrap();
    let closes = recorded
        .lines()
        .filter(|line| line.contains(&format!(":{port}\"")) && line.contains("\"new\":\"close\""))
        .count();
    assert_eq!(closes, 2, "both ends' final transitions drained before exit:\n{recorded}");
}

/// SIGINT (Ctrl-C) stops it the same way.
#[test]
fn sigint_unloads_everything() {
    let (daemon, objects) = start("sigint", &[]);
    daemon.signal(Signal::SIGINT);
    assert!(daemon.wait_exit(Duration::from_secs(5)).is_some_and(|s| s.success()));
    assert_freed(&objects);
}

/// kill -9 leaves no time to clean up: the kernel frees everything when the descriptors
/// close, and a new daemon starts and works.
#[test]
fn restart_after_kill_9_leaks_nothing() {
    let (crashed, objects) = start("kill-9", &[]);
    crashed.signal(Signal::SIGKILL);
    assert!(crashed.wait_exit(Duration::from_secs(5)).is_some());
    assert_freed(&objects);
    let (restarted, new_objects) = start("after-kill-9", &[]);
    assert!(new_objects.programs.is_disjoint(&objects.programs));
    let pair = Pair::new();
    assert!(verdict_from(&restarted, &pair, 7702), "{}", restarted.log_tail());
    restarted.stop();
    assert!(restarted.wait_exit(Duration::from_secs(5)).is_some());
    assert_freed(&new_objects);
}

/// Two daemons on one host work independently: each has its own programs and ring, both
/// judge the same connection, and stopping one leaves the other working.
#[test]
fn two_daemons_work_independently() {
    let shared = daemon();
    let (second, objects) = start("second", &[]);
    assert!(objects.programs.is_disjoint(&BpfObjects::held_by(shared.pid).programs));
    let pair = Pair::new();
    assert!(verdict_from(&second, &pair, 7703), "second: {}", second.log_tail());
    assert!(verdict_from(shared, &pair, 7704), "shared: {}", shared.log_tail());
    second.stop();
    assert!(second.wait_exit(Duration::from_secs(5)).is_some());
    assert_freed(&objects);
    assert!(verdict_from(shared, &pair, 7705), "shared after the second stopped");
}
