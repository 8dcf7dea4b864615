//! Replays the saved fuzz corpus and every crash input through the checks the
//! fuzz targets run (`throng_wire::fuzzing`), so CI covers what fuzzing found
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
    files
}

#[test]
fn frame_stream_corpus() {
    let files = inputs("frame_stream");
    // An empty or moved corpus would make this test pass vacuously.
    assert!(files.len() >= 10, "fuzz/corpus/frame_stream has {} inputs", files.len());
    for file in files {
        let data = std::fs::read(&file).expect("readable corpus file");
        throng_wire::fuzzing::frame_stream(&data);
    }
}
