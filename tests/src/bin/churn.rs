//! Connection-churn load generator for `cargo xtask bench` (docs/benchmarks.md).
//!
//! Every worker thread opens and ends loopback TCP connections as fast as it can (or,
//! with `--rate N`, paced to N connections per second in total) for a fixed time,
//! cycling through a weighted mix of endings:
//!
//! * `fin`: connect, accept, the client closes (FIN), the server reads EOF and closes;
//! * `rst`: the same with SO_LINGER {1, 0} on the client, whose close() sends an RST;
//! * `refused`: connect to a bound but not listening port, answered with an RST.
//!
//! Each worker has its own listeners (and a refusing port per worker), so the threads
//! share nothing; the ports of each kind are printed so that the daemon's
//! `observer_tcp_closes_total{port}` can be checked kind by kind. With `--idle N` it
//! first opens N connections and holds both ends open, idle, for the whole run (in
//! holder processes of 9000 connections each: one process may have few descriptors);
//! `--idle N --idle-only` just holds them until stdin closes.
//!
//! The result is one JSON object on stdout, with the whole host's busy CPU time over
//! the churn window (from /proc/stat), which the bench divides by the connections. Run
//! it in a network namespace of its own (the bench does): it uses the whole ephemeral
//! port range of that namespace.

use std::{
    io::{ErrorKind, Read as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use serde::Serialize;
use socket2::{Domain, SockRef, Socket, Type};

#[derive(Debug, Parser)]
#[command(
    name = "churn",
    about = "Open and end loopback TCP connections as fast as possible, or at a fixed rate"
)]
struct Options {
    /// How long to churn, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Connections per second, in total over the threads, paced (default: as many as
    /// possible). A generator that cannot keep up shows it in the achieved rate.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Weights of the endings, e.g. fin=2,rst=1,refused=1.
    #[arg(long, default_value = "fin=1,rst=1,refused=1", value_parser = parse_mix)]
    mix: Mix,
    /// Listening ports per worker and kind; connections rotate over them so that
    /// TIME_WAIT sockets do not exhaust the ephemeral ports of one destination.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    ports: u16,
    /// Connections held open (both ends, idle) during the run.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Do not churn: open the --idle connections, print their listeners' ports (JSON),
    /// and keep them open until stdin closes.
    #[arg(long, requires = "idle")]
    idle_only: bool,
    /// Internal: be a holder of this many idle connections (see --idle).
    #[arg(long, hide = true)]
    hold: Option<usize>,
}

/// Weight of each ending in the rotation.
#[derive(Debug, Clone, Copy, Default)]
struct Mix {
    fin: u32,
    rst: u32,
    refused: u32,
}

impl Mix {
    fn total(self) -> u32 {
        self.fin + self.rst + self.refused
    }

    /// The ending of the `i`th connection of a worker: a fixed interleaving.
    fn kind(self, i: u32) -> Kind {
        let slot = i % self.total();
        if slot < self.fin {
            Kind::Fin
        } else if slot < self.fin + self.rst {
            Kind::Rst
        } else {
            Kind::Refused
        }
    }
}

fn parse_mix(text: &str) -> Result<Mix, String> {
    let mut mix = Mix::default();
    for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let (name, weight) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected KIND=WEIGHT (fin, rst, refused)"))?;
        let weight: u32 =
            weight.parse().map_err(|_| format!("{item:?}: weight is not a number"))?;
        match name {
            "fin" => mix.fin = weight,
            "rst" => mix.rst = weight,
            "refused" => mix.refused = weight,
            other => return Err(format!("unknown kind {other:?} (fin, rst, refused)")),
        }
    }
    if mix.total() == 0 {
        return Err("all weights are 0".into());
    }
    Ok(mix)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fin,
    Rst,
    Refused,
}

/// Connections completed (and failed) per ending.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Counts {
    fin: u64,
    rst: u64,
    refused: u64,
}

impl Counts {
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Fin => self.fin += 1,
            Kind::Rst => self.rst += 1,
            Kind::Refused => self.refused += 1,
        }
    }

    fn merge(&mut self, other: Counts) {
        self.fin += other.fin;
        self.rst += other.rst;
        self.refused += other.refused;
    }

    fn total(self) -> u64 {
        self.fin + self.rst + self.refused
    }
}

/// Service ports of each ending, for checking the daemon's per-port counters.
#[derive(Debug, Default, Serialize)]
struct Ports {
    fin: Vec<u16>,
    rst: Vec<u16>,
    refused: Vec<u16>,
    idle: Vec<u16>,
}

#[derive(Debug, Serialize)]
struct Report {
    threads: usize,
    seconds: f64,
    connections: Counts,
    connections_per_second: f64,
    /// The asked rate (--rate), if paced.
    rate: Option<u64>,
    /// Busy CPU seconds of the whole host, all CPUs, over the churn window (None
    /// without a readable /proc/stat).
    host_cpu_seconds: Option<f64>,
    /// Attempts that did not go as the kind prescribes (no transitions expected from
    /// them in general; the bench reports them).
    failed: Counts,
    idle: usize,
    ports: Ports,
    first_error: Option<String>,
}

/// One worker's sockets: listeners of each kind and a bound, not listening, port.
struct Worker {
    fin: Vec<TcpListener>,
    rst: Vec<TcpListener>,
    refusing: Socket,
}

impl Worker {
    fn new(ports: u16) -> std::io::Result<Self> {
        let listeners = || (0..ports).map(|_| listen()).collect::<std::io::Result<Vec<_>>>();
        let refusing = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        refusing.bind(&SocketAddr::from(loopback(0)).into())?;
        Ok(Self { fin: listeners()?, rst: listeners()?, refusing })
    }

    fn refusing_port(&self) -> std::io::Result<u16> {
        let address = self.refusing.local_addr()?;
        address
            .as_socket()
            .map(|address| address.port())
            .ok_or_else(|| std::io::Error::other("refusing socket has no port"))
    }

    /// Churns until `stop`, paced by `pace` if given; returns the completed and the
    /// failed connections.
    fn run(
        &self,
        mix: Mix,
        pace: Option<Pace>,
        stop: &AtomicBool,
    ) -> (Counts, Counts, Option<String>) {
        let fin = addresses(&self.fin);
        let rst = addresses(&self.rst);
        let refused = match self.refusing_port() {
            Ok(port) => loopback(port),
            Err(error) => return (Counts::default(), Counts::default(), Some(error.to_string())),
        };
        let mut done = Counts::default();
        let mut failed = Counts::default();
        let mut first_error = None;
        let mut i: u32 = 0;
        let mut attempts: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(pace) = &pace {
                pace.wait(attempts, stop);
                attempts += 1;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            let kind = mix.kind(i);
            let turn = (i / mix.total()) as usize;
            i = i.wrapping_add(1);
            let result = match kind {
                Kind::Fin => {
                    let n = turn % fin.len();
                    fin_close(&self.fin[n], fin[n])
                }
                Kind::Rst => {
                    let n = turn % rst.len();
                    linger_zero_close(&self.rst[n], rst[n])
                }
                Kind::Refused => refused_connect(refused),
            };
            match result {
                Ok(()) => done.add(kind),
                Err(error) => {
                    failed.add(kind);
                    first_error.get_or_insert_with(|| format!("{kind:?}: {error}"));
                }
            }
        }
        (done, failed, first_error)
    }
}

/// One worker's schedule at a fixed rate: its attempt `n` is due at
/// `start + (n + phase) × interval`, the workers' phases spread over one interval so
/// that they do not all connect at the same instant. The schedule is absolute: a
/// worker that wakes late (sleep overshoots, a busy host) catches up at once, so the
/// achieved rate is the asked one unless the generator cannot keep up at all.
#[derive(Debug, Clone, Copy)]
struct Pace {
    start: Instant,
    /// Seconds between one worker's attempts.
    interval: f64,
    /// Fraction of an interval this worker is offset by.
    phase: f64,
}

impl Pace {
    /// `worker`'s share of `rate` connections per second over `workers` workers.
    fn new(start: Instant, rate: u64, worker: usize, workers: usize) -> Self {
        Self {
            start,
            interval: workers as f64 / rate as f64,
            phase: worker as f64 / workers as f64,
        }
    }

    /// Sleeps until attempt `n` is due (at most 10 ms at a time, so that `stop` is
    /// seen promptly even at low rates).
    fn wait(&self, n: u64, stop: &AtomicBool) {
        let due = self.start + Duration::from_secs_f64((n as f64 + self.phase) * self.interval);
        loop {
            let now = Instant::now();
            if now >= due || stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(10)));
        }
    }
}

/// The whole host's CPU accounting at one instant: /proc/stat's idle and iowait time
/// summed over the CPUs, and how many CPUs are online.
#[derive(Debug, Clone, Copy)]
struct HostSample {
    at: Instant,
    idle_seconds: f64,
    cpus: usize,
}

impl HostSample {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let at = Instant::now();
        let cpus = stat
            .lines()
            .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
            .count();
        // cpu  user nice system idle iowait irq softirq steal guest guest_nice
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if per_second <= 0 || cpus == 0 {
            return None;
        }
        let idle = ticks.get(3)? + ticks.get(4)?;
        Some(Self { at, idle_seconds: idle as f64 / per_second as f64, cpus })
    }

    /// Busy CPU seconds of the whole host since `before`: every CPU's time that was
    /// neither idle nor iowait (user, nice, system, irq, softirq, steal). Host-wide,
    /// so softirq work and the wake-ups of other processes that the load causes count.
    ///
    /// Taken as all CPUs' wall time minus idle and iowait, not as the sum of the busy
    /// fields: with tick-based CPU accounting (TICK_CPU_ACCOUNTING, HZ=250 on the bench
    /// host), the busy fields are sampled at the tick, and bursts shorter than a tick
    /// on a mostly idle CPU are mostly missed (at 1000 connections/s they showed 0.05
    /// CPU-s in 5 s where the generator alone used 0.49), while a tickless kernel
    /// (NO_HZ) measures idle time exactly, with its clock. At saturation both agree.
    fn busy_seconds_since(&self, before: &Self) -> f64 {
        let wall = self.at.duration_since(before.at).as_secs_f64();
        (before.cpus as f64 * wall - (self.idle_seconds - before.idle_seconds)).max(0.0)
    }
}

fn loopback(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

fn listen() -> std::io::Result<TcpListener> {
    TcpListener::bind(loopback(0))
}

fn addresses(listeners: &[TcpListener]) -> Vec<SocketAddr> {
    listeners.iter().filter_map(|listener| listener.local_addr().ok()).collect()
}

fn listener_ports(listeners: &[TcpListener]) -> Vec<u16> {
    addresses(listeners).iter().map(SocketAddr::port).collect()
}

/// Client FIN first; the server sees EOF and closes too (client ends in TIME_WAIT).
fn fin_close(listener: &TcpListener, address: SocketAddr) -> std::io::Result<()> {
    let client = TcpStream::connect(address)?;
    let (mut server, _) = listener.accept()?;
    drop(client);
    let mut byte = [0u8; 1];
    match server.read(&mut byte)? {
        0 => Ok(()),
        _ => Err(std::io::Error::other("server read data, expected EOF")),
    }
}

/// SO_LINGER {1, 0}: the client's close() aborts with an RST; the server sees the reset.
fn linger_zero_close(listener: &TcpListener, address: SocketAddr) -> std::io::Result<()> {
    let client = TcpStream::connect(address)?;
    SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
    let (mut server, _) = listener.accept()?;
    drop(client);
    let mut byte = [0u8; 1];
    match server.read(&mut byte) {
        Err(error) if error.kind() == ErrorKind::ConnectionReset => Ok(()),
        Err(error) => Err(error),
        Ok(_) => Err(std::io::Error::other("server read EOF or data, expected a reset")),
    }
}

fn refused_connect(address: SocketAddrV4) -> std::io::Result<()> {
    match TcpStream::connect(address) {
        Err(error) if error.kind() == ErrorKind::ConnectionRefused => Ok(()),
        Err(error) => Err(error),
        Ok(_) => Err(std::io::Error::other("connection to a non-listening port succeeded")),
    }
}

/// Idle connections one holder process keeps: both ends are descriptors, and this
/// process may not be allowed more than 20000 (RLIMIT_NOFILE, without CAP_SYS_RESOURCE).
const IDLE_PER_HOLDER: usize = 9_000;

/// `count` established connections to one listener, both ends kept open.
fn open_idle(count: usize) -> std::io::Result<(TcpListener, Vec<(TcpStream, TcpStream)>)> {
    let listener = listen()?;
    let address = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(count);
    for _ in 0..count {
        let client = TcpStream::connect(address)?;
        let (server, _) = listener.accept()?;
        pairs.push((client, server));
    }
    Ok((listener, pairs))
}

/// `--hold N`: open N idle connections, print the listener's port, keep them until
/// stdin closes (the parent exits or drops its end) or the parent dies.
fn hold(count: usize) -> Result<(), String> {
    // SAFETY: prctl with integer arguments; asks for SIGKILL when the parent dies.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let (listener, _pairs) =
        open_idle(count).map_err(|error| format!("opening {count} idle connections: {error}"))?;
    let port = listener.local_addr().map_err(|error| error.to_string())?.port();
    println!("{port}");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// Idle connections spread over holder processes (this same program, `--hold`).
struct Holders {
    children: Vec<std::process::Child>,
    ports: Vec<u16>,
}

impl Holders {
    fn start(count: usize) -> Result<Self, String> {
        let program = std::env::current_exe().map_err(|error| error.to_string())?;
        let mut holders = Self { children: Vec::new(), ports: Vec::new() };
        let mut left = count;
        while left > 0 {
            let batch = left.min(IDLE_PER_HOLDER);
            left -= batch;
            let child = std::process::Command::new(&program)
                .args(["--hold", &batch.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|error| format!("cannot start {}: {error}", program.display()))?;
            holders.children.push(child);
        }
        for child in &mut holders.children {
            let mut line = String::new();
            if let Some(stdout) = child.stdout.as_mut() {
                let _ =
                    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            }
            let port = line.trim().parse().map_err(|_| {
                "an idle-connection holder failed (see its error above)".to_string()
            })?;
            holders.ports.push(port);
        }
        Ok(holders)
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

fn run(options: Options) -> Result<(Report, Holders), String> {
    let Options { duration, threads, rate, mix, ports, idle, .. } = options;
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from))
        .max(1);
    let holders = Holders::start(idle)?;
    let workers = (0..threads)
        .map(|_| Worker::new(ports))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|error| format!("cannot set up listeners on 127.0.0.1: {error}"))?;
    let mut report_ports = Ports { idle: holders.ports.clone(), ..Ports::default() };
    for worker in &workers {
        report_ports.fin.extend(listener_ports(&worker.fin));
        report_ports.rst.extend(listener_ports(&worker.rst));
        report_ports.refused.push(worker.refusing_port().map_err(|error| error.to_string())?);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let host_before = HostSample::read();
    let started = Instant::now();
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(n, worker)| {
                let stop = &stop;
                let pace = rate.map(|rate| Pace::new(started, rate, n, threads));
                scope.spawn(move || worker.run(mix, pace, stop))
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|handle| handle.join()).collect::<Vec<_>>()
    });
    let seconds = started.elapsed().as_secs_f64();
    let host_cpu_seconds = match (host_before, HostSample::read()) {
        (Some(before), Some(after)) => Some(after.busy_seconds_since(&before)),
        _ => None,
    };
    let mut connections = Counts::default();
    let mut failed = Counts::default();
    let mut first_error = None;
    for result in results {
        let (done, failures, error) = result.map_err(|_| "a worker panicked".to_string())?;
        connections.merge(done);
        failed.merge(failures);
        first_error = first_error.or(error);
    }
    let report = Report {
        threads,
        seconds,
        connections,
        connections_per_second: connections.total() as f64 / seconds,
        rate,
        host_cpu_seconds,
        failed,
        idle,
        ports: report_ports,
        first_error,
    };
    Ok((report, holders))
}

fn main() -> ExitCode {
    let options = Options::parse();
    if let Some(count) = options.hold {
        return match hold(count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("churn: {error}");
                ExitCode::FAILURE
            }
        };
    }
    if options.idle_only {
        return match Holders::start(options.idle) {
            Ok(holders) => {
                let ports = serde_json::json!({ "idle": options.idle, "ports": holders.ports });
                println!("{ports}");
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("churn: {error}");
                ExitCode::FAILURE
            }
        };
    }
    match run(options) {
        Ok((report, holders)) => {
            println!("{}", serde_json::to_string(&report).expect("serialisable report"));
            drop(holders);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("churn: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_interleaves_by_weight() {
        let mix = parse_mix("fin=2,rst=1,refused=1").unwrap();
        let kinds: Vec<_> = (0..8).map(|i| mix.kind(i)).collect();
        use Kind::*;
        assert_eq!(kinds, [Fin, Fin, Rst, Refused, Fin, Fin, Rst, Refused]);
        assert!(parse_mix("fin=0,rst=0").is_err());
        assert!(parse_mix("syn=1").is_err());
        assert!(parse_mix("fin").is_err());
    }

    /// A short run on the host's loopback: every kind completes, none fails.
    #[test]
    fn one_second_of_churn_ends_every_kind_as_asked() {
        let options = Options::try_parse_from([
            "churn",
            "--duration",
            "1s",
            "--threads",
            "2",
            "--ports",
            "1",
        ])
        .unwrap();
        let (report, _holders) = run(options).unwrap();
        assert_eq!(report.failed.total(), 0, "{:?}", report.first_error);
        assert!(report.connections.fin > 0 && report.connections.rst > 0);
        assert!(report.connections.refused > 0);
        assert_eq!(report.ports.fin.len(), 2);
    }

    /// A paced run makes the asked rate, no more, and reads the host's CPU time.
    #[test]
    fn a_paced_run_keeps_its_rate() {
        let options = Options::try_parse_from([
            "churn",
            "--duration",
            "500ms",
            "--threads",
            "2",
            "--ports",
            "1",
            "--rate",
            "400",
        ])
        .unwrap();
        let (report, _holders) = run(options).unwrap();
        assert_eq!(report.failed.total(), 0, "{:?}", report.first_error);
        let made = report.connections.total();
        assert!((190..=212).contains(&made), "{made} connections in 0.5 s at 400/s");
        // Some of the host's time, at most all of it (other tests may churn meanwhile).
        let busy = report.host_cpu_seconds.unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        assert!(busy > 0.0 && busy <= 1.05 * cpus * report.seconds, "{busy} CPU-s");
    }

    /// Idle connections are both ends of an established connection (the holder
    /// processes, which run this binary, are exercised by the bench).
    #[test]
    fn idle_connections_are_established_pairs() {
        let (listener, pairs) = open_idle(5).unwrap();
        assert_eq!(pairs.len(), 5);
        for (client, server) in &pairs {
            assert_eq!(client.peer_addr().unwrap(), server.local_addr().unwrap());
            assert_eq!(client.peer_addr().unwrap(), listener.local_addr().unwrap());
        }
    }
}
