//! What the bench sets up on the host and must undo: a network namespace, child
//! processes, BPF run-time statistics; and what it reads from the kernel about them.
//! Every guard undoes its part on drop, so an error or Ctrl-C leaves nothing behind.

use std::{
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::command::{exec, output};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM only set a flag: the bench stops at its next step and the guards
/// clean up (the children, in our process group, get Ctrl-C's SIGINT themselves).
pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaned up");
    }
    Ok(())
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > timeout || INTERRUPTED.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A network namespace of the bench's own, deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// Loopback up, and the whole port range for connect(): the churn's TIME_WAIT
    /// sockets would otherwise exhaust the default 28k ephemeral ports.
    pub fn create() -> anyhow::Result<Self> {
        let name = format!("observer-bench-{}", std::process::id());
        exec(Command::new("ip").args(["netns", "add", &name]))?;
        let namespace = Self { name };
        exec(Command::new("ip").args(["-n", &namespace.name, "link", "set", "lo", "up"]))?;
        exec(namespace.command("sysctl").args([
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
        ]))?;
        Ok(namespace)
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: same pid).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) if still running on drop.
pub struct Process {
    pub name: String,
    child: Child,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Self> {
        let child = command.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Self { name: name.to_string(), child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` and waits up to 10 s for the exit, then kills.
    pub fn stop(&mut self, signal: libc::c_int) {
        self.stop_within(signal, Duration::from_secs(10));
    }

    /// Sends `signal` and waits up to `timeout` for the exit, then kills.
    pub fn stop_within(&mut self, signal: libc::c_int, timeout: Duration) {
        if !self.is_running() {
            return;
        }
        // SAFETY: signals our own child, which has not been reaped (try_wait said running).
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        if !wait_for(timeout, || !self.is_running()) {
            eprintln!("bench: {} did not stop; killing it", self.name);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
    }
}

/// Runs `tool args…` in a mount namespace of its own with tracefs mounted, which
/// classic tracepoints need (this host does not mount it); nothing changes outside.
/// `unshare` and `sh` exec, so the returned process is the tool itself.
pub fn with_tracefs(tool: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing; exec \"$@\"")
        .arg("sh")
        .arg(tool)
        .args(args);
    command
}

/// BPF run-time statistics (`kernel.bpf_stats_enabled`), on while this lives: held
/// through a BPF_ENABLE_STATS descriptor, so the kernel turns them back off (restoring
/// the previous setting) when it closes — even if the bench is killed.
pub struct BpfStats {
    _fd: OwnedFd,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // union bpf_attr { struct { __u32 type; } enable_stats; ... }, zero-padded.
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        // SAFETY: bpf(2) reads `attr` (valid for its size) and returns a new descriptor.
        let fd = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_mut_ptr(), attr.len() as u32)
        };
        if fd < 0 {
            bail!("cannot enable BPF run-time statistics: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just gave us, owned by nobody else.
        Ok(Self { _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }
}

/// Run time and run count summed over the BPF programs a process holds open.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgramStats {
    pub programs: u32,
    pub run_time_ns: u64,
    pub run_count: u64,
    /// Runs the kernel skipped because the program was already running on that CPU.
    pub recursion_misses: u64,
}

impl ProgramStats {
    pub fn of_process(pid: u32) -> Self {
        let mut stats = Self::default();
        let mut seen = Vec::new();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return stats };
        for fd in fds.filter_map(Result::ok) {
            let is_program = fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog");
            if !is_program {
                continue;
            }
            let Ok(info) =
                fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().display()))
            else {
                continue;
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            // A program may be open through several descriptors: count it once.
            let id = field("prog_id:");
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            stats.programs += 1;
            stats.run_time_ns += field("run_time_ns:");
            stats.run_count += field("run_cnt:");
            stats.recursion_misses += field("recursion_misses:");
        }
        stats
    }

    pub fn since(self, before: Self) -> Self {
        Self {
            programs: self.programs,
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            run_count: self.run_count.saturating_sub(before.run_count),
            recursion_misses: self.recursion_misses.saturating_sub(before.recursion_misses),
        }
    }

    pub fn add(&mut self, other: Self) {
        self.programs += other.programs;
        self.run_time_ns += other.run_time_ns;
        self.run_count += other.run_count;
        self.recursion_misses += other.recursion_misses;
    }
}

/// Whether the process has attached something (a BPF link or a perf event).
pub fn has_attached(pid: u32) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.filter_map(Result::ok).any(|fd| {
        fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            target == "anon_inode:bpf_link" || target == "anon_inode:[perf_event]"
        })
    })
}

/// CPU seconds (user + system) the process has used.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at state, field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) as f64 / ticks)
}

/// Peak resident set size (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Resident set size now (VmRSS) in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// BPF tracing programs loaded while none of the bench's tools run (bpftool's view),
/// e.g. other observer daemons of a shared host: they run on every transition of the
/// bench too, the baseline included.
pub fn foreign_tracing_programs() -> Vec<String> {
    let Some(json) = output(Command::new("bpftool").args(["prog", "show", "--json"])) else {
        return vec!["(bpftool prog show failed: cannot tell)".to_string()];
    };
    let Ok(serde_json::Value::Array(programs)) = serde_json::from_str(&json) else {
        return Vec::new();
    };
    programs
        .iter()
        .filter(|program| {
            matches!(
                program["type"].as_str(),
                Some("tracing" | "raw_tracepoint" | "tracepoint" | "kprobe" | "perf_event")
            )
        })
        .map(|program| {
            let owners: Vec<String> = program["pids"]
                .as_array()
                .map(|pids| {
                    pids.iter()
                        .map(|pid| {
                            format!("{}[{}]", pid["comm"].as_str().unwrap_or("?"), pid["pid"])
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "id {} {} {} ({})",
                program["id"],
                program["type"].as_str().unwrap_or("?"),
                program["name"].as_str().unwrap_or("?"),
                if owners.is_empty() {
                    "owner not shown by this bpftool".to_string()
                } else {
                    owners.join(", ")
                }
            )
        })
        .collect()
}

/// CPU model, cores, kernel and memory, for the table's caption.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim()))
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let memory_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "Machine: {model}, {cores} cores, {:.1} GiB memory, kernel {}",
        memory_kib as f64 / (1024.0 * 1024.0),
        kernel.trim()
    )
}

/// Where a process's standard output goes when it is not read.
pub fn null() -> Stdio {
    Stdio::null()
}
