//! What some tests build or drive outside cargo: the Python filter
//! (componentize-py, from PyPI) and the browser driver (playwright-core
//! from npm, Debian's Chromium). Each is prepared on first use, so the
//! README's one test command is enough once `.ci/run`'s packages are there.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// Where tests keep what they build and what they leave behind to look at.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { repo().join(p) })
        .unwrap_or_else(|| repo().join("target"))
}

/// Test artifacts (screenshots): `<target>/test-artifacts/`.
pub fn artifacts() -> PathBuf {
    let dir = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// Runs `cmd`; panics with its output unless it succeeds. Returns stdout.
pub fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds `modules/filter-python` (componentize-py in a venv under the
/// target dir; up to date after the first build) and returns its bytes.
pub fn python_filter() -> Vec<u8> {
    // One build at a time: tests in one binary may ask together.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let out = target_dir().join("py-filter").join("filter-python.wasm");
    // A fresh clone has no such folder yet; build.py writes into it.
    std::fs::create_dir_all(target_dir().join("py-filter")).expect("py-filter dir");
    run(
        "building modules/filter-python (python3, componentize-py from PyPI)",
        Command::new("python3")
            .arg(repo().join("modules/filter-python/build.py"))
            .arg(&out)
            .arg("--venv")
            .arg(target_dir().join("py-filter").join("venv")),
    );
    std::fs::read(&out).expect("the built filter")
}

/// The browser driver's folder with its npm packages installed.
pub fn browser_driver() -> PathBuf {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = repo().join("tests/browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        run(
            "npm ci in tests/browser",
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir),
        );
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: `apt-get install -y chromium` (or set CHROMIUM)"
    );
    dir
}
