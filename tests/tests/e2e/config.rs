//! Every file in edge-config/ parses and validates.

use std::path::Path;

use throng_edge::Config;

#[test]
fn every_shipped_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../edge-config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("edge-config/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected dev.toml and an example, found {seen}");
    // The embedded copy is the file itself.
    Config::dev().expect("embedded dev.toml");
}
