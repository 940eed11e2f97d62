//! Label values a local user controls: process names with any byte in them, and port
//! values taken by squatting listeners before a real service shows up.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};
use observer_exposition::Exposition;

use crate::{
    daemon::{Daemon, binary, wait_until},
    net::Namespace,
};

/// Quotes, a backslash, a newline and a terminal escape: 15 bytes, as `comm` holds.
const NAME: &str = "q\"\\\n\u{1b}[31mX";

/// Connects to 127.0.0.1:`port` and closes, from a child process named [`NAME`], in the
/// namespace the calling thread is in.
fn connect_as_crafted_process(port: u16) {
    let name = std::ffi::CString::new(NAME).unwrap();
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: the child only makes system calls (no allocation, no lock) and exits.
    unsafe {
        match libc::fork() {
            0 => {
                libc::prctl(libc::PR_SET_NAME, name.as_ptr());
                let socket = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let connected = libc::connect(
                    socket,
                    (&address as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                libc::close(socket);
                libc::_exit(if connected == 0 { 0 } else { 1 });
            }
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            child => {
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                assert_eq!(status, 0, "the crafted child could not connect");
            }
        }
    }
}

/// A process name with quotes, a backslash, a newline and an escape sequence: the
/// exposition still parses (promtool) and gives the name back, the JSON record gives it
/// back, and the `watch` line holds no raw control byte.
#[test]
fn a_crafted_process_name_round_trips_and_prints_safely() {
    const PORT: u16 = 7701;
    let namespace = Namespace::create(format!("obs{}-names", std::process::id()));
    let netns = namespace.inode().to_string();
    let daemon = Daemon::start(
        "names",
        &["--debug.only-netns".into(), netns.clone(), "--metrics.comm-label".into()],
    );
    let mut watch = Command::new(binary())
        .args(["watch", "--port", &PORT.to_string(), "--debug.only-netns", &netns])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let attached = BufReader::new(watch.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("attached"));
    assert!(attached, "watch never reported being attached");
    let listener = namespace.enter(|| TcpListener::bind((Ipv4Addr::LOCALHOST, PORT))).unwrap();
    namespace.enter(|| connect_as_crafted_process(PORT));
    let (server, _) = listener.accept().unwrap();
    drop(server);

    let judged = wait_until(Duration::from_secs(20), || {
        daemon.metric_sum("observer_tcp_closes_total", &[("port", &PORT.to_string())]) >= 2.0
    });
    assert!(judged, "{}", daemon.log_tail());
    let exposition = daemon.get("/metrics");
    let checked = crate::prometheus::check_metrics(&exposition);
    assert!(checked.is_ok(), "promtool: {checked:?}");
    let names: Vec<String> = Exposition::parse(&exposition)
        .0
        .iter()
        .filter(|sample| sample.matches("observer_tcp_closes_total", &[("port", "7701")]))
        .filter_map(|sample| sample.label("comm").map(str::to_string))
        .collect();
    assert!(names.iter().any(|name| name == NAME), "comm label values: {names:?}");

    let records: Vec<serde_json::Value> = serde_json::from_str(
        &daemon.get(&format!("/connections?status=closed&netns={netns}&port={PORT}")),
    )
    .unwrap();
    assert!(records.iter().any(|r| r["owner"]["comm"] == NAME), "{records:#?}");

    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let reader = std::thread::spawn(move || {
        lines
            .by_ref()
            .map_while(Result::ok)
            .find(|line| line.contains("client"))
            .unwrap_or_default()
    });
    wait_until(Duration::from_secs(20), || reader.is_finished());
    signal::kill(Pid::from_raw(watch.id() as i32), signal::Signal::SIGTERM).unwrap();
    watch.wait().unwrap();
    let line = reader.join().unwrap();
    eprintln!("watch printed: {line}");
    assert!(line.contains("q\"\\\\\\n\\u{1b}[31mX"), "the name escaped: {line:?}");
    assert!(!line.chars().any(char::is_control), "a control byte in {line:?}");
    daemon.stop();
}

/// 300 listeners on distinct unprivileged ports, each closing a connection, fill the
/// `port` label's 256 values; a real service on a privileged port keeps its own value,
/// and every value refused is counted.
#[test]
fn squatted_ports_leave_a_real_service_its_label() {
    let namespace = Namespace::create(format!("obs{}-squat", std::process::id()));
    let daemon =
        Daemon::start("squat", &["--debug.only-netns".into(), namespace.inode().to_string()]);
    let squatters: Vec<TcpListener> = namespace.enter(|| {
        (0..300).map(|n| TcpListener::bind((Ipv4Addr::LOCALHOST, 20_000 + n)).unwrap()).collect()
    });
    // Once a scrape has listed them, the daemon knows they listen.
    let netns = namespace.inode().to_string();
    let listed = wait_until(Duration::from_secs(20), || {
        daemon.metric_sum("observer_tcp_sockets", &[("netns", &netns), ("state", "listen")])
            >= 300.0
    });
    assert!(listed, "the inventory never showed the listeners");
    let close_one = |listener: &TcpListener| {
        let port = listener.local_addr().unwrap().port();
        let client = namespace.enter(|| TcpStream::connect((Ipv4Addr::LOCALHOST, port))).unwrap();
        let (server, _) = listener.accept().unwrap();
        drop((client, server));
    };
    squatters.iter().for_each(close_one);
    let service = namespace.enter(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 443))).unwrap();
    close_one(&service);
    let closes = || daemon.metric_sum("observer_tcp_closes_total", &[]);
    wait_until(Duration::from_secs(20), || closes() >= 602.0);
    let real = daemon.metric_sum("observer_tcp_closes_total", &[("port", "443")]);
    let other = daemon.metric_sum("observer_tcp_closes_total", &[("port", "other")]);
    let refused = daemon.metric_sum("observer_label_values_refused_total", &[("label", "port")]);
    // Ports of the rest of the host (CLOSE_WAIT sockets of other tests) may hold some of
    // the 256 values too: count the squatters that got one.
    let labelled = (20_000..20_300u16)
        .filter(|port| {
            daemon.metric_sum("observer_tcp_closes_total", &[("port", &port.to_string())]) > 0.0
        })
        .count();
    eprintln!(
        "300 squatting ports: {labelled} labelled, {other} closes as \"other\", {refused} \
         values refused; port 443: {real} closes"
    );
    assert_eq!(closes(), 602.0, "{}", daemon.log_tail());
    assert_eq!(real, 2.0, "the real service lost its label");
    assert!(labelled <= 256, "the cap held: {labelled} squatting ports labelled");
    assert_eq!(other, 2.0 * (300 - labelled) as f64, "the other squatters' closes are other");
    assert!(refused >= other, "every close given \"other\" is counted ({refused} < {other})");
    daemon.stop();
}
