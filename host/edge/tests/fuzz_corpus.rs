//! Replays the saved fuzz corpus and every crash input through the checks the
//! fuzz targets run (`throng_edge::fuzzing`), so CI covers what fuzzing found
//! without cargo-fuzz.

use std::path::{Path, PathBuf};

/// Every file of `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        files.extend(entries.map(|e| e.expect("readable corpus entry").path()));
    }
    files.sort();
    // An empty or moved corpus would make the replay pass vacuously.
    assert!(files.len() >= 5, "fuzz/corpus/{target} has {} inputs", files.len());
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    for file in inputs(target) {
        let data = std::fs::read(&file).expect("readable corpus file");
        check(&data);
    }
}

#[test]
fn config_corpus() {
    replay("config", throng_edge::fuzzing::config);
}

#[test]
fn token_corpus() {
    replay("token", throng_edge::fuzzing::token);
}

#[test]
fn tick_plan_corpus() {
    replay("tick_plan", throng_edge::fuzzing::tick_plan);
}

#[test]
fn filter_verdicts_corpus() {
    replay("filter_verdicts", throng_edge::fuzzing::filter_verdicts);
}
