//! Kernel ABI numbers both sides read: TCP states (`include/net/tcp_states.h`), address
//! families and the TCP protocol number. Stable kernel ABI, the same on every version and
//! architecture observer supports.

pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_SYN_RECV: u32 = 3;
pub const TCP_FIN_WAIT1: u32 = 4;
pub const TCP_FIN_WAIT2: u32 = 5;
pub const TCP_TIME_WAIT: u32 = 6;
/// The final transition: the socket is done.
pub const TCP_CLOSE: u32 = 7;
pub const TCP_CLOSE_WAIT: u32 = 8;
pub const TCP_LAST_ACK: u32 = 9;
pub const TCP_LISTEN: u32 = 10;
pub const TCP_CLOSING: u32 = 11;
/// A request socket (SYN received, handshake not done); never a full socket's state.
pub const TCP_NEW_SYN_RECV: u32 = 12;
/// Bound but neither listening nor connected (socket-diag only, Linux 6.10+).
pub const TCP_BOUND_INACTIVE: u32 = 13;

/// `sock_common.skc_family` values.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `protocol` value of TCP sockets (`IPPROTO_TCP`). The state tracepoint also fires for
/// SCTP and MPTCP sockets, which are filtered out in the kernel.
pub const IPPROTO_TCP: u32 = 6;
