//! Socket knobs the scenarios turn, on std `TcpStream`s (socket2 where it has them,
//! libc for the rest).

use std::{
    io::{self, Read as _},
    mem::size_of,
    net::TcpStream,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};

/// `SO_LINGER {1, 0}`: close() sends RST instead of FIN.
pub fn set_linger_zero(stream: &TcpStream) {
    SockRef::from(stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
}

/// Keepalive after 1 s idle, probes every 1 s, give up after 2.
pub fn set_fast_keepalive(stream: &TcpStream) {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(1))
        .with_interval(Duration::from_secs(1))
        .with_retries(2);
    SockRef::from(stream).set_tcp_keepalive(&keepalive).expect("keepalive");
}

pub fn set_user_timeout(stream: &TcpStream, timeout: Duration) {
    SockRef::from(stream).set_tcp_user_timeout(Some(timeout)).expect("TCP_USER_TIMEOUT");
}

fn set_int(stream: &TcpStream, level: i32, option: i32, value: i32) {
    // SAFETY: valid descriptor and a pointer to an int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            option,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt({level}, {option}): {}", io::Error::last_os_error());
}

/// TCP_LINGER2: negative aborts FIN_WAIT2 at close.
pub fn set_linger2(stream: &TcpStream, seconds: i32) {
    set_int(stream, libc::IPPROTO_TCP, libc::TCP_LINGER2, seconds);
}

pub fn set_receive_buffer(stream: &TcpStream, bytes: usize) {
    SockRef::from(stream).set_recv_buffer_size(bytes).expect("SO_RCVBUF");
}

/// The kernel's TCP state of the socket (TCP_INFO `tcpi_state`), e.g. 5 = FIN_WAIT2.
pub fn tcp_state(stream: &TcpStream) -> u8 {
    let mut info = [0u8; 256];
    let mut length = info.len() as libc::socklen_t;
    // SAFETY: valid descriptor and buffer of `length` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut length,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info[0]
}

pub const TCP_FIN_WAIT2: u8 = 5;
pub const TCP_CLOSE_WAIT: u8 = 8;

/// Bytes waiting in the receive queue (SIOCINQ).
pub fn unread_bytes(stream: &TcpStream) -> usize {
    let mut count: libc::c_int = 0;
    // SAFETY: FIONREAD/SIOCINQ writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut count) };
    assert_eq!(rc, 0, "SIOCINQ: {}", io::Error::last_os_error());
    count as usize
}

/// `connect()` with AF_UNSPEC: disconnects a connected socket (RST to the peer).
pub fn disconnect(stream: &TcpStream) {
    let address =
        libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
    // SAFETY: valid descriptor and address.
    let rc = unsafe {
        libc::connect(stream.as_raw_fd(), &address, size_of::<libc::sockaddr>() as libc::socklen_t)
    };
    assert_eq!(rc, 0, "connect(AF_UNSPEC): {}", io::Error::last_os_error());
}

/// Reads until EOF; returns the bytes read.
pub fn read_to_end(mut stream: &TcpStream) -> usize {
    let mut buffer = Vec::new();
    stream.read_to_end(&mut buffer).expect("read");
    buffer.len()
}

/// Hands `stream` to a new process (`sleep`) as its fd 3, so the connection belongs to
/// that process alone once the caller drops its copy; killing it makes the kernel close
/// the connection on its behalf.
pub fn give_to_process(stream: TcpStream) -> Child {
    let fd = OwnedFd::from(stream);
    let raw = fd.as_raw_fd();
    let mut command = Command::new("sleep");
    command.arg("600");
    // SAFETY: dup2 is async-signal-safe; the new fd 3 does not have CLOEXEC.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn holder process");
    drop(fd);
    child
}

/// Wraps a raw descriptor (from a socket2 socket) as a `TcpStream`.
pub fn stream_from(socket: socket2::Socket) -> TcpStream {
    let fd = OwnedFd::from(socket);
    // SAFETY: the descriptor is a TCP socket we own.
    unsafe { TcpStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
}

/// SO_RCVBUF on a listener, inherited by the sockets it accepts (sets their window).
pub fn set_receive_buffer_listener(listener: &std::net::TcpListener, bytes: usize) {
    SockRef::from(listener).set_recv_buffer_size(bytes).expect("SO_RCVBUF");
}

/// Runs `f` with this thread pinned to CPU 0, so the timers the kernel arms for it all
/// land on one CPU's timer wheel.
pub fn on_one_cpu<T>(f: impl FnOnce() -> T) -> T {
    on_cpu(0, f)
}

/// Runs `f` with this thread pinned to CPU `cpu` (which must be online).
pub fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let this_thread = Pid::from_raw(0);
    let original = sched_getaffinity(this_thread).expect("sched_getaffinity");
    let mut only = CpuSet::new();
    only.set(cpu).expect("CPU number");
    sched_setaffinity(this_thread, &only).expect("sched_setaffinity");
    let result = f();
    sched_setaffinity(this_thread, &original).expect("sched_setaffinity");
    result
}
