//! Rebuild the eBPF object when bpf-linker changes (a different LLVM produces different
//! code); cargo tracks the sources itself.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
