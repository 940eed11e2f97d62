//! Errors that stop the daemon, each rendered as one line that says what is missing.

use std::{io, net::SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "insufficient privileges: loading eBPF programs needs root, or CAP_BPF and \
         CAP_PERFMON (CAP_SYS_ADMIN on kernels before 5.8); missing: {missing}"
    )]
    Privileges { missing: String },

    #[error(
        "kernel BTF not found at {path}: observer needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Linux 5.5+)"
    )]
    NoBtf { path: &'static str },

    #[error("cannot parse kernel BTF at {path}: {reason}")]
    BtfParse { path: &'static str, reason: String },

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

    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Process exit code: 2 for missing privileges (as for usage errors), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Privileges { .. } => 2,
            _ => 1,
        }
    }
}
