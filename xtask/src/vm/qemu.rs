//! Boots a guest under QEMU (TCG: KVM does not work on these build machines) and follows
//! its serial console until the result line, a kernel panic, QEMU's exit or the timeout.

use std::{
    io::{BufRead as _, BufReader, Read},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// What a guest run produced.
pub struct Outcome {
    /// `uname -r` as the guest reported it.
    pub release: Option<String>,
    pub passed: usize,
    /// Scenarios the harness announced ("running N tests"), less those it ignores
    /// (benchmarks run on demand, like the soak).
    pub total: usize,
    /// Why the run failed, if it did.
    pub failure: Option<String>,
    pub elapsed: Duration,
}

/// Console markers that mean the guest kernel died.
const FATAL: [&str; 4] =
    ["Kernel panic", "BUG: soft lockup", "rcu_sched self-detected stall", "Oops:"];

/// Boots `kernel` with `initrd`. Files the guest sends back (`vm-test-file <path>: <line>`)
/// are written under `files_to`, if given.
pub fn boot(
    label: &str,
    kernel: &Path,
    initrd: &Path,
    memory_mib: u32,
    timeout: Duration,
    files_to: Option<&Path>,
) -> Outcome {
    let started = Instant::now();
    let mut outcome =
        Outcome { release: None, passed: 0, total: 0, failure: None, elapsed: Duration::ZERO };
    let spawned = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", &memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut qemu = match spawned {
        Ok(child) => child,
        Err(error) => {
            outcome.failure = Some(format!("cannot start qemu-system-x86_64: {error}"));
            return outcome;
        }
    };
    let (lines, receiver) = mpsc::channel::<String>();
    for stream in [
        qemu.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        qemu.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(lines);

    let deadline = started + timeout;
    let mut failed_tests = Vec::new();
    let mut finished = false;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = match receiver.recv_timeout(remaining) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome.failure =
                    Some(format!("timed out after {} s; guest killed", timeout.as_secs()));
                break;
            }
        };
        if let Some(file_line) = line.strip_prefix("vm-test-file ") {
            if let (Some(dir), Some((path, content))) = (files_to, file_line.split_once(": ")) {
                append(&dir.join(path), content);
            }
            continue;
        }
        println!("[{label}] {line}");
        let announced = line
            .strip_prefix("running ")
            .and_then(|rest| rest.strip_suffix(" tests").or_else(|| rest.strip_suffix(" test")));
        if let Some(count) = announced {
            outcome.total = count.trim().parse().unwrap_or(0);
        } else if line.starts_with("test ") && line.ends_with(" ... ok") {
            outcome.passed += 1;
        } else if line.starts_with("test ") && line.contains(" ... ignored") {
            outcome.total = outcome.total.saturating_sub(1);
        } else if line.starts_with("test ") && line.ends_with(" ... FAILED") {
            failed_tests
                .push(line.trim_start_matches("test ").trim_end_matches(" ... FAILED").to_string());
        } else if let Some(summary) = line.strip_prefix("test result: ") {
            // The harness's own count: a kernel message printed in the middle of a
            // "test … ok" line (the console is shared) would hide that line from the above.
            if let Some((passed, failed)) = harness_counts(summary) {
                outcome.passed = passed;
                outcome.total = passed + failed;
            }
        } else if let Some(name) = line.strip_prefix("    tests::") {
            // The harness's closing list of failures, one indented name per line.
            let name = format!("tests::{}", name.trim());
            if !failed_tests.contains(&name) {
                failed_tests.push(name);
            }
        } else if let Some(result) = line.strip_prefix("vm-test-result: ") {
            let mut fields = result.split_whitespace();
            outcome.release = fields.next().map(str::to_string);
            if fields.next() != Some("exit=0") && failed_tests.is_empty() {
                outcome.failure = Some(format!("the scenario binary failed ({result})"));
            }
            finished = true;
        } else if FATAL.iter().any(|marker| line.contains(marker)) {
            outcome.failure = Some(format!("guest kernel failure: {line}"));
            break;
        }
    }
    let _ = qemu.kill();
    let status = qemu.wait();
    if outcome.failure.is_none() && !failed_tests.is_empty() {
        outcome.failure = Some(format!("failed: {}", failed_tests.join(", ")));
    }
    if outcome.failure.is_none() && !finished {
        outcome.failure =
            Some(format!("the guest stopped without a result line (qemu: {status:?})"));
    }
    outcome.elapsed = started.elapsed();
    outcome
}

/// Appends one line to a file sent back by the guest (creating it and its directory).
fn append(path: &Path, line: &str) {
    use std::io::Write as _;
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| writeln!(file, "{line}"));
    if let Err(error) = written {
        println!("vm-test: cannot write {}: {error}", path.display());
    }
}

/// (passed, failed) from the harness's summary, `ok. 62 passed; 3 failed; 3 ignored; …`.
fn harness_counts(summary: &str) -> Option<(usize, usize)> {
    let count = |what: &str| {
        summary
            .split(';')
            .find_map(|part| part.trim().strip_suffix(what)?.split(' ').next_back()?.parse().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::harness_counts;

    #[test]
    fn reads_the_harness_summary() {
        let summary = "FAILED. 62 passed; 3 failed; 3 ignored; 0 measured; 0 filtered out; finished in 225.18s";
        assert_eq!(harness_counts(summary), Some((62, 3)));
        assert_eq!(harness_counts("ok. 9 passed; 0 failed; 0 ignored"), Some((9, 0)));
        assert_eq!(harness_counts("garbage"), None);
    }
}
