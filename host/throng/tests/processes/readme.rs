//! The README's command blocks, run as a newcomer runs them: each block
//! marked `<!-- readme-test -->` goes through bash, command by command,
//! from a directory laid out like the repository, against `throng serve`
//! on its dev defaults (in a network namespace of its own where it can
//! have one, so a dev edge left running does not fail it). So the README
//! cannot drift from what the product does.
//!
//! Read the way a person reads the blocks, down the page in one terminal:
//! - `throng serve ...` is the edge this test started (terminal 1);
//! - the command after a `# terminal 2` comment runs in the background
//!   (another terminal), and ends with the block;
//! - a command whose next line is a `#   rejected ...` or `#   error ...`
//!   output comment must fail; every other command must succeed;
//! - `xdg-open URL` fetches the page (it must answer).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{BIN, IN_NETNS, Serve, in_own_netns};

/// One command of a block, as bash gets it.
#[derive(Debug, PartialEq)]
struct Step {
    line: usize,
    command: String,
    background: bool,
    must_fail: bool,
}

/// The marked blocks of `readme`, each as its first line's number and
/// its lines.
fn marked_blocks(readme: &str) -> Vec<(usize, Vec<&str>)> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "<!-- readme-test -->" && lines.get(i + 1).is_some_and(|l| l.trim() == "```sh") {
            let start = i + 2;
            let end = (start..lines.len())
                .find(|&j| lines[j].trim() == "```")
                .unwrap_or_else(|| panic!("README line {start}: a block that never ends"));
            blocks.push((start + 1, lines[start..end].to_vec()));
            i = end;
        }
        i += 1;
    }
    blocks
}

/// A block's commands (continued lines joined), read as the module's doc
/// says.
fn steps(first_line: usize, block: &[&str]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut background = false;
    let mut i = 0;
    while i < block.len() {
        let line = first_line + i;
        let mut command = block[i].trim_end().to_owned();
        while command.ends_with('\\') && i + 1 < block.len() {
            i += 1;
            command.push('\n');
            command.push_str(block[i].trim_end());
        }
        i += 1;
        let trimmed = command.trim_start();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            if comment.trim_start().starts_with("terminal 2") {
                background = true;
            }
            let output = comment.trim_start();
            let failure = output.starts_with("rejected") || output.starts_with("error");
            if let Some(last) = steps.last_mut().filter(|_| comment.starts_with("   ") && failure) {
                last.must_fail = true;
            }
            continue;
        }
        if trimmed.starts_with("throng serve") {
            continue;
        }
        steps.push(Step {
            line,
            command,
            background: std::mem::take(&mut background),
            must_fail: false,
        });
    }
    steps
}

/// The bash script that runs `steps` and says which one failed.
fn script(steps: &[Step]) -> String {
    let mut out = String::from(
        "shopt -s expand_aliases\n\
         xdg-open() { curl -fsS -o /dev/null \"${1%%#*}\"; }\n\
         background=\n\
         finish() { for p in $background; do kill \"$p\" 2>/dev/null; done; }\n\
         trap finish EXIT\n",
    );
    for (n, step) in steps.iter().enumerate() {
        out.push_str(&format!("echo \"+ README line {}\" >&2\n", step.line));
        if step.background {
            out.push_str(&format!(
                "{{\n{}\n}} > terminal-{n}.out 2>&1 &\nbackground=\"$background $!\"\n",
                step.command
            ));
            continue;
        }
        out.push_str(&step.command);
        out.push_str("\nrc=$?\n");
        let (bad, want) = if step.must_fail {
            ("-eq 0", "to fail")
        } else {
            ("-ne 0", "to succeed")
        };
        out.push_str(&format!(
            "if [ $rc {bad} ]; then echo \"README line {}: exit $rc; expected {want}\" >&2; exit 1; fi\n",
            step.line
        ));
    }
    out
}

/// A directory that looks like the repository to the README's commands
/// (its `target`, `modules`, `edge-config`, `wit`), where `throng serve`
/// writes its `.throng/` rather than in the repository itself.
fn repo_like(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("the binary is in <target>/release");
    std::os::unix::fs::symlink(target, dir.join("target")).expect("link target");
    for part in ["modules", "edge-config", "wit"] {
        std::os::unix::fs::symlink(repo.join(part), dir.join(part)).expect("link");
    }
    repo.join("README.md")
}

#[test]
fn readme_blocks_are_read_as_the_module_says() {
    let block = [
        "alias throng=./x",
        "# terminal 2: listen",
        "throng client listen lobby",
        "throng client send lobby \\",
        "    \"hi\"",
        "#   rejected id=1",
        "throng serve   # terminal 1",
        "throng module status",
        "#   policies: v1",
    ];
    let got = steps(10, &block);
    let want = [
        (10, "alias throng=./x", false, false),
        (12, "throng client listen lobby", true, false),
        (13, "throng client send lobby \\\n    \"hi\"", false, true),
        (17, "throng module status", false, false),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (s, (line, command, background, must_fail)) in got.iter().zip(want) {
        assert_eq!(
            (s.line, s.command.as_str(), s.background, s.must_fail),
            (line, command, background, must_fail)
        );
    }
}

/// Builds the Python filter where the README's tenant block builds it.
fn prepare_the_python_filter() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = Path::new(BIN).parent().and_then(Path::parent).expect("target dir");
    let status = std::process::Command::new("python3")
        .arg(repo.join("modules/filter-python/build.py"))
        .arg(target.join("py-filter/filter-python.wasm"))
        .status()
        .expect("python3 runs");
    assert!(status.success(), "the Python filter builds: {status}");
}

/// Every marked block of the README runs as written against an edge on
/// its dev defaults.
#[test]
fn the_readmes_command_blocks_run_as_written() {
    if std::env::var_os(IN_NETNS).is_none() {
        // The tenant's block builds the Python filter, whose first build
        // fetches componentize-py from PyPI: a network namespace has only
        // loopback, so the first build is done here, the README's command
        // the same, and in there it finds its output up to date.
        prepare_the_python_filter();
    }
    in_own_netns("readme::the_readmes_command_blocks_run_as_written", run_the_readme);
}

async fn run_the_readme() {
    let dir = tempfile::tempdir().expect("tempdir");
    let readme = std::fs::read_to_string(repo_like(dir.path())).expect("README.md");
    let blocks = marked_blocks(&readme);
    // The try-it, browser, operator, tenant and server API blocks.
    assert!(blocks.len() >= 5, "{} marked blocks", blocks.len());
    let _edge = Serve::start(dir.path(), &[]).await;
    // One terminal session, as a reader goes down the page: what a block
    // sets (an alias, an exported key) holds in the next.
    let all: Vec<Step> = blocks
        .iter()
        .flat_map(|(first_line, block)| steps(*first_line, block))
        .collect();
    let run = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(script(&all))
        .current_dir(dir.path())
        .env_remove("THRONG_ADMIN")
        .env_remove("THRONG_ADMIN_KEY")
        .env_remove("THRONG_TOKEN")
        .kill_on_drop(true)
        .output();
    // The tenant's block builds and uploads the Python filter: a compile
    // of 13-24 s, more with both cores busy.
    let out = tokio::time::timeout(Duration::from_secs(420), run)
        .await
        .expect("the README's blocks ran 420 s")
        .expect("bash runs");
    assert!(
        out.status.success(),
        "the README's blocks:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
