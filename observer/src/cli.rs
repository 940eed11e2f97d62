//! Command-line interface. Flag names follow node_exporter's (`--web.listen-address`,
//! `--web.telemetry-path`, `--log.level`) so operators can reuse their habits.

use std::{net::SocketAddr, num::NonZeroUsize};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Observe every TCP connection on this host and tell how it ended: FIN, RST or
/// timeout, and exactly why. Runs as a Prometheus exporter by default.
#[derive(Debug, Parser)]
#[command(name = "observer", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub daemon: DaemonArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print one line per closed connection as it happens (like tcplife, with the verdict).
    Watch(WatchArgs),
}

/// Flags of the exporter (the default command).
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Address on which to expose metrics, /connections and /healthz.
    #[arg(long = "web.listen-address", value_name = "ADDRESS", default_value = "127.0.0.1:9977")]
    pub listen_address: SocketAddr,

    /// Path under which to expose metrics.
    #[arg(
        long = "web.telemetry-path",
        value_name = "PATH",
        default_value = "/metrics",
        value_parser = parse_telemetry_path
    )]
    pub telemetry_path: String,

    /// Path to a web configuration file (exporter-toolkit format) that enables TLS
    /// and/or basic authentication on every endpoint (docs/security.md).
    #[arg(long = "web.config.file", value_name = "PATH")]
    pub web_config_file: Option<std::path::PathBuf>,

    /// Distinct values of the `port` label before further ports become "other".
    #[arg(long = "metrics.max-ports", value_name = "N", default_value_t = 256)]
    pub max_ports: usize,

    /// Add a `netns` label (namespace inode) to observer_tcp_closes_total.
    #[arg(long = "metrics.netns-label")]
    pub netns_label: bool,

    /// Add a `comm` label (owning process name, or "unknown") to
    /// observer_tcp_closes_total.
    #[arg(long = "metrics.comm-label")]
    pub comm_label: bool,

    /// Distinct values of each optional label before further ones become "other".
    #[arg(long = "metrics.max-label-values", value_name = "N", default_value_t = 64)]
    pub max_label_values: usize,

    /// How often the socket inventory (live counts per namespace and state, ages) is
    /// refreshed between scrapes; every scrape also refreshes it. 0s: only on scrape.
    #[arg(
        long = "inventory.interval",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub inventory_interval: std::time::Duration,

    /// Open HTTP connections at most; past it, a new connection closes the oldest (so a
    /// flood of idle connections cannot lock a scraper out). Lowered to what the
    /// open-file limit leaves room for.
    #[arg(long = "web.max-connections", value_name = "N", default_value_t = 256)]
    pub max_connections: usize,

    /// HTTP requests handled at once at most; others are answered 503 at once.
    #[arg(long = "web.max-requests", value_name = "N", default_value_t = 40)]
    pub max_requests: usize,

    /// Closed connections kept for /connections (newest replace oldest).
    #[arg(long = "connections.max-recent", value_name = "N", default_value_t = 1000)]
    pub max_recent: usize,

    /// Also append every kernel event, decoded, to this file as JSON lines (the raw
    /// evidence behind each verdict, for bug reports; grows without bound).
    #[arg(long = "debug.events-file", value_name = "PATH")]
    pub events_file: Option<std::path::PathBuf>,
}

/// Flags shared by the exporter and `watch`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Only log messages with the given severity or above.
    #[arg(long = "log.level", value_name = "LEVEL", value_enum, default_value_t = LogLevel::Info, global = true)]
    pub log_level: LogLevel,

    /// Sockets followed at once; past this the least recently active is dropped
    /// (counted in observer_tracker_dropped_sockets_total).
    #[arg(long = "tracker.max-sockets", value_name = "N", default_value = "262144", global = true)]
    pub max_sockets: NonZeroUsize,

    /// Size of each CPU's kernel-to-daemon ring buffer in bytes (rounded up to a power of
    /// two number of pages). Default: 4 MiB per CPU up to 4 CPUs, then 16 MiB shared
    /// out, at least 1 MiB per CPU.
    #[arg(
        long = "bpf.ring-buffer-bytes",
        value_name = "BYTES",
        value_parser = clap::value_parser!(u32).range(4096..=1 << 30),
        global = true
    )]
    pub ring_buffer_bytes: Option<u32>,

    /// The host's cgroup v2 hierarchy, to name the cgroup (and container) of each
    /// socket's owner: a cgroup2 mount, or a directory holding one as `unified`.
    /// Default: the cgroup2 mount of observer's own mount namespace. In a container, bind
    /// the host's /sys/fs/cgroup here (a container's own is only its subtree).
    #[arg(long = "path.cgroupfs", value_name = "PATH", global = true)]
    pub cgroupfs: Option<std::path::PathBuf>,

    /// Where the kernel cannot trace inet_accept() returning (no BPF trampolines), name
    /// the process that accepted each server socket from the accept() system-call
    /// tracepoints. They tax every system call of every process on the host (getppid()
    /// 146 → 169 ns on the benchmark machine), so they are off by default: an accepted
    /// socket is then owned by its listener's owner until a system call of its own
    /// (close, shutdown) names the process (docs/connections.md).
    #[arg(long = "bpf.accept-syscall-tracepoints", global = true)]
    pub accept_syscall_tracepoints: bool,

    /// Kernel BTF to read instead of the running kernel's (for tests of a missing or
    /// corrupt BTF; the programs still load into the running kernel).
    #[arg(
        long = "debug.btf-path",
        value_name = "PATH",
        default_value = crate::kernel::layout::VMLINUX_BTF,
        hide = true,
        global = true
    )]
    pub btf_path: std::path::PathBuf,

    /// Only record sockets of the network namespace with this inode number (tests that
    /// need exact event counts on a busy host).
    #[arg(long = "debug.only-netns", value_name = "INODE", hide = true, global = true)]
    pub only_netns: Option<u32>,

    /// Attach every program but have each return at once, recording nothing: what the
    /// hooks alone cost (`cargo xtask bench`'s "observer-hooks" row).
    #[arg(long = "debug.empty-programs", hide = true, global = true)]
    pub empty_programs: bool,

    /// Attach only each tracepoint's primary program, not its standby twin: what the
    /// twins cost (`cargo xtask bench --daemon-arg=--debug.no-standby`). Nested runs the
    /// kernel skips are then counted as lost rather than recorded.
    #[arg(long = "debug.no-standby", hide = true, global = true)]
    pub no_standby: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Print JSON objects (the /connections format), one per line.
    #[arg(long)]
    pub json: bool,

    /// Only connections whose service port is N (repeatable).
    #[arg(long = "port", value_name = "N")]
    pub ports: Vec<u16>,

    /// Print every kernel event (transitions and resets) as JSON instead of verdicts:
    /// the raw evidence the classifier decides on.
    #[arg(long, conflicts_with = "json")]
    pub events: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|error| error.to_string())
}

fn parse_telemetry_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if ["/", "/healthz", "/connections"].contains(&path) {
        return Err(format!("{path} is already served by observer"));
    }
    Ok(path.to_string())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn flags_keep_their_dotted_names() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "--web.listen-address",
            "--web.telemetry-path",
            "--log.level",
            "--metrics.max-ports",
            "--connections.max-recent",
            "--tracker.max-sockets",
            "--bpf.ring-buffer-bytes",
            "--debug.events-file",
            "--metrics.netns-label",
            "--metrics.comm-label",
            "--metrics.max-label-values",
            "--inventory.interval",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        }
        let cli = Cli::try_parse_from(["observer", "--web.listen-address", "[::1]:9100"]).unwrap();
        assert_eq!(cli.daemon.listen_address, "[::1]:9100".parse().unwrap());
        assert_eq!(cli.daemon.telemetry_path, "/metrics");
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Cli::try_parse_from(["observer", "--web.listen-address", "nowhere"]).is_err());
        assert!(Cli::try_parse_from(["observer", "--web.telemetry-path", "metrics"]).is_err());
        assert!(Cli::try_parse_from(["observer", "--web.telemetry-path", "/healthz"]).is_err());
        assert!(Cli::try_parse_from(["observer", "--tracker.max-sockets", "0"]).is_err());
        assert!(Cli::try_parse_from(["observer", "--log.level", "loud"]).is_err());
        assert!(Cli::try_parse_from(["observer", "--inventory.interval", "often"]).is_err());
        assert!(Cli::try_parse_from(["observer", "watch", "--json", "--events"]).is_err());
        let watch =
            Cli::try_parse_from(["observer", "watch", "--port", "80", "--port", "443"]).unwrap();
        let Some(Command::Watch(args)) = watch.command else { panic!("not watch") };
        assert_eq!(args.ports, vec![80, 443]);
    }
}
