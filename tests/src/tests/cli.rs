//! The binary's contract with its user: clear one-line errors, `watch` output.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::process::CommandExt as _,
    process::{Command, Output, Stdio},
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};

use super::assert_verdict;
use crate::{
    daemon::{Connection, binary, daemon, wait_until},
    net::Pair,
    sock,
};

pub(super) fn stderr_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "expected one line on stderr, got:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn explains_missing_privileges() {
    let output = Command::new(binary()).uid(65534).gid(65534).output().unwrap();
    assert_eq!(output.status.code(), Some(4));
    let message = stderr_line(&output);
    assert!(message.contains("CAP_BPF") && message.contains("CAP_PERFMON"), "{message}");
}

#[test]
fn explains_an_address_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = Command::new(binary()).args(["--web.listen-address", &address]).output().unwrap();
    assert_eq!(output.status.code(), Some(9));
    let message = stderr_line(&output);
    assert!(message.contains(&format!("cannot listen on {address}")), "{message}");
    assert!(message.to_lowercase().contains("in use"), "{message}");
}

#[test]
fn rejects_bad_flags() {
    for (args, names) in [
        (&["--no-such-flag"][..], "--no-such-flag"),
        (&["--web.listen-address", "nowhere"], "--web.listen-address"),
        (&["watch", "--port", "x"], "--port"),
        (&["--bpf.ring-buffer-bytes", "12"], "--bpf.ring-buffer-bytes"),
    ] {
        let output = Command::new(binary()).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let message = stderr_line(&output);
        assert!(message.starts_with("observer: ") && message.contains(names), "{message}");
    }
    // --help is not an error.
    let help = Command::new(binary()).arg("--help").output().unwrap();
    assert!(help.status.success() && String::from_utf8_lossy(&help.stdout).contains("Usage"));
}

/// `observer watch --json` prints each verdict as it happens, and stops on SIGTERM.
#[test]
fn watch_prints_verdicts() {
    let _ = daemon();
    let mut watch = Command::new(binary())
        .args(["watch", "--json", "--port", "7601"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // It says on stderr when its programs are attached.
    let mut log = BufReader::new(watch.stderr.take().unwrap()).lines();
    let attached = log.by_ref().map_while(Result::ok).any(|line| line.contains("attached"));
    assert!(attached, "watch never reported being attached");
    let pair = Pair::new();
    let (client, server) = pair.connect(7601);
    sock::set_linger_zero(&client);
    drop((client, server));
    let mut seen: Vec<Connection> = Vec::new();
    let reader = std::thread::spawn(move || {
        for line in lines.by_ref() {
            let connection: Connection = serde_json::from_str(&line.unwrap()).expect("JSON line");
            seen.push(connection);
            if seen.len() == 2 {
                break;
            }
        }
        seen
    });
    wait_until(Duration::from_secs(20), || reader.is_finished());
    signal::kill(Pid::from_raw(watch.id() as i32), signal::Signal::SIGTERM).unwrap();
    let status = watch.wait().unwrap();
    let seen = reader.join().unwrap();
    assert!(status.success(), "watch exited with {status}");
    let client = seen.iter().find(|c| c.role == "client").expect("client verdict");
    let server = seen.iter().find(|c| c.role == "server").expect("server verdict");
    assert_verdict(client, "client", "rst", "linger_zero");
    assert_verdict(server, "server", "rst", "received");
}
