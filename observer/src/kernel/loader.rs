//! Loads the embedded eBPF object into the running kernel and attaches its programs.
//!
//! Order matters for the error a user sees: privileges first (`privileges::check`), then
//! the kernel's BTF and tracepoints, then the load. [`Attached`] owns the object: dropping it detaches everything.

use std::{
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{ArrayOfMaps, Map, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FExit, Program, ProgramError, TracePoint},
};
use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF;
use observer_common::programs::{
    ACCEPT_EXIT_PROGRAM, ACCEPT_FUNCTION, ACCEPT_SYSCALL_PROGRAMS, LOST_HANDLED_BY_STANDBY,
    LOST_RING_FULL, TRACEPOINTS, globals, maps,
};

use crate::{
    error::{self, Error},
    kernel::layout::{self, KernelLayout},
};

/// The attached programs and the maps the daemon reads.
pub struct Attached {
    /// Where the owner of an accepted socket comes from on this kernel.
    pub accept_owners: AcceptOwners,
    /// Records from the kernel: each CPU's ring buffer, indexed by CPU number.
    pub rings: Vec<RingBuf<MapData>>,
    /// Owns the rest of the object; programs stay attached while it lives.
    pub lost: LostEvents,
    /// Messages of the programs themselves (aya-log), forwarded to our log.
    pub logger: Option<KernelLogger>,
}

/// Where the owner of an accepted socket comes from (see [`attach_owner_capture`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptOwners {
    /// The fexit program on `inet_accept()`.
    InetAccept,
    /// `--bpf.accept-syscall-tracepoints`, where the fexit cannot attach.
    Syscalls,
    /// Neither: the tracker gives an accepted socket its listener's owner.
    Listener,
}

impl AcceptOwners {
    /// The `accept_owner` label of `observer_capture_info`.
    pub fn name(self) -> &'static str {
        match self {
            AcceptOwners::InetAccept => "inet_accept",
            AcceptOwners::Syscalls => "accept_syscalls",
            AcceptOwners::Listener => "listener",
        }
    }
}

pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// aya-log level of the programs: they only warn (about lost events).
const KERNEL_LOG_LEVEL_WARN: u8 = 2;

/// The kernel-side drop counters.
pub struct LostEvents {
    _ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    /// Descriptor of each tracepoint's primary program, for its `recursion_misses`.
    primaries: Vec<RawFd>,
    /// Descriptors of the standby twins: their own misses tell whether the kernel
    /// skipped both programs of a hit (then no twin can record it).
    standbys: Vec<RawFd>,
    /// The primaries' misses at the previous reading.
    previous_misses: Vec<u64>,
    /// Programs without a standby twin (the fexit on `inet_accept()`, which a task can
    /// reach while another is preempted inside it on the same CPU): every run the
    /// kernel skipped is lost.
    unshadowed: Vec<RawFd>,
}

impl LostEvents {
    /// Events the kernel could not deliver so far, as (ring buffer full, nested runs
    /// neither program recorded).
    ///
    /// A skipped primary run is lost unless its standby recorded it. The standby counts
    /// what it recorded a moment after the kernel counts the skip, so the skips are taken
    /// from the previous reading: the result converges on the exact count one reading
    /// later instead of briefly over-counting (the exported counter never goes down).
    /// Runs the kernel skipped as nested so far: (primaries, standby twins).
    pub fn skipped_runs(&self) -> (u64, u64) {
        let sum = |fds: &[RawFd]| fds.iter().map(|fd| recursion_misses(*fd)).sum::<u64>();
        (sum(&self.primaries), sum(&self.standbys))
    }

    pub fn by_cause(&mut self) -> (u64, u64) {
        let slot = |index: u32| -> u64 {
            self.counters.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or_default()
        };
        let ring_full = slot(LOST_RING_FULL);
        let mut skipped = 0;
        for (index, fd) in self.primaries.iter().enumerate() {
            let handled = slot(LOST_HANDLED_BY_STANDBY + index as u32);
            let misses = self.previous_misses[index];
            skipped += misses.saturating_sub(handled);
            self.previous_misses[index] = recursion_misses(*fd);
        }
        skipped += self.unshadowed.iter().map(|fd| recursion_misses(*fd)).sum::<u64>();
        (ring_full, skipped)
    }
}

/// `recursion_misses` from `/proc/self/fdinfo/<fd>` (Linux 5.12+; 0 before).
fn recursion_misses(fd: RawFd) -> u64 {
    fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("recursion_misses:"))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Default size of each CPU's ring buffer: 4 MiB per CPU up to 4 CPUs (a 2-CPU host at
/// its maximum churn needs ~1 MiB between two drains), then 16 MiB shared out, at least
/// 1 MiB per CPU: a burst lands on the CPUs that handle it, so a host with more CPUs
/// does not need proportionally more room on each.
fn default_ring_bytes(cpus: u32) -> u32 {
    const MIB: u32 = 1 << 20;
    (16 * MIB / cpus.max(1)).clamp(MIB, 4 * MIB)
}

/// `bytes` rounded up to what the kernel accepts for a ring buffer: a power of two
/// number of pages.
fn ring_size(bytes: u32) -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    bytes.max(page).next_power_of_two()
}

/// The eBPF object built from observer-ebpf, embedded in the binary.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"))
}

/// What [`load`] takes from the command line.
pub struct Options<'a> {
    /// `--bpf.ring-buffer-bytes`; `None`: [`default_ring_bytes`].
    pub ring_buffer_bytes: Option<u32>,
    pub btf_path: &'a std::path::Path,
    /// `--bpf.accept-syscall-tracepoints`.
    pub accept_syscall_tracepoints: bool,
    /// Attach each tracepoint's standby twin (off only with `--debug.no-standby`, to
    /// measure what the twins cost).
    pub standby_programs: bool,
}

pub fn load(layout: &KernelLayout, options: &Options) -> Result<Attached, Error> {
    let Options { ring_buffer_bytes, btf_path, accept_syscall_tracepoints, standby_programs } =
        *options;
    raise_memlock_limit();
    let mut task_config = layout.task_config;
    // Read before the load (the offset is patched into the programs), needed only if
    // the trampoline on inet_accept() cannot be attached.
    let accept_format = accept_record_offset();
    if let Ok(offset) = &accept_format {
        task_config.accept_ret = *offset;
    }
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, source)| Error::Io { context: "cannot count the possible CPUs", source })?;
    let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::CONFIG, &layout.config, true)
        .override_global(globals::TASK_CONFIG, &task_config, true)
        .override_global(aya_log::LEVEL, &KERNEL_LOG_LEVEL_WARN, false)
        .map_max_entries(maps::RINGS, cpus)
        .load(object())
        .map_err(|source| Error::LoadObject { source })?;
    // Before any program is attached: a CPU without its ring would lose its records.
    let ring_bytes = ring_size(ring_buffer_bytes.unwrap_or_else(|| default_ring_bytes(cpus)));
    let rings = create_cpu_rings(&mut ebpf, cpus, ring_bytes)?;
    log::debug!("{cpus} ring buffers of {ring_bytes} bytes, one per possible CPU");

    let btf = aya::Btf::parse_file(btf_path, aya::Endianness::default())
        .map_err(|error| Error::BtfParse { path: btf_path.to_path_buf(), source: error.into() })?;
    let mut primaries = Vec::new();
    let mut standbys = Vec::new();
    for tracepoint in TRACEPOINTS {
        let mut failure = None;
        for pair in tracepoint.programs {
            let attached =
                load_program(&mut ebpf, pair.primary, tracepoint.name, &btf).and_then(|fd| {
                    if !standby_programs {
                        return Ok((fd, None));
                    }
                    load_program(&mut ebpf, pair.standby, tracepoint.name, &btf)
                        .map(|standby| (fd, Some(standby)))
                });
            match attached {
                Ok((fd, standby)) => {
                    standbys.extend(standby);
                    if failure.is_some() {
                        log::debug!("this kernel needs the fallback program `{}`", pair.primary);
                    }
                    primaries.push(fd);
                    failure = None;
                    break;
                }
                Err(error) => {
                    log::debug!("cannot use `{}`: {}", pair.primary, error.one_line());
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
    }

    // The fexit program has no standby twin: every run the kernel skipped is lost.
    let (accept_owners, accept_fd) =
        attach_owner_capture(&mut ebpf, &btf, &accept_format, accept_syscall_tracepoints);
    let unshadowed: Vec<RawFd> = accept_fd.into_iter().collect();

    let counters = ebpf
        .take_map(maps::LOST)
        .ok_or_else(|| Error::NotInObject { what: format!("map `{}`", maps::LOST) })
        .and_then(|map| {
            PerCpuArray::try_from(map).map_err(|source| Error::Map { map: maps::LOST, source })
        })?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(logger),
        Err(error) => {
            log::warn!("eBPF programs' own log unavailable: {}", error::one_line(&error));
            None
        }
    };
    let previous_misses = primaries.iter().map(|fd| recursion_misses(*fd)).collect();
    let lost =
        LostEvents { _ebpf: ebpf, counters, primaries, standbys, previous_misses, unshadowed };
    Ok(Attached { accept_owners, rings, lost, logger })
}

/// Creates a ring buffer of `bytes` for each of the `cpus` possible CPUs and puts it in
/// the programs' `RINGS` table at the CPU's number.
fn create_cpu_rings(
    ebpf: &mut Ebpf,
    cpus: u32,
    bytes: u32,
) -> Result<Vec<RingBuf<MapData>>, Error> {
    let failed = |source| Error::Map { map: maps::RINGS, source };
    let table = ebpf
        .map_mut(maps::RINGS)
        .ok_or_else(|| Error::NotInObject { what: format!("map `{}`", maps::RINGS) })?;
    let mut table: ArrayOfMaps<&mut MapData, RingBuf<MapData>> =
        ArrayOfMaps::try_from(table).map_err(failed)?;
    (0..cpus)
        .map(|cpu| {
            let definition =
                aya_obj::Map::new_from_params(BPF_MAP_TYPE_RINGBUF as u32, 0, 0, bytes, 0);
            let ring = MapData::create(definition, "observer_ring", None)
                .and_then(|data| RingBuf::try_from(Map::RingBuf(data)))
                .map_err(failed)?;
            table.set(cpu, &ring, 0).map_err(failed)?;
            Ok(ring)
        })
        .collect()
}

/// Loads and attaches one BTF tracepoint program to `tracepoint`; returns its descriptor.
fn load_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &str,
    btf: &aya::Btf,
) -> Result<RawFd, Error> {
    let program: &mut BtfTracePoint = program(ebpf, name)?;
    program.load(tracepoint, btf).map_err(|error| refused(name, error))?;
    program.attach().map_err(|source| Error::Attach { program: name, source })?;
    descriptor(program.fd(), name)
}

/// The program `name` of the object, as the kind of program it must be.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, Error>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::NotInObject { what: format!("program `{name}`") })?
        .try_into()
        .map_err(|source: ProgramError| Error::LoadProgram { program: name, source: source.into() })
}

fn descriptor(
    fd: Result<&aya::programs::ProgramFd, ProgramError>,
    name: &'static str,
) -> Result<RawFd, Error> {
    Ok(fd.map_err(|source| Error::Attach { program: name, source })?.as_fd().as_raw_fd())
}

/// A load the kernel refused: the verifier's log (many lines) goes to the debug log, the
/// error keeps the system call's.
fn refused(program: &'static str, error: ProgramError) -> Error {
    match error {
        ProgramError::LoadError { io_error, verifier_log } => {
            log::debug!("verifier log for {program}:\n{verifier_log}");
            Error::LoadProgram { program, source: Box::new(io_error) }
        }
        other => Error::LoadProgram { program, source: Box::new(other) },
    }
}

/// Why the accept() system-call records cannot be read (the fallback capture of owners).
#[derive(Debug, thiserror::Error)]
enum AcceptFormatError {
    #[error("tracefs is not mounted")]
    NoTracefs,
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no `ret` field in {}", path.display())]
    NoReturnValue { path: PathBuf },
}

/// Offset of `ret` in the accept() exit records, from tracefs.
fn accept_record_offset() -> Result<u32, AcceptFormatError> {
    let tracefs = layout::tracefs().ok_or(AcceptFormatError::NoTracefs)?;
    let path = tracefs.join("events/syscalls/sys_exit_accept4/format");
    let format = fs::read_to_string(&path)
        .map_err(|source| AcceptFormatError::Read { path: path.clone(), source })?;
    layout::tracepoint_field_offset(&format, "ret").ok_or(AcceptFormatError::NoReturnValue { path })
}

/// Attaches what names the owner of an accepted socket: the fexit program on
/// `inet_accept()` (its descriptor is returned), else — only if `syscalls_allowed`
/// (`--bpf.accept-syscall-tracepoints`) — the system-call fallback, whose record offset
/// `accept_format` holds. Without either, the tracker gives an accepted socket its
/// listener's owner.
fn attach_owner_capture(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    accept_format: &Result<u32, AcceptFormatError>,
    syscalls_allowed: bool,
) -> (AcceptOwners, Option<RawFd>) {
    let reason = match attach_accept_exit(ebpf, btf) {
        Ok(fd) => {
            log::info!("owners of accepted sockets: from {ACCEPT_FUNCTION}() returning");
            return (AcceptOwners::InetAccept, Some(fd));
        }
        Err(error) => error.one_line(),
    };
    if !syscalls_allowed {
        log::info!(
            "owners of accepted sockets: their listener's owner, until a system call on the \
             socket names its process (cannot trace {ACCEPT_FUNCTION}() returning: {reason}; \
             --bpf.accept-syscall-tracepoints names the accepting process at a cost to every \
             system call on the host)"
        );
        return (AcceptOwners::Listener, None);
    }
    log::info!(
        "owners of accepted sockets: from the accept() system-call tracepoints, which make \
         every system call on the host slower (cannot trace {ACCEPT_FUNCTION}() returning: \
         {reason})"
    );
    if let Err(error) = accept_format {
        log::warn!(
            "accept() system-call tracepoints unusable, accepted sockets get their listener's \
             owner: {}",
            error::one_line(error)
        );
        return (AcceptOwners::Listener, None);
    }
    for name in ACCEPT_SYSCALL_PROGRAMS {
        if let Err(error) = attach_syscall_exit(ebpf, name) {
            log::warn!(
                "sockets returned by {name} get their listener's owner: {}",
                error.one_line()
            );
        }
    }
    (AcceptOwners::Syscalls, None)
}

fn attach_accept_exit(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<RawFd, Error> {
    let name = ACCEPT_EXIT_PROGRAM;
    let program: &mut FExit = program(ebpf, name)?;
    program.load(ACCEPT_FUNCTION, btf).map_err(|error| refused(name, error))?;
    program.attach().map_err(|source| Error::Attach { program: name, source })?;
    descriptor(program.fd(), name)
}

fn attach_syscall_exit(ebpf: &mut Ebpf, name: &'static str) -> Result<(), Error> {
    let program: &mut TracePoint = program(ebpf, name)?;
    program.load().map_err(|error| refused(name, error))?;
    program.attach("syscalls", name).map_err(|source| Error::Attach { program: name, source })?;
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg. Raising
/// it needs CAP_SYS_RESOURCE, which a CAP_BPF-only deployment may lack: not an error.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("cannot raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rings_hold_16_mib_between_one_and_four_per_cpu() {
        const MIB: u32 = 1 << 20;
        assert_eq!(default_ring_bytes(1), 4 * MIB);
        assert_eq!(default_ring_bytes(2), 4 * MIB);
        assert_eq!(default_ring_bytes(4), 4 * MIB);
        assert_eq!(default_ring_bytes(8), 2 * MIB);
        assert_eq!(default_ring_bytes(16), MIB);
        assert_eq!(default_ring_bytes(256), MIB);
        assert_eq!(default_ring_bytes(0), 4 * MIB);
    }

    #[test]
    fn ring_sizes_are_rounded_up_to_a_power_of_two_number_of_pages() {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u32;
        assert_eq!(ring_size(1), page);
        assert_eq!(ring_size(page), page);
        assert_eq!(ring_size(page + 1), 2 * page);
        assert_eq!(ring_size(3 * page), 4 * page);
        assert_eq!(ring_size(4 << 20), 4 << 20);
    }
}
