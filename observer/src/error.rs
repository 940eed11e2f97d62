//! Errors that stop the daemon, each rendered as one line that says what is missing.

use std::{error::Error as _, io, net::SocketAddr, path::PathBuf};

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

    #[error("failed to load eBPF program `{program}`: {reason}")]
    LoadProgram { program: &'static str, reason: String },

    #[error("failed to load the eBPF object: {reason}")]
    LoadObject { reason: String },

    #[error("failed to attach eBPF program `{program}`: {reason}")]
    Attach { program: &'static str, reason: String },

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

    #[error("{context}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Process exit codes, one per kind of failure, so that a unit manager or a script can
/// tell them apart (README "Exit codes"). 2 is clap's, for a bad command line.
pub mod exit {
    pub const RUNTIME: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONFIG: u8 = 3;
    pub const PRIVILEGES: u8 = 4;
    pub const NO_BTF: u8 = 5;
    pub const BAD_BTF: u8 = 6;
    pub const UNSUPPORTED_KERNEL: u8 = 7;
    pub const BPF_LOAD: u8 = 8;
    pub const LISTEN: u8 = 9;
}

impl Error {
    /// The error and its causes on one line, `what: why: why…` (a cause's text that the
    /// line already holds is not repeated; multi-line texts, as YAML parsers write, are
    /// joined).
    pub fn one_line(&self) -> String {
        let mut line = self.to_string();
        let mut cause = self.source();
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

    /// The process exit code for this failure (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config { .. } => exit::CONFIG,
            Error::Privileges { .. } => exit::PRIVILEGES,
            Error::NoBtf { .. } => exit::NO_BTF,
            Error::BtfParse { .. } => exit::BAD_BTF,
            Error::MissingTracepoint { .. } | Error::KernelLayout { .. } => {
                exit::UNSUPPORTED_KERNEL
            }
            Error::LoadProgram { .. } | Error::LoadObject { .. } | Error::Attach { .. } => {
                exit::BPF_LOAD
            }
            Error::Listen { .. } => exit::LISTEN,
            Error::Io { .. } => exit::RUNTIME,
        }
    }
}
