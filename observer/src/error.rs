//! Errors that stop the daemon, each rendered as one line that says what is missing.

use std::{io, net::SocketAddr, path::PathBuf};

use crate::export::web_config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "insufficient privileges: loading eBPF programs needs root, or CAP_BPF and \
         CAP_PERFMON (CAP_SYS_ADMIN on kernels before 5.8); missing: {missing}"
    )]
    Privileges { missing: String },

    #[error(
        "kernel BTF not found at {}: observer needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Linux 5.5+)", path.display()
    )]
    NoBtf { path: PathBuf },

    #[error("cannot parse kernel BTF at {}", path.display())]
    BtfParse {
        path: PathBuf,
        /// btf-rs's error (our layout) or aya's (the loader's own parse).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("this kernel has no `{name}` tracepoint (observer needs Linux 5.10+ with BTF)")]
    MissingTracepoint { name: &'static str },

    #[error("this kernel's BTF has no `{field}` in struct sock/tcp_sock; unsupported kernel")]
    KernelLayout { field: &'static str },

    #[error("the eBPF object has no {what}: it was not built from these sources")]
    NotInObject { what: String },

    #[error("the kernel refused eBPF program `{program}` (--log.level=debug shows why)")]
    LoadProgram {
        program: &'static str,
        /// aya's error; for a verifier refusal only the system call's error (the
        /// verifier's log, many lines, goes to the debug log).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("failed to load the eBPF object")]
    LoadObject {
        #[source]
        source: aya::EbpfError,
    },

    #[error("cannot set up the eBPF map `{map}`")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("failed to attach eBPF program `{program}`")]
    Attach {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("cannot listen on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("invalid web config file {}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },

    #[error(
        "--path.cgroupfs {}: not a cgroup v2 hierarchy, nor a directory holding one as \
         `unified`", path.display()
    )]
    NotCgroup2 { path: PathBuf },

    #[error("{context}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The exit code of a bad command line (clap's own); [`Error::exit_code`] gives the others.
pub const USAGE_EXIT: u8 = 2;

impl Error {
    /// The error and its causes on one line (see [`one_line`]).
    pub fn one_line(&self) -> String {
        one_line(self)
    }

    /// The process exit code: one per kind of failure, so that a unit manager or a
    /// script can tell them apart (README "Exit codes"; 2 is [`USAGE_EXIT`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Io { .. } => 1,
            Error::NotCgroup2 { .. } => USAGE_EXIT,
            Error::Config { .. } => 3,
            Error::Privileges { .. } => 4,
            Error::NoBtf { .. } => 5,
            Error::BtfParse { .. } => 6,
            Error::MissingTracepoint { .. } | Error::KernelLayout { .. } => 7,
            Error::NotInObject { .. }
            | Error::LoadProgram { .. }
            | Error::LoadObject { .. }
            | Error::Map { .. }
            | Error::Attach { .. } => 8,
            Error::Listen { .. } => 9,
        }
    }
}

/// An error and its causes on one line, `what: why: why…` (a cause's text that the line
/// already holds is not repeated; multi-line texts, as YAML parsers write, are joined).
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let text = error.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = error.source();
    }
    line
}
