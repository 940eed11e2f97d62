// This file exists so that the userspace crate can list observer-ebpf as a
// build-dependency (cargo then rebuilds the object when these sources change).
#![no_std]
