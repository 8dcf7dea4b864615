//! The guest modules of `modules/`, built and embedded for the host's tests
//! and benchmarks.
//!
//! `build.rs` runs `cargo build --release --target wasm32-wasip2 --locked` on
//! the separate guest workspace `modules/Cargo.toml` (target directory
//! `target/guest-modules`, or `$CARGO_TARGET_DIR/guest-modules`), installing
//! the `wasm32-wasip2` target with rustup if it is missing. rustc's output for
//! that target is already a component, so each module is copied as is into
//! `OUT_DIR`; this crate exposes, per module, `<NAME>_PATH` (the copy's
//! absolute path) and `<NAME>` (its bytes), plus [`ALL`].
//!
//! The build script reruns when a guest crate, `modules/Cargo.{toml,lock}`,
//! `wit/` or `host/policy-core` changes.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_is_a_component() {
        assert_eq!(ALL.len(), 7);
        for (name, bytes) in ALL {
            assert!(bytes.len() > 8, "{name} is too short");
            assert_eq!(&bytes[..4], b"\0asm", "{name} lacks the wasm magic");
            assert_eq!(&bytes[4..8], [0x0d, 0x00, 0x01, 0x00], "{name} is not a component");
        }
    }

    #[test]
    fn names_paths_and_bytes_agree() {
        let named: [(&str, &str, &[u8]); 7] = [
            ("policy-default", POLICY_DEFAULT_PATH, POLICY_DEFAULT),
            ("filter-keywords", FILTER_KEYWORDS_PATH, FILTER_KEYWORDS),
            ("hostile-loop", HOSTILE_LOOP_PATH, HOSTILE_LOOP),
            ("hostile-memory", HOSTILE_MEMORY_PATH, HOSTILE_MEMORY),
            ("hostile-trap", HOSTILE_TRAP_PATH, HOSTILE_TRAP),
            ("hostile-plan", HOSTILE_PLAN_PATH, HOSTILE_PLAN),
            ("filter-trap", FILTER_TRAP_PATH, FILTER_TRAP),
        ];
        for (name, path, bytes) in named {
            assert!(
                ALL.iter().any(|(n, b)| *n == name && b.as_ptr() == bytes.as_ptr()),
                "{name} missing from ALL"
            );
            assert!(path.ends_with(&format!("{name}.wasm")), "{path}");
            assert_eq!(
                std::fs::read(path).unwrap(),
                bytes,
                "{path} differs from the embedded bytes"
            );
        }
    }
}
