//! Broken environments: each fault gives one clear line on stderr and its own exit code
//! (README "Exit codes"), never a panic. Bad flags, privileges and a busy port are in
//! `cli.rs`; the web config file in `web.rs`.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use super::cli::stderr_line;
use crate::daemon::{Daemon, binary, free_port, wait_until};

/// Exit codes of `observer` (observer/src/error.rs `exit`).
const NO_BTF: i32 = 5;
const BAD_BTF: i32 = 6;
const UNSUPPORTED_KERNEL: i32 = 7;
const PRIVILEGES: i32 = 4;

fn run(args: &[&str]) -> Output {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    Command::new(binary()).args(["--web.listen-address", &listen]).args(args).output().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("observer-tests-{}-{name}", std::process::id()))
}

/// `struct btf_header` (little endian): magic, version 1, flags 0, hdr_len 24, then the
/// type section (offset 0, `type_len` bytes) and the string section after it.
fn btf_header(type_len: u32, str_len: u32) -> Vec<u8> {
    let mut header = vec![0x9f, 0xeb, 1, 0];
    for word in [24, 0, type_len, type_len, str_len] {
        header.extend_from_slice(&u32::to_le_bytes(word));
    }
    header
}

#[test]
fn explains_a_missing_btf() {
    let output = run(&["--debug.btf-path", "/nonexistent/vmlinux"]);
    assert_eq!(output.status.code(), Some(NO_BTF));
    let message = stderr_line(&output);
    assert!(message.contains("/nonexistent/vmlinux") && message.contains("CONFIG_DEBUG_INFO_BTF"));
}

#[test]
fn explains_a_corrupt_btf() {
    let path = scratch("corrupt.btf");
    // Not BTF at all, then a BTF header promising more than the file holds.
    let truncated = btf_header(4096, 1);
    for content in [&b"this is not BTF, it is a text file"[..], &truncated] {
        std::fs::write(&path, content).unwrap();
        let output = run(&["--debug.btf-path", path.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(BAD_BTF), "{}", stderr_line(&output));
        let message = stderr_line(&output);
        assert!(message.contains("cannot parse kernel BTF"), "{message}");
    }
    std::fs::remove_file(&path).unwrap();
}

/// A well-formed BTF without the kernel's types: as on a kernel too old or too stripped.
#[test]
fn explains_a_kernel_without_the_tracepoints() {
    let path = scratch("empty.btf");
    let mut empty = btf_header(0, 1);
    empty.push(0);
    std::fs::write(&path, &empty).unwrap();
    let output = run(&["--debug.btf-path", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(output.status.code(), Some(UNSUPPORTED_KERNEL));
    let message = stderr_line(&output);
    assert!(message.contains("no `inet_sock_set_state` tracepoint"), "{message}");
}

/// Root with every capability dropped (as a container or a unit without caps would be).
#[test]
fn explains_missing_capabilities_as_root() {
    let port = free_port().to_string();
    let output = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(binary())
        .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(PRIVILEGES));
    let message = stderr_line(&output);
    assert!(message.contains("missing: CAP_BPF, CAP_PERFMON"), "{message}");
}

/// tracefs is not needed (BTF tracepoints attach without it): hidden under an empty
/// tmpfs in a private mount namespace, the daemon still starts and serves.
#[test]
fn runs_without_tracefs() {
    let wrapper = scratch("no-tracefs.sh");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nset -e\nfor dir in /sys/kernel/tracing /sys/kernel/debug; do\n  \
         mount -t tmpfs -o ro,size=4k none \"$dir\"\ndone\n\
         test -z \"$(ls /sys/kernel/tracing)\"\nexec \"$@\"\n",
    )
    .unwrap();
    // Run the wrapper under `unshare --mount` so the mounts vanish with the process.
    let shim = scratch("observer-no-tracefs");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nexec unshare --mount --propagation private sh {} {} \"$@\"\n",
            wrapper.display(),
            binary().display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&shim).status().unwrap();
    let daemon = Daemon::start_binary(&shim, "no-tracefs", &[]);
    assert!(daemon.get("/metrics").contains("observer_events_total"));
    daemon.stop();
    for file in [wrapper, shim] {
        let _ = std::fs::remove_file(file);
    }
}

/// Capability sets of every thread of `pid`, as (CapPrm, CapEff, CapBnd, CapInh, CapAmb),
/// with the thread's name — once every thread but the main one has its own name (a thread
/// just started still carries its creator's name and capabilities for a moment).
fn capabilities(pid: u32) -> Vec<(String, [u64; 5])> {
    let mut threads = Vec::new();
    wait_until(Duration::from_secs(5), || {
        threads = thread_capabilities(pid);
        threads.iter().filter(|(name, _)| name == "observer").count() <= 1
    });
    threads
}

fn thread_capabilities(pid: u32) -> Vec<(String, [u64; 5])> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .unwrap_or(0)
        };
        let sets = ["CapPrm:", "CapEff:", "CapBnd:", "CapInh:", "CapAmb:"].map(field);
        threads.push((comm.trim().to_string(), sets));
    }
    threads
}

const CAP_SYS_PTRACE: u64 = 1 << 19;
const CAP_SYS_ADMIN: u64 = 1 << 21;
/// What docs/security.md says the daemon keeps.
const KEPT: u64 = CAP_SYS_ADMIN | CAP_SYS_PTRACE;
/// The threads that keep them: the capture thread (its name cut to 15 bytes), the scan
/// thread, and the short-lived threads the scan thread starts to enter namespaces.
const PRIVILEGED_THREADS: [&str; 3] = ["observer-captur", "observer-scan", "inventory"];

/// The capabilities a thread must hold, given the daemon's (`kept`): all of them for the
/// privileged threads, none for the others (those that parse HTTP).
fn expected(thread: &str, kept: u64) -> u64 {
    if PRIVILEGED_THREADS.contains(&thread) { kept } else { 0 }
}

/// As root: after attaching, only CAP_SYS_ADMIN and CAP_SYS_PTRACE remain, bounding set
/// included, and only on the capture and scan threads; the others hold none — and the
/// daemon still works.
#[test]
fn drops_capabilities_after_attaching() {
    let daemon = Daemon::start("caps-root", &[]);
    assert!(daemon.get("/connections?limit=1").starts_with('['));
    let threads = capabilities(daemon.pid);
    daemon.stop();
    let names: Vec<&str> = threads.iter().map(|(name, _)| name.as_str()).collect();
    assert!(names.contains(&"observer-captur") && names.contains(&"observer-scan"), "{names:?}");
    for (name, sets) in &threads {
        let held = expected(name, KEPT);
        assert_eq!(
            *sets,
            [held, held, KEPT, 0, 0],
            "{name}: CapPrm, CapEff, CapBnd, CapInh, CapAmb"
        );
    }
}

/// Under the capability bounding set of the systemd unit (deploy/systemd, issue 7):
/// loads with what it is given and keeps only the two it needs at run time.
#[test]
fn runs_under_the_systemd_bounding_set() {
    let wrapper = scratch("bounded.sh");
    // util-linux's, by path: busybox's sh would run its own, more limited, applet.
    let setpriv = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| std::path::Path::new(dir).join("setpriv"))
        .find(|path| path.exists())
        .expect("setpriv (util-linux) on PATH");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} --inh-caps=-all --bounding-set=-all,+bpf,+perfmon,\
             +sys_resource,+dac_read_search,+sys_admin,+sys_ptrace -- {} \"$@\"\n",
            setpriv.display(),
            binary().display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&wrapper).status().unwrap();
    let daemon = Daemon::start_binary(&wrapper, "caps-bounded", &[]);
    let threads = capabilities(daemon.pid);
    let metrics = daemon.get("/metrics");
    daemon.stop();
    let _ = std::fs::remove_file(&wrapper);
    assert!(metrics.contains("observer_events_total"));
    // The unit's set, less what this test itself lacks (a container may, e.g. sys_resource).
    let unit_set: u64 = [39, 38, 24, 2, 21, 19].iter().map(|cap| 1u64 << cap).sum::<u64>()
        & capabilities(std::process::id())[0].1[2];
    for (name, [permitted, effective, bounding, inheritable, ambient]) in threads {
        let held = expected(&name, KEPT);
        assert_eq!((permitted, effective), (held, held), "{name}");
        // No CAP_SETPCAP to shrink the bounding set further: it stays the unit's.
        assert_eq!(bounding, unit_set);
        assert_eq!((inheritable, ambient), (0, 0));
    }
}
