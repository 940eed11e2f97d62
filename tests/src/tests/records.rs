//! `/connections` and `observer watch --json` against their documented schema
//! (`docs/connections.schema.json`).

use std::{
    io::{BufRead as _, BufReader},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
};

use serde_json::Value;

use crate::{
    daemon::{VERDICT_TIMEOUT, binary, daemon},
    net::Pair,
    sock,
};

const PORT: u16 = 7603;

/// Compiled in: the VM guests have the test binary, not the source tree.
const SCHEMA: &str = include_str!("../../../docs/connections.schema.json");

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(SCHEMA).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("a valid JSON Schema")
}

#[track_caller]
fn assert_valid(validator: &jsonschema::Validator, record: &Value) {
    let errors: Vec<String> = validator.iter_errors(record).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "record does not match the schema: {errors:#?}\n{record:#}");
}

#[test]
fn connections_endpoint_matches_the_schema() {
    let validator = validator();
    let pair = Pair::new();
    let listener = pair.listen(PORT);
    // One reset (closed), one established and one CLOSE_WAIT (open).
    let connect = || pair.client.enter(|| TcpStream::connect(Pair::server_addr(PORT))).unwrap();
    let (client, server) = (connect(), listener.accept().unwrap());
    sock::set_linger_zero(&client);
    drop((client, server));
    let (_open_client, _open_server) = (
        pair.client.enter(|| TcpStream::connect(Pair::server_addr(PORT))).unwrap(),
        listener.accept().unwrap(),
    );
    let leaking = pair.client.enter(|| TcpStream::connect(Pair::server_addr(PORT))).unwrap();
    let (_leaked, _) = listener.accept().unwrap();
    drop(leaking);
    daemon().verdicts(&pair.server, 1);

    // Namespace inodes are reused, within the second an inventory is reused too: only
    // this test's port, and closed connections only after this namespace's start.
    let netns = pair.server.inode();
    let mut records = Vec::new();
    for query in [
        format!("/connections?status=open&netns={netns}&port={PORT}"),
        format!(
            "/connections?status=closed&netns={netns}&port={PORT}&after={}",
            pair.server.first_seq
        ),
    ] {
        let body = daemon().get(&query);
        let page: Vec<Value> = serde_json::from_str(&body).expect("a JSON array");
        records.extend(page);
    }
    for record in &records {
        assert_valid(&validator, record);
    }
    let count = |status: &str, state: &str| {
        records.iter().filter(|r| r["status"] == status && r["state"] == state).count()
    };
    assert_eq!(count("closed", "close"), 1, "{records:#?}");
    assert_eq!(count("open", "established"), 1, "{records:#?}");
    assert_eq!(count("open", "close_wait"), 1, "{records:#?}");
    assert_eq!(count("open", "listen"), 1, "{records:#?}");
}

#[test]
fn watch_json_lines_match_the_schema() {
    let validator = validator();
    let mut watch = Command::new(binary())
        .args(["watch", "--json", "--port", &PORT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start observer watch");
    let (lines, received) = mpsc::channel();
    let stdout = BufReader::new(watch.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Attached once it says so on stderr.
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    let mut message = String::new();
    while !message.contains("attached") {
        message.clear();
        let read = stderr.read_line(&mut message).expect("watch's log");
        assert_ne!(read, 0, "observer watch exited before attaching");
    }

    let pair = Pair::new();
    let (client, server) = pair.connect(PORT);
    drop(client);
    sock::read_to_end(&server);
    drop(server);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = received.recv_timeout(VERDICT_TIMEOUT).expect("a line from observer watch");
        let record: Value = serde_json::from_str(&line).expect("one JSON object per line");
        assert_valid(&validator, &record);
        if record["netns"] == pair.client.inode() || record["netns"] == pair.server.inode() {
            seen.push(record);
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let mut verdicts: Vec<_> =
        seen.iter().map(|r| (r["role"].as_str().unwrap(), r["cause"].as_str().unwrap())).collect();
    verdicts.sort();
    assert_eq!(verdicts, [("client", "active"), ("server", "passive")]);
    assert!(seen.iter().all(|r| r["owner"].is_object()), "owners: {seen:#?}");
}
