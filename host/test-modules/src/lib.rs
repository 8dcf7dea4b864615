//! The test guest modules of `modules/`, for the host's tests only: the
//! hostile policies (`hostile-*`), a filter that traps (`filter-trap`), one
//! slow to start (`filter-slow-start`), one slow per message
//! (`filter-slow`) and one that tries the WASI sandbox's walls
//! (`wasi-probe`). The edge cannot name them with `builtin:`; tests load
//! them by path (`<NAME>_PATH`) or bytes (`<NAME>`).

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_module_is_a_component_on_disk() {
        let names: Vec<&str> = ALL.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "filter-slow",
                "filter-slow-start",
                "filter-trap",
                "hostile-loop",
                "hostile-memory",
                "hostile-plan",
                "hostile-trap",
                "wasi-probe"
            ]
        );
        let paths = [
            FILTER_SLOW_PATH,
            FILTER_SLOW_START_PATH,
            FILTER_TRAP_PATH,
            HOSTILE_LOOP_PATH,
            HOSTILE_MEMORY_PATH,
            HOSTILE_PLAN_PATH,
            HOSTILE_TRAP_PATH,
            WASI_PROBE_PATH,
        ];
        for ((name, bytes), path) in ALL.iter().zip(paths) {
            assert_eq!(&bytes[..4], b"\0asm", "{name} lacks the wasm magic");
            assert_eq!(&bytes[4..8], [0x0d, 0x00, 0x01, 0x00], "{name} is not a component");
            assert_eq!(std::fs::read(path).expect("on disk"), *bytes, "{name}");
        }
    }
}
