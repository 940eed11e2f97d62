//! Records each scenario's kernel events with the verdicts the daemon reached, as
//! fixtures for the classifier's replay tests (`observer/tests/replay.rs`), which then
//! run without root or a kernel.
//!
//! Enabled by `OBSERVER_RECORD_DIR=<dir>` (`cargo xtask record`): the daemon writes every
//! decoded event to a file (`--debug.events-file`); when a scenario's [`Pair`] is
//! dropped, the events of its two namespaces go to `<dir>/<kernel release>/<test>.jsonl`,
//! after a first line holding the verdicts to reproduce.
//!
//! [`Pair`]: crate::net::Pair

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::Write as _,
    path::PathBuf,
};

use serde_json::{Value, json};

use crate::{daemon::daemon, net::Namespace};

/// Scenarios with more events than this are not worth a fixture (the 1000-connection
/// burst).
const MAX_EVENTS: usize = 400;

pub fn directory() -> Option<PathBuf> {
    std::env::var_os("OBSERVER_RECORD_DIR").map(PathBuf::from)
}

/// Where the daemon writes its events when recording.
pub fn events_file() -> Option<PathBuf> {
    let dir = directory()?;
    fs::create_dir_all(&dir).expect("create the recording directory");
    Some(dir.join(format!(".events-{}.jsonl", std::process::id())))
}

/// CLOCK_MONOTONIC, the clock of kernel event timestamps.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Writes the fixture for the current test, if recording.
pub fn save(namespaces: &[&Namespace], since_ns: u64) {
    let (Some(dir), Some(events_file)) = (directory(), events_file()) else {
        return;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .replace("tests::", "")
        .replace("::", "-");
    let expect: Vec<Value> = namespaces
        .iter()
        .flat_map(|namespace| daemon().connections(namespace))
        .map(|c| {
            json!({"local": c.local, "remote": c.remote, "role": c.role,
                   "class": c.class, "cause": c.cause, "detail": c.detail})
        })
        .collect();
    if expect.is_empty() {
        return;
    }
    let inodes: HashSet<u64> = namespaces.iter().map(|n| n.inode()).collect();
    let all: Vec<Value> = fs::read_to_string(&events_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|event: &Value| event["timestamp_ns"].as_u64().unwrap_or(0) >= since_ns)
        .collect();
    // Socket addresses are reused: a reset belongs to whichever socket last had a state
    // event at that address.
    let mut ours: HashMap<u64, bool> = HashMap::new();
    let events: Vec<&Value> = all
        .iter()
        .filter(|e| {
            let socket = e["socket"].as_u64().unwrap_or(0);
            if e["event"] == "state" {
                let mine = inodes.contains(&e["netns"].as_u64().unwrap_or(0));
                ours.insert(socket, mine);
                mine
            } else {
                ours.get(&socket).copied().unwrap_or(false)
            }
        })
        .collect();
    if events.len() > MAX_EVENTS {
        return;
    }
    let kernel = crate::net::run("uname", &["-r"]).trim().to_string();
    let path = dir.join(&kernel).join(format!("{test}.jsonl"));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = fs::File::create(&path).unwrap();
    let header = json!({"test": test, "kernel": kernel, "expect": expect});
    writeln!(file, "{header}").unwrap();
    for event in events {
        writeln!(file, "{event}").unwrap();
    }
}
