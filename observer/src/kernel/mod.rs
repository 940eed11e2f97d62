//! Everything that talks to the running kernel before the first event: where fields
//! live ([`layout`], from BTF), loading and attaching the programs ([`loader`]), and
//! the capabilities that takes ([`privileges`]).

pub mod layout;
pub mod loader;
pub mod privileges;

use crate::{cli::CommonArgs, error::Error, memory};

/// Checks the kernel, then loads and attaches the programs (privileges were checked:
/// [`privileges::check`]); once they are attached, drops the capabilities only loading
/// needed.
pub fn attach(
    common: &CommonArgs,
    _may_load: privileges::MayLoadPrograms,
) -> Result<(layout::KernelLayout, loader::Attached), Error> {
    let mut layout = layout::KernelLayout::from_btf_file(&common.btf_path)?;
    layout.config.only_netns = common.only_netns.unwrap_or(0);
    layout.config.return_at_once = common.empty_programs.into();
    if !layout.missing.is_empty() {
        log::warn!("this kernel lacks {}; those fields read as 0", layout.missing.join(", "));
    }
    let attached = loader::load(
        &layout,
        &loader::Options {
            ring_buffer_bytes: common.ring_buffer_bytes,
            btf_path: &common.btf_path,
            accept_syscall_tracepoints: common.accept_syscall_tracepoints,
            standby_programs: !common.no_standby,
        },
    )?;
    privileges::drop_unneeded();
    memory::release_freed_heap();
    Ok((layout, attached))
}
