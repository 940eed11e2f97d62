//! Where the fields the eBPF programs read live in *this* kernel, from its BTF.
//!
//! Rust eBPF cannot emit CO-RE relocations, and `struct sock` moves between kernels
//! (`sk_err` is at byte 284 on 6.12 and 544 on 6.1; `sk_protocol` is a bit field on 5.x).
//! So at startup we look every field up by name in `/sys/kernel/btf/vmlinux` and hand the
//! byte offsets and load widths to the programs ([`ProgramConfig`]); the programs load
//! each field at its own width and [`FieldDecoder`] extracts the field (shift, width,
//! sign) in userspace.
//!
//! The tracepoints' argument lists come from BTF too (`btf_trace_<name>` prototypes):
//! `tcp_send_reset` gained its `reason` argument in 6.10.

use std::{collections::HashMap, path::Path};

use btf_rs::{Btf, Type};
use observer_common::{
    ABSENT, BitField, FdWalk, FieldLoad, ProgramConfig, SockField, TaskConfig,
    programs::TRACEPOINTS,
};

use crate::{error::Error, tcp::ResetReason};

/// The kernel's BTF, where the kernel exposes it.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// How to extract one field from the word the program loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldDecoder {
    /// False when this kernel lacks the field; it then decodes as 0.
    pub present: bool,
    /// Bit position inside the first byte (non-zero only for bit fields).
    pub shift: u8,
    /// Width in bits (at most 64).
    pub bits: u8,
    pub signed: bool,
}

impl FieldDecoder {
    pub fn unsigned(&self, raw: u64) -> u64 {
        if !self.present || self.bits == 0 {
            return 0;
        }
        // A corrupt BTF could claim any shift: out of range reads as 0, never a panic.
        let value = raw.checked_shr(u32::from(self.shift)).unwrap_or(0);
        if self.bits >= 64 { value } else { value & ((1u64 << self.bits) - 1) }
    }

    pub fn signed(&self, raw: u64) -> i64 {
        let value = self.unsigned(raw);
        if self.signed && self.bits > 0 && self.bits < 64 {
            let unused = 64 - u32::from(self.bits);
            ((value << unused) as i64) >> unused
        } else {
            value as i64
        }
    }
}

/// Everything learned about the running kernel at startup.
#[derive(Clone, Debug)]
pub struct KernelLayout {
    /// Patched into the eBPF object before load.
    pub config: ProgramConfig,
    /// Also patched in: how to name owners (`accept_ret` is filled in by the loader).
    pub task_config: TaskConfig,
    /// One decoder per [`SockField`], same order.
    pub fields: [FieldDecoder; SockField::COUNT],
    /// `enum sk_rst_reason` value → reason (empty before 6.10).
    pub reset_reasons: HashMap<u32, ResetReason>,
    /// Fields this kernel does not have (reported once at startup).
    pub missing: Vec<&'static str>,
}

/// The path of each [`SockField`]: the struct the socket pointer is cast to, then member
/// names (anonymous unions and structs in between are searched automatically).
fn sock_field_path(field: SockField) -> (&'static str, &'static [&'static str]) {
    match field {
        SockField::Family => ("sock", &["__sk_common", "skc_family"]),
        SockField::LocalPort => ("sock", &["__sk_common", "skc_num"]),
        SockField::SourcePort => ("inet_sock", &["inet_sport"]),
        SockField::DestinationPort => ("sock", &["__sk_common", "skc_dport"]),
        SockField::SourceAddr4 => ("sock", &["__sk_common", "skc_rcv_saddr"]),
        SockField::DestinationAddr4 => ("sock", &["__sk_common", "skc_daddr"]),
        SockField::Err => ("sock", &["sk_err"]),
        SockField::ErrSoft => ("sock", &["sk_err_soft"]),
        SockField::Shutdown => ("sock", &["sk_shutdown"]),
        SockField::Flags => ("sock", &["__sk_common", "skc_flags"]),
        SockField::LingerTime => ("sock", &["sk_lingertime"]),
        SockField::Socket => ("sock", &["sk_socket"]),
        SockField::Linger2 => ("tcp_sock", &["linger2"]),
        SockField::Retransmits => ("inet_connection_sock", &["icsk_retransmits"]),
        SockField::ProbesOut => ("inet_connection_sock", &["icsk_probes_out"]),
        SockField::UserTimeout => ("inet_connection_sock", &["icsk_user_timeout"]),
        SockField::SendWindow => ("tcp_sock", &["snd_wnd"]),
        SockField::PacketsOut => ("tcp_sock", &["packets_out"]),
        SockField::ReceiveNext => ("tcp_sock", &["rcv_nxt"]),
        SockField::CopiedSeq => ("tcp_sock", &["copied_seq"]),
        SockField::BytesAcked => ("tcp_sock", &["bytes_acked"]),
        SockField::BytesReceived => ("tcp_sock", &["bytes_received"]),
        SockField::TotalRetrans => ("tcp_sock", &["total_retrans"]),
        SockField::SrttUs => ("tcp_sock", &["srtt_us"]),
        SockField::Cookie => ("sock", &["__sk_common", "skc_cookie", "counter"]),
    }
}

/// Fields without which no verdict can be reached: refuse to start without them.
fn is_required(field: SockField) -> bool {
    matches!(
        field,
        SockField::Family
            | SockField::SourcePort
            | SockField::DestinationPort
            | SockField::SourceAddr4
            | SockField::DestinationAddr4
            | SockField::Err
            | SockField::ErrSoft
            | SockField::Shutdown
            | SockField::Flags
            | SockField::Socket
    )
}

impl KernelLayout {
    /// Reads the running kernel's BTF.
    pub fn from_running_kernel() -> Result<Self, Error> {
        Self::from_btf_file(Path::new(VMLINUX_BTF))
    }

    /// Reads the kernel BTF at `path` (`--debug.btf-path`; the running kernel's by default).
    pub fn from_btf_file(path: &Path) -> Result<Self, Error> {
        if !path.exists() {
            return Err(Error::NoBtf { path: path.to_path_buf() });
        }
        let btf = Btf::from_file(path).map_err(|source| Error::BtfParse {
            path: path.to_path_buf(),
            source: source.into(),
        })?;
        Self::from_btf(&btf)
    }

    pub fn from_btf(btf: &Btf) -> Result<Self, Error> {
        let resolver = Resolver { btf };
        for tracepoint in TRACEPOINTS.map(|tracepoint| tracepoint.name) {
            if resolver.tracepoint_arguments(tracepoint).is_none() {
                return Err(Error::MissingTracepoint { name: tracepoint });
            }
        }

        let mut config = ProgramConfig::UNSET;
        let mut fields = [FieldDecoder::default(); SockField::COUNT];
        let mut missing = Vec::new();
        for field in SockField::ALL {
            let (root, path) = sock_field_path(field);
            match resolver.member(root, path).and_then(|member| Some((member.load()?, member))) {
                Some((load, member)) => {
                    config.sock_fields[field as usize] = load;
                    fields[field as usize] = FieldDecoder {
                        present: true,
                        shift: (member.bit_offset % 8) as u8,
                        bits: member.bits as u8,
                        signed: member.signed,
                    };
                }
                _ if is_required(field) => {
                    return Err(Error::KernelLayout {
                        field: path.last().copied().unwrap_or(root),
                    });
                }
                _ => missing.push(*path.last().unwrap_or(&root)),
            }
        }

        let byte_offset =
            |root, path: &[&str]| resolver.member(root, path).map(|m| m.bit_offset / 8);
        // Without CONFIG_IPV6 there are no v6 addresses; without CONFIG_NET_NS no netns.
        // The state programs load each address as two words, anywhere inside it.
        let v6_address = |name: &'static str| match resolver.member("sock", &["__sk_common", name])
        {
            Some(member) if member.byte_size == 16 => Ok(member.bit_offset / 8),
            Some(_) => Err(Error::KernelLayout { field: name }),
            None => Ok(ABSENT),
        };
        (config.v6_local, config.v6_remote) =
            match (v6_address("skc_v6_rcv_saddr")?, v6_address("skc_v6_daddr")?) {
                (ABSENT, _) | (_, ABSENT) => (ABSENT, ABSENT),
                addresses => addresses,
            };
        config.cookie =
            byte_offset("sock", &["__sk_common", "skc_cookie", "counter"]).unwrap_or(ABSENT);
        // The state programs load these directly, at these widths.
        config.net = match resolver.member("sock", &["__sk_common", "skc_net", "net"]) {
            Some(net) if net.load() == Some(FieldLoad { offset: net.bit_offset / 8, size: 8 }) => {
                net.bit_offset / 8
            }
            Some(_) => return Err(Error::KernelLayout { field: "skc_net" }),
            None => ABSENT,
        };
        config.net_ns_inum = match resolver.member("net", &["ns", "inum"]) {
            Some(inum)
                if inum.load() == Some(FieldLoad { offset: inum.bit_offset / 8, size: 4 }) =>
            {
                inum.bit_offset / 8
            }
            Some(_) => return Err(Error::KernelLayout { field: "ns.inum" }),
            None => ABSENT,
        };
        config.state = byte_offset("sock", &["__sk_common", "skc_state"])
            .ok_or(Error::KernelLayout { field: "skc_state" })?;
        let protocol = resolver
            .member("sock", &["sk_protocol"])
            .ok_or(Error::KernelLayout { field: "sk_protocol" })?;
        config.protocol = BitField {
            offset: protocol.bit_offset / 8,
            shift: protocol.bit_offset % 8,
            mask: if protocol.bits >= 32 { u32::MAX } else { (1u32 << protocol.bits) - 1 },
        };

        // tcp_send_reset(sk, skb) before 6.10; (sk, skb, reason) since.
        let send_reset_arguments = resolver.tracepoint_arguments("tcp_send_reset").unwrap_or(2);
        config.send_reset_reason_arg = if send_reset_arguments >= 3 { 2 } else { ABSENT };
        let reset_reasons = resolver.enum_values("sk_rst_reason");

        let offset = |root, path: &[&str]| byte_offset(root, path).unwrap_or(ABSENT);
        let mut task_config = TaskConfig::UNSET;
        task_config.fd_walk = FdWalk {
            task_files: offset("task_struct", &["files"]),
            files_fdt: offset("files_struct", &["fdt"]),
            fdt_max_fds: offset("fdtable", &["max_fds"]),
            fdt_fd: offset("fdtable", &["fd"]),
            file_private_data: offset("file", &["private_data"]),
            socket_file: offset("socket", &["file"]),
            socket_sk: offset("socket", &["sk"]),
            _pad: 0,
        };
        task_config.task_group_leader = offset("task_struct", &["group_leader"]);
        task_config.task_comm = offset("task_struct", &["comm"]);
        let walk = task_config.fd_walk;
        let walk_offsets = [
            walk.task_files,
            walk.files_fdt,
            walk.fdt_max_fds,
            walk.fdt_fd,
            walk.file_private_data,
            walk.socket_file,
            walk.socket_sk,
        ];
        if walk_offsets.contains(&ABSENT) {
            missing.push("the descriptor table walk (owners of accepted sockets)");
        }
        config.valid = 1;

        Ok(Self { config, task_config, fields, reset_reasons, missing })
    }

    pub fn decoder(&self, field: SockField) -> FieldDecoder {
        self.fields[field as usize]
    }
}

/// A member found by name: where it is and how wide.
struct ResolvedMember {
    bit_offset: u32,
    bits: u32,
    byte_size: u32,
    signed: bool,
    bit_field: bool,
}

impl ResolvedMember {
    /// The one load the verifier accepts for this member through a typed pointer: the
    /// member's own width, or for a bit field the narrowest power of two bytes that holds
    /// it whole from its first byte. None if no 1-, 2-, 4- or 8-byte load can.
    fn load(&self) -> Option<FieldLoad> {
        let offset = self.bit_offset / 8;
        let size = if self.bit_field {
            let span = (self.bit_offset + self.bits).div_ceil(8) - offset;
            [1, 2, 4, 8].into_iter().find(|&size| size >= span)?
        } else {
            self.byte_size
        };
        matches!(size, 1 | 2 | 4 | 8).then_some(FieldLoad { offset, size })
    }
}

struct Resolver<'a> {
    btf: &'a Btf,
}

impl Resolver<'_> {
    /// Finds `root.path[0].path[1]…`, descending into anonymous members on the way.
    fn member(&self, root: &str, path: &[&str]) -> Option<ResolvedMember> {
        let mut current = self.struct_by_name(root)?;
        let mut base_bits = 0u32;
        let mut found = None;
        for (depth, name) in path.iter().enumerate() {
            let (offset, member) = self.find_member(&current, name)?;
            base_bits += offset;
            let member_type = self.strip_modifiers(self.btf.resolve_chained_type(&member).ok()?)?;
            if depth + 1 < path.len() {
                current = match member_type {
                    Type::Struct(s) | Type::Union(s) => s,
                    _ => return None,
                };
            } else {
                let (byte_size, signed) = self.scalar_shape(&member_type)?;
                let bit_field = member.bitfield_size().is_some_and(|bits| bits > 0);
                let bits = member.bitfield_size().filter(|&b| b > 0).unwrap_or(byte_size * 8);
                found = Some(ResolvedMember {
                    bit_offset: base_bits,
                    bits,
                    byte_size,
                    signed,
                    bit_field,
                });
            }
        }
        found
    }

    /// The bit offset (relative to `parent`) and the member called `name`.
    fn find_member(&self, parent: &btf_rs::Struct, name: &str) -> Option<(u32, btf_rs::Member)> {
        for member in &parent.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            if member_name == name {
                return Some((member.bit_offset(), member.clone()));
            }
            if member_name.is_empty() {
                // An anonymous struct or union: the field may live inside it.
                let inner = self.strip_modifiers(self.btf.resolve_chained_type(member).ok()?)?;
                if let Type::Struct(s) | Type::Union(s) = inner
                    && let Some((offset, found)) = self.find_member(&s, name)
                {
                    return Some((member.bit_offset() + offset, found));
                }
            }
        }
        None
    }

    fn struct_by_name(&self, name: &str) -> Option<btf_rs::Struct> {
        self.btf.resolve_types_by_name(name).ok()?.into_iter().find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip_modifiers(&self, mut ty: Type) -> Option<Type> {
        for _ in 0..16 {
            ty = match ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(&t).ok()?,
                Type::Volatile(t) | Type::Const(t) | Type::Restrict(t) => {
                    self.btf.resolve_chained_type(&t).ok()?
                }
                Type::TypeTag(t) => self.btf.resolve_chained_type(&t).ok()?,
                other => return Some(other),
            };
        }
        None
    }

    /// Size in bytes and signedness of a scalar-like member.
    fn scalar_shape(&self, ty: &Type) -> Option<(u32, bool)> {
        match ty {
            Type::Int(int) => Some((int.size() as u32, int.is_signed())),
            Type::Enum(e) => Some((e.size() as u32, e.is_signed())),
            Type::Enum64(e) => Some((e.size() as u32, e.is_signed())),
            Type::Ptr(_) => Some((8, false)),
            Type::Struct(s) | Type::Union(s) => Some((s.size() as u32, false)),
            Type::Array(a) => {
                let element = self.strip_modifiers(self.btf.resolve_chained_type(a).ok()?)?;
                let (size, _) = self.scalar_shape(&element)?;
                Some((size * a.len() as u32, false))
            }
            _ => None,
        }
    }

    /// Number of arguments of a tracepoint (its `btf_trace_<name>` prototype minus the
    /// leading `void *__data`), or None if the kernel has no such tracepoint.
    fn tracepoint_arguments(&self, tracepoint: &str) -> Option<usize> {
        let typedef = format!("btf_trace_{tracepoint}");
        let types = self.btf.resolve_types_by_name(&typedef).ok()?;
        let Some(Type::Typedef(typedef)) = types.into_iter().next() else {
            return None;
        };
        let Type::Ptr(pointer) = self.btf.resolve_chained_type(&typedef).ok()? else {
            return None;
        };
        let Type::FuncProto(prototype) = self.btf.resolve_chained_type(&pointer).ok()? else {
            return None;
        };
        Some(prototype.parameters.len().saturating_sub(1))
    }

    fn enum_values(&self, name: &str) -> HashMap<u32, ResetReason> {
        let mut values = HashMap::new();
        let Ok(types) = self.btf.resolve_types_by_name(name) else {
            return values;
        };
        for ty in types {
            if let Type::Enum(e) = ty {
                for member in &e.members {
                    if let Ok(member_name) = self.btf.resolve_name(member) {
                        values.insert(member.val(), ResetReason::from_kernel_name(&member_name));
                    }
                }
            }
        }
        values
    }
}

/// Where tracefs is mounted, if it is.
pub fn tracefs() -> Option<&'static Path> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|path| path.join("events").is_dir())
}

/// Byte offset of `field` in the records of a classic tracepoint, from its tracefs
/// `format` file (lines like `field:long ret; offset:16; size:8; signed:1;`, tab-separated).
pub fn tracepoint_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        if declaration.rsplit(' ').next()? != field {
            return None;
        }
        parts.find_map(|part| part.strip_prefix("offset:")?.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_plain_fields_and_bit_fields() {
        let byte = FieldDecoder { present: true, shift: 0, bits: 8, signed: false };
        assert_eq!(byte.unsigned(0xdead_beef_0000_0103), 3);
        let int = FieldDecoder { present: true, shift: 0, bits: 32, signed: true };
        assert_eq!(int.signed(0x1234_5678_ffff_ffff), -1);
        assert_eq!(int.signed(0x0000_0000_0000_006e), 110);
        // sk_protocol:8 at bit 8 of its word, as in 5.x.
        let protocol = FieldDecoder { present: true, shift: 0, bits: 8, signed: false };
        assert_eq!(protocol.unsigned(0xff06), 6);
        let bitfield = FieldDecoder { present: true, shift: 4, bits: 4, signed: false };
        assert_eq!(bitfield.unsigned(0b1010_0000), 0b1010);
        let absent = FieldDecoder::default();
        assert_eq!(absent.unsigned(u64::MAX), 0);
        let wide = FieldDecoder { present: true, shift: 0, bits: 64, signed: false };
        assert_eq!(wide.unsigned(u64::MAX), u64::MAX);
    }

    #[test]
    fn loads_each_member_at_a_width_the_verifier_accepts() {
        let member = |bit_offset, bits, byte_size, bit_field| ResolvedMember {
            bit_offset,
            bits,
            byte_size,
            signed: false,
            bit_field,
        };
        // Plain members: their own width, from their first byte.
        assert_eq!(member(284 * 8, 32, 4, false).load(), Some(FieldLoad { offset: 284, size: 4 }));
        assert_eq!(member(16, 8, 1, false).load(), Some(FieldLoad { offset: 2, size: 1 }));
        assert_eq!(member(64, 64, 8, false).load(), Some(FieldLoad { offset: 8, size: 8 }));
        // Bit fields: the narrowest load that holds them whole (5.x's `sk_protocol:8` at
        // bit 8 of an `unsigned int`; a 2-bit field straddling a byte boundary).
        assert_eq!(member(8, 8, 4, true).load(), Some(FieldLoad { offset: 1, size: 1 }));
        assert_eq!(member(7, 2, 4, true).load(), Some(FieldLoad { offset: 0, size: 2 }));
        assert_eq!(member(4, 20, 4, true).load(), Some(FieldLoad { offset: 0, size: 4 }));
        // Nothing a single load of 1, 2, 4 or 8 bytes reads.
        assert_eq!(member(0, 24, 3, false).load(), None);
        assert_eq!(member(0, 128, 16, false).load(), None);
        assert_eq!(member(4, 62, 8, true).load(), None);
    }

    #[test]
    fn finds_fields_in_tracefs_formats() {
        let format = "name: sys_exit_accept4\nID: 1234\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
            \tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;\n";
        assert_eq!(tracepoint_field_offset(format, "ret"), Some(16));
        assert_eq!(tracepoint_field_offset(format, "__syscall_nr"), Some(8));
        assert_eq!(tracepoint_field_offset(format, "nr"), None);
    }

    /// Runs against the BTF of the kernel the tests run on; every field of 6.x is there.
    #[test]
    fn resolves_every_field_on_this_kernel() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipping: {VMLINUX_BTF} not present");
            return;
        }
        let layout = KernelLayout::from_running_kernel().expect("layout");
        assert!(layout.missing.is_empty(), "missing: {:?}", layout.missing);
        assert_eq!(layout.config.valid, 1);
        assert_eq!(layout.decoder(SockField::Err).bits, 32);
        assert!(layout.decoder(SockField::Err).signed);
        assert_eq!(layout.decoder(SockField::Family).bits, 16);
        assert_eq!(layout.decoder(SockField::Cookie).bits, 64);
        assert_ne!(layout.config.net_ns_inum, ABSENT);
        assert_eq!(layout.config.protocol.mask, 0xffff);
        // Direct loads at the members' own widths.
        let load = |field: SockField| layout.config.sock_fields[field as usize];
        assert_eq!(load(SockField::Err).size, 4);
        assert_eq!(load(SockField::SourcePort).size, 2);
        assert_eq!(load(SockField::Retransmits).size, 1);
        assert_eq!(load(SockField::BytesAcked).size, 8);
        assert_eq!(load(SockField::Socket).size, 8);
        assert_eq!(load(SockField::Family), FieldLoad { offset: 16, size: 2 });
        assert_eq!(load(SockField::DestinationAddr4), FieldLoad { offset: 0, size: 4 });
        assert_eq!(load(SockField::Cookie).size, 8);
        assert_ne!(layout.config.v6_local, ABSENT);
        assert_ne!(layout.config.v6_remote, ABSENT);
        assert_ne!(layout.config.net, ABSENT);
    }
}
