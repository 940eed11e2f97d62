//! The built eBPF object against the contract in `observer_common::programs`: the
//! program and map names are Rust identifiers on the kernel side, so only this test
//! notices when one side is renamed or a slot count changes and the other is not.

use std::collections::BTreeSet;

use aya_obj::{Object, ProgramSection};
use observer_common::{
    nested::RecordedHits,
    programs::{
        ACCEPT_EXIT_PROGRAM, ACCEPT_SYSCALL_PROGRAMS, LOST_SLOTS, TRACEPOINT_COUNT, TRACEPOINTS,
        globals, maps,
    },
};

fn object() -> Object {
    Object::parse(observer::kernel::loader::object()).expect("the embedded object parses")
}

#[test]
fn the_object_has_exactly_the_programs_the_daemon_attaches() {
    let object = object();
    let mut expected = BTreeSet::new();
    for tracepoint in TRACEPOINTS {
        for pair in tracepoint.programs {
            for name in [pair.primary, pair.standby] {
                let program = object.programs.get(name).unwrap_or_else(|| panic!("no {name}"));
                assert!(
                    matches!(program.section, ProgramSection::BtfTracePoint),
                    "{name} is a BTF tracepoint program, not {:?}",
                    program.section
                );
                expected.insert(name);
            }
        }
    }
    let fexit = object.programs.get(ACCEPT_EXIT_PROGRAM).expect("the accept fexit program");
    assert!(matches!(fexit.section, ProgramSection::FExit { .. }), "{:?}", fexit.section);
    expected.insert(ACCEPT_EXIT_PROGRAM);
    for name in ACCEPT_SYSCALL_PROGRAMS {
        let program = object.programs.get(name).unwrap_or_else(|| panic!("no {name}"));
        assert!(matches!(program.section, ProgramSection::TracePoint), "{:?}", program.section);
        expected.insert(name);
    }
    let built: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
    assert_eq!(built, expected, "programs the daemon does not know of, or that are missing");
}

#[test]
fn the_maps_have_the_names_and_slots_the_daemon_reads() {
    let object = object();
    let ours: BTreeSet<&str> = object
        .maps
        .keys()
        .map(String::as_str)
        // Data sections (.rodata, .bss) and aya-log's own maps.
        .filter(|name| !name.starts_with('.') && !name.starts_with("AYA_"))
        .collect();
    assert_eq!(ours, maps::ALL.into_iter().collect::<BTreeSet<_>>());
    assert_eq!(object.maps[maps::LOST].max_entries(), LOST_SLOTS);
    assert_eq!(object.maps[maps::RECORDED].max_entries(), TRACEPOINT_COUNT);
    assert_eq!(object.maps[maps::RECORDED].value_size() as usize, size_of::<RecordedHits>());
}

#[test]
fn the_globals_the_daemon_patches_are_in_the_object() {
    let object = object();
    let btf = object.btf.as_ref().expect("the object carries BTF");
    for global in [globals::CONFIG, globals::TASK_CONFIG] {
        assert!(
            btf.id_by_type_name_kind(global, aya_obj::btf::BtfKind::Var).is_ok(),
            "no global `{global}` in the object"
        );
    }
}
