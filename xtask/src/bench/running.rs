//! The tool under test, started (and attached) before a measurement and stopped after
//! it; with observer-idle, the idle connections it tracks meanwhile.

use std::{io::Read as _, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    Bench, Config,
    daemon::{Daemon, settle},
    peers,
    system::{self, Process},
};
use crate::command::target_dir;

/// The tool under test, running.
pub struct Running {
    pub processes: Vec<Process>,
    pub daemon: Option<Daemon>,
    /// libbpf-tools report lost events on stderr; these threads add them up.
    lost_counters: Vec<std::thread::JoinHandle<u64>>,
    /// With observer-idle: the idle connections, open while the daemon runs.
    pub idle: Option<IdleConnections>,
}

impl Bench<'_> {
    /// Starts `config`'s tool and waits until its programs are attached.
    pub fn start(&self, config: Config) -> anyhow::Result<Running> {
        let mut running =
            Running { processes: Vec::new(), daemon: None, lost_counters: Vec::new(), idle: None };
        match config {
            Config::None => {}
            Config::Observer | Config::ObserverIdle | Config::ObserverHooks => {
                let port = free_port()?;
                let mut command = std::process::Command::new(target_dir().join("release/observer"));
                command
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                    // Losses are in the table; one warning per lost record would flood it.
                    .arg("--log.level=error")
                    .args(&self.options.daemon_args)
                    .args((config == Config::ObserverHooks).then_some("--debug.empty-programs"))
                    .stdout(system::null());
                let mut process = Process::spawn("observer", &mut command)?;
                let daemon = Daemon::new(process.pid(), port);
                if !system::wait_for(Duration::from_secs(30), || {
                    process.is_running() && daemon.metrics().is_ok()
                }) {
                    system::check_interrupted()?;
                    bail!("the observer daemon did not start serving metrics (see its log above)");
                }
                if config == Config::ObserverIdle {
                    running.idle = Some(self.hold_idle(&daemon)?);
                }
                // Its programs record nothing: only the throughput and their run time count.
                if config.is_observer() {
                    running.daemon = Some(daemon);
                }
                running.processes.push(process);
            }
            Config::Bpftrace => {
                let mut command =
                    system::with_tracefs("bpftrace".as_ref(), &["-e", peers::BPFTRACE_PROGRAM]);
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
                running.processes.push(Process::spawn("bpftrace", &mut command)?);
            }
            Config::LibbpfTools => {
                let tools = self.libbpf_tools.context("libbpf-tools not installed")?;
                for name in ["tcpstates", "tcplife"] {
                    let (loader, args) = tools.command(name);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let mut command = system::with_tracefs(&loader, &args);
                    command.stdout(system::null()).stderr(Stdio::piped());
                    let mut process = Process::spawn(name, &mut command)?;
                    if let Some(stderr) = process.child().stderr.take() {
                        running.lost_counters.push(std::thread::spawn(move || {
                            peers::count_lost(std::io::BufReader::new(stderr))
                        }));
                    }
                    running.processes.push(process);
                }
            }
        }
        for process in &mut running.processes {
            let pid = process.pid();
            if !system::wait_for(Duration::from_secs(30), || {
                !process.is_running() || system::has_attached(pid)
            }) || !process.is_running()
            {
                system::check_interrupted()?;
                bail!("{} did not attach (or exited)", process.name);
            }
        }
        Ok(running)
    }

    /// Opens the idle connections (in the bench namespace, tracked by `daemon`) and
    /// waits until the daemon has taken them all in.
    fn hold_idle(&self, daemon: &Daemon) -> anyhow::Result<IdleConnections> {
        let before = daemon.metrics()?.sum("observer_events_lost_total", &[]);
        let mut command =
            self.namespace.command(&target_dir().join("release/churn").display().to_string());
        command
            .arg(format!("--idle={}", self.options.idle))
            .arg("--idle-only")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut holder = Process::spawn("churn --idle-only", &mut command)?;
        let mut line = String::new();
        if let Some(stdout) = holder.child().stdout.take() {
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        }
        if line.trim().is_empty() {
            bail!("opening {} idle connections failed", self.options.idle);
        }
        settle(daemon);
        let metrics = daemon.metrics()?;
        let setup_lost = (metrics.sum("observer_events_lost_total", &[]) - before).max(0.0) as u64;
        let tracked = metrics.sum("observer_tracker_sockets", &[]) as u64;
        Ok(IdleConnections { holder, setup_lost, tracked })
    }
}

impl Running {
    /// The tool's processes, whose BPF programs the cost run reads.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(Process::pid).collect()
    }

    /// Fails if a process of the tool exited before it was stopped.
    pub fn check_still_running(&mut self) -> anyhow::Result<()> {
        for process in &mut self.processes {
            if !process.is_running() {
                bail!("{} exited during the run", process.name);
            }
        }
        Ok(())
    }

    /// Stops bpftrace with SIGINT, which makes it print its count. It usually exits in
    /// 0.2 s, but once in a bench run took over 10 s: it gets a minute.
    pub fn stop_bpftrace(&mut self) -> Option<u64> {
        let process = self.processes.first_mut()?;
        process.stop_within(libc::SIGINT, Duration::from_secs(60));
        let mut text = String::new();
        process.child().stdout.as_mut()?.read_to_string(&mut text).ok()?;
        peers::bpftrace_count(&text)
    }

    /// Stops every process with SIGINT; returns the events libbpf-tools reported lost
    /// (None if a counter failed).
    pub fn stop(mut self) -> Option<u64> {
        for process in &mut self.processes {
            process.stop(libc::SIGINT);
        }
        self.lost_counters.drain(..).map(|counter| counter.join().ok()).sum()
    }
}

/// Idle connections held open by a `churn --idle-only` process.
pub struct IdleConnections {
    holder: Process,
    /// Events lost while they were all opened at once.
    pub setup_lost: u64,
    /// observer_tracker_sockets once they were all open.
    pub tracked: u64,
}

impl IdleConnections {
    /// Closes them all at once; returns the events lost meanwhile.
    pub fn release(mut self, daemon: &Daemon) -> anyhow::Result<u64> {
        let before = daemon.metrics()?.sum("observer_events_lost_total", &[]);
        drop(self.holder.child().stdin.take());
        let status = self.holder.child().wait()?;
        if !status.success() {
            bail!("the idle connection holder failed ({status})");
        }
        settle(daemon);
        Ok((daemon.metrics()?.sum("observer_events_lost_total", &[]) - before).max(0.0) as u64)
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
