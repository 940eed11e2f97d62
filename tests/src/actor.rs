//! Separate processes that own the test's sockets, so a test can check that the daemon
//! names the right process for each side of a connection.
//!
//! An [`Actor`] is a forked child with its own name (`comm`), running a script inside a
//! network namespace. It talks to the test over two pipes: the script calls
//! [`Cue::ready`] when it reached a point the test waits for, and [`Cue::wait`] to
//! pause until the test says go. Fork (rather than a helper binary) keeps the suite one
//! binary, as the VM tests need.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    os::fd::OwnedFd,
    panic::AssertUnwindSafe,
};

use nix::{
    fcntl::OFlag,
    sys::{
        signal::{Signal, kill},
        wait::{WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork, pipe2},
};

use crate::net::Namespace;

/// What the child writes before the text of its panic, instead of a ready byte.
const PANICKED: u8 = b'!';

/// The child's end of the conversation.
pub struct Cue {
    from_test: File,
    to_test: File,
}

impl Cue {
    /// Tells the test this step is done.
    pub fn ready(&mut self) {
        self.to_test.write_all(b"r").expect("tell the test");
    }

    /// Waits until the test says go.
    pub fn wait(&mut self) {
        let mut byte = [0u8];
        self.from_test.read_exact(&mut byte).expect("hear from the test");
    }
}

pub struct Actor {
    pub pid: u32,
    to_child: File,
    from_child: File,
    name: String,
    /// Set by [`Actor::join`]; otherwise dropping the actor kills and reaps the child.
    reaped: bool,
}

impl Actor {
    /// Forks a process called `name` (at most 15 bytes) that enters `namespace` and runs
    /// `script`.
    pub fn spawn(name: &str, namespace: &Namespace, script: impl FnOnce(&mut Cue)) -> Actor {
        assert!(name.len() <= 15, "comm holds 15 bytes");
        // Close-on-exec: a program another test starts meanwhile must not hold a copy of
        // the child's end, or the test would not see the end of a child that died.
        let (child_reads, test_writes) = pipe2(OFlag::O_CLOEXEC).expect("pipe");
        let (test_reads, child_writes) = pipe2(OFlag::O_CLOEXEC).expect("pipe");
        let comm = std::ffi::CString::new(name).expect("name");
        // SAFETY: the child only runs the script and exits; glibc keeps malloc usable
        // after fork, and the script makes plain system calls.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                drop((test_writes, test_reads));
                // SAFETY: PR_SET_NAME with a NUL-terminated string; PR_SET_PDEATHSIG with a
                // signal number (a backstop for a test process that dies outright).
                unsafe {
                    libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                let mut cue =
                    Cue { from_test: File::from(child_reads), to_test: File::from(child_writes) };
                // The child's stderr is the test harness's capture buffer, copied by fork
                // and never printed: send the panic (with its location) to the test.
                let report = cue.to_test.try_clone().expect("dup");
                std::panic::set_hook(Box::new(move |info| {
                    let _ = (&report).write_all(format!("{}{info}", PANICKED as char).as_bytes());
                }));
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    namespace.enter(|| script(&mut cue));
                }));
                // SAFETY: leave without running the test harness's atexit handlers.
                unsafe { libc::_exit(if outcome.is_ok() { 0 } else { 1 }) }
            }
            ForkResult::Parent { child } => {
                drop::<(OwnedFd, OwnedFd)>((child_reads, child_writes));
                Actor {
                    pid: child.as_raw() as u32,
                    to_child: File::from(test_writes),
                    from_child: File::from(test_reads),
                    name: name.to_string(),
                    reaped: false,
                }
            }
        }
    }

    /// Waits for the script's next [`Cue::ready`]; panics with the script's own panic
    /// if it failed instead.
    pub fn until_ready(&mut self) {
        let mut byte = [0u8];
        if let Err(error) = self.from_child.read_exact(&mut byte) {
            // No panic report: the child died of a signal or exited outside the script.
            // Its status says which.
            let status = waitpid(Pid::from_raw(self.pid as i32), None);
            self.reaped = status.is_ok();
            panic!("{} ended early ({error}; {status:?})", self.name);
        }
        if byte[0] == PANICKED {
            let mut report = String::new();
            let _ = self.from_child.read_to_string(&mut report);
            panic!("{} failed: {report}", self.name);
        }
    }

    /// Lets the script past its next [`Cue::wait`].
    pub fn go(&mut self) {
        self.to_child.write_all(b"g").expect("tell the actor");
    }

    /// Waits for the script to finish; panics if it failed.
    pub fn join(mut self) {
        let status = waitpid(Pid::from_raw(self.pid as i32), None).expect("waitpid");
        self.reaped = true;
        if !matches!(status, WaitStatus::Exited(_, 0)) {
            let mut report = String::new();
            let _ = self.from_child.read_to_string(&mut report);
            panic!(
                "{} failed ({status:?}): {}",
                self.name,
                report.trim_start_matches(PANICKED as char)
            );
        }
    }
}

/// A test that fails midway must not leave its actors waiting for a cue forever: they
/// would hold the harness's output pipe (and whatever else it inherited) open.
impl Drop for Actor {
    fn drop(&mut self) {
        if !self.reaped {
            let pid = Pid::from_raw(self.pid as i32);
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}
