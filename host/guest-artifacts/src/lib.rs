//! The guest modules of `modules/`: built here, and the ones the edge ships
//! (`builtin:policy-default`, `builtin:filter-keywords`) embedded.
//!
//! `build.rs` runs `cargo build --release --target wasm32-wasip2 --locked` on
//! the separate guest workspace `modules/Cargo.toml` (target directory
//! `target/guest-modules`, or `$CARGO_TARGET_DIR/guest-modules`), installing
//! the `wasm32-wasip2` target with rustup if it is missing. rustc's output for
//! that target is already a component, so each module is copied as is into
//! `OUT_DIR`; this crate exposes, per shipped module, `<NAME>_PATH` (the
//! copy's absolute path) and `<NAME>` (its bytes), plus [`BUILTIN`]. The
//! test modules (hostile policies, failing and slow filters) are embedded by
//! `throng-test-modules`, a dev-dependency, so the edge binary carries only
//! real modules.
//!
//! The build script reruns when a guest crate, `modules/Cargo.{toml,lock}`,
//! `wit/` or `host/policy-core` changes.
//!
//! The guest workspace is built for Wasm only, so its crates' unit tests
//! would never run; the keyword filter's matching (`modules/filter-keywords/
//! src/words.rs`, plain Rust) is compiled into this crate's tests instead,
//! so `cargo test --workspace` runs them.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

// Compiled here for its `#[cfg(test)]` unit tests; the module's own lib.rs
// uses the items the tests do not.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../../modules/filter-keywords/src/words.rs"]
mod filter_keywords_words;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_modules_are_built_in_and_each_is_a_component() {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["filter-keywords", "policy-default"]);
        for (name, bytes) in BUILTIN {
            assert!(bytes.len() > 8, "{name} is too short");
            assert_eq!(&bytes[..4], b"\0asm", "{name} lacks the wasm magic");
            assert_eq!(&bytes[4..8], [0x0d, 0x00, 0x01, 0x00], "{name} is not a component");
        }
    }

    #[test]
    fn names_paths_and_bytes_agree() {
        let named: [(&str, &str, &[u8]); 2] = [
            ("policy-default", POLICY_DEFAULT_PATH, POLICY_DEFAULT),
            ("filter-keywords", FILTER_KEYWORDS_PATH, FILTER_KEYWORDS),
        ];
        for (name, path, bytes) in named {
            assert!(
                BUILTIN.iter().any(|(n, b)| *n == name && b.as_ptr() == bytes.as_ptr()),
                "{name} missing from BUILTIN"
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
