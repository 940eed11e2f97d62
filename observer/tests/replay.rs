//! Replays kernel event streams recorded from the integration scenarios (on real
//! kernels, see `tests/src/record.rs`) through the tracker and classifier, and checks
//! that every verdict comes out as it did live. Runs without root or BPF.
//!
//! Fixtures: `tests/streams/<kernel release>/<scenario>.jsonl`; the first line lists the
//! expected verdicts, the rest are `SocketEvent`s. Regenerate with `cargo xtask record`.

use std::{fs, net::SocketAddr, num::NonZeroUsize, path::Path};

use observer::{capture::decode::SocketEvent, track::Tracker};
use serde::Deserialize;

#[derive(Deserialize)]
struct Header {
    test: String,
    kernel: String,
    expect: Vec<Expected>,
}

#[derive(Deserialize)]
struct Expected {
    local: SocketAddr,
    remote: SocketAddr,
    role: String,
    class: String,
    cause: String,
    detail: Option<String>,
}

fn replay(path: &Path) -> usize {
    let text = fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Header = serde_json::from_str(lines.next().expect("header")).expect("header JSON");
    let mut tracker = Tracker::new(NonZeroUsize::new(1 << 16).unwrap());
    let mut decided = Vec::new();
    for line in lines {
        let event: SocketEvent = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("{}: bad event ({error}): {line}", path.display()));
        tracker.ingest(&event, &mut decided);
    }
    tracker.flush(&mut decided);
    for expected in &header.expect {
        let context = format!(
            "{} ({} on {}): {} {} -> {}",
            path.display(),
            header.test,
            header.kernel,
            expected.role,
            expected.local,
            expected.remote
        );
        let matching: Vec<_> = decided
            .iter()
            .filter(|c| {
                c.local == expected.local
                    && c.remote == expected.remote
                    && c.role.name() == expected.role
            })
            .collect();
        assert_eq!(matching.len(), 1, "{context}: one verdict expected");
        let verdict = &matching[0].verdict;
        assert_eq!(
            (verdict.class().name(), verdict.cause.name(), verdict.detail),
            (expected.class.as_str(), expected.cause.as_str(), expected.detail.as_deref()),
            "{context}"
        );
    }
    header.expect.len()
}

#[test]
fn recorded_streams_reproduce_their_verdicts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/streams");
    let mut files = Vec::new();
    for kernel in fs::read_dir(&root).unwrap() {
        for file in fs::read_dir(kernel.unwrap().path()).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files.sort();
    assert!(!files.is_empty(), "no recorded streams under {}", root.display());
    let verdicts: usize = files.iter().map(|file| replay(file)).sum();
    eprintln!("replayed {} streams, {verdicts} verdicts", files.len());
}
