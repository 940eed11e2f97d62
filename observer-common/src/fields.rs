//! The `struct sock` words the programs read, and how the daemon tells them where each
//! lies in the running kernel.

/// Marks an offset the running kernel does not have (field missing from its BTF).
pub const ABSENT: u32 = u32::MAX;

/// The `struct sock` words a transition carries: the first [`SockField::IDENTITY`] in
/// [`StateEvent::identity`], the rest in [`CloseEvent::evidence`].
///
/// Each is read with one load of its natural width ([`FieldLoad`]: 1, 2, 4 or 8 bytes
/// starting at the byte that holds the field; bit fields with the bytes that hold them)
/// and zero-extended to a word; the daemon extracts the field (shift, width, sign) using
/// the same BTF description it used to compute the load. `tcp_sock` and
/// `inet_connection_sock` embed `struct sock` at offset 0, so every offset is relative to
/// the socket pointer the tracepoint hands us.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockField {
    /// `sock_common.skc_family`: AF_INET or AF_INET6.
    Family = 0,
    /// `sock_common.skc_num`: local port, host order (0 after unhash for auto-bound).
    LocalPort,
    /// `inet_sock.inet_sport`: local port, network order; kept after unhash.
    SourcePort,
    /// `sock_common.skc_dport`: remote port, network order.
    DestinationPort,
    /// `sock_common.skc_rcv_saddr`: local IPv4 address.
    SourceAddr4,
    /// `sock_common.skc_daddr`: remote IPv4 address.
    DestinationAddr4,
    /// `sock.sk_err`: hard error, written before the final transition by resets,
    /// timeouts, ICMP errors and aborts.
    Err,
    /// `sock.sk_err_soft`: last soft error (ICMP, route failure); replaces ETIMEDOUT.
    ErrSoft,
    /// `sock.sk_shutdown`: RCV_SHUTDOWN | SEND_SHUTDOWN; 3 once `close()` ran.
    Shutdown,
    /// `sock_common.skc_flags`: SOCK_DEAD, SOCK_DONE (peer FIN seen), SOCK_KEEPOPEN,
    /// SOCK_LINGER.
    Flags,
    /// `sock.sk_lingertime`: SO_LINGER timeout (0 with SOCK_LINGER = abortive close).
    LingerTime,
    /// `sock.sk_socket`: NULL once orphaned or for a child never accept()ed.
    Socket,
    /// `tcp_sock.linger2`: TCP_LINGER2; negative aborts FIN_WAIT2 on close.
    Linger2,
    /// `inet_connection_sock.icsk_retransmits`: RTOs since the last forward progress.
    Retransmits,
    /// `inet_connection_sock.icsk_probes_out`: unanswered keepalive / window probes.
    ProbesOut,
    /// `inet_connection_sock.icsk_user_timeout`: TCP_USER_TIMEOUT in ms.
    UserTimeout,
    /// `tcp_sock.snd_wnd`: peer's receive window (0 = zero-window probing).
    SendWindow,
    /// `tcp_sock.packets_out`: segments in flight (purged before F on error paths).
    PacketsOut,
    /// `tcp_sock.rcv_nxt`: next sequence number expected from the peer.
    ReceiveNext,
    /// `tcp_sock.copied_seq`: head of yet-unread data; `rcv_nxt - copied_seq` = unread.
    CopiedSeq,
    /// `tcp_sock.bytes_acked`: bytes we sent that the peer acknowledged.
    BytesAcked,
    /// `tcp_sock.bytes_received`: bytes received from the peer.
    BytesReceived,
    /// `tcp_sock.total_retrans`: retransmitted segments over the connection's life.
    TotalRetrans,
    /// `tcp_sock.srtt_us`: smoothed RTT in microseconds, shifted left by 3.
    SrttUs,
    /// `sock_common.skc_cookie`: socket cookie (lazily generated; 0 if never).
    Cookie,
}

impl SockField {
    pub const COUNT: usize = SockField::Cookie as usize + 1;

    /// The first fields, read at every transition (socket identity); the rest only at
    /// the final one.
    pub const IDENTITY: usize = SockField::DestinationAddr4 as usize + 1;

    pub const ALL: [SockField; Self::COUNT] = [
        SockField::Family,
        SockField::LocalPort,
        SockField::SourcePort,
        SockField::DestinationPort,
        SockField::SourceAddr4,
        SockField::DestinationAddr4,
        SockField::Err,
        SockField::ErrSoft,
        SockField::Shutdown,
        SockField::Flags,
        SockField::LingerTime,
        SockField::Socket,
        SockField::Linger2,
        SockField::Retransmits,
        SockField::ProbesOut,
        SockField::UserTimeout,
        SockField::SendWindow,
        SockField::PacketsOut,
        SockField::ReceiveNext,
        SockField::CopiedSeq,
        SockField::BytesAcked,
        SockField::BytesReceived,
        SockField::TotalRetrans,
        SockField::SrttUs,
        SockField::Cookie,
    ];
}

/// Where one [`SockField`] lies in the socket and how wide a load reads it.
///
/// The state programs read these fields with direct loads through the typed socket
/// pointer, which the verifier checks against the kernel's BTF: a load must stay inside
/// the member it starts in (an 8-byte load of a 4-byte `int` is refused) and must cover
/// a bit field whole. So the width is the member's own, or for a bit field the smallest
/// of 1, 2, 4, 8 bytes that covers it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldLoad {
    /// Byte offset, or [`ABSENT`] (this kernel lacks the field).
    pub offset: u32,
    /// 1, 2, 4 or 8.
    pub size: u32,
}

impl FieldLoad {
    pub const ABSENT: Self = Self { offset: ABSENT, size: 0 };
}

/// A bit field inside an 8-byte word, as the kernel side must decode `sk_protocol` to
/// filter on it (a `u16` on 6.x, an 8-bit bitfield on 5.x).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitField {
    pub offset: u32,
    pub shift: u32,
    pub mask: u32,
}
