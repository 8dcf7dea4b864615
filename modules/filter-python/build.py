#!/usr/bin/env python3
"""Builds app.py into a `message-filter` WebAssembly component.

Usage: python3 build.py OUT.wasm [--venv DIR] [--bindings DIR] [--force]

Steps, each named in the error if it fails (OUT's folder is made if missing):
1. venv: create DIR (default <repo>/target/py-filter/venv) unless it exists;
2. install: pip-install the pinned componentize-py unless it is already there;
3. up-to-date check: stop if OUT.wasm is this script's own output for the
   same inputs (componentize-py is not reproducible: every run gives a
   different file, so rebuilding would also change the module's hash);
4. componentize: app.py, alone in a staging folder, against <repo>/wit, world
   `message-filter`, to a temporary file renamed over OUT.wasm.

componentize-py generates the Python bindings (`wit_world`) itself while it
builds; `--bindings DIR` also writes them out, for editors and type checkers.
Stdlib only; needs network access to PyPI on the first run.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Newest release at the time of writing; checked to build this filter and to
# run under wasmtime. Its components import WASI 0.2.9, which a Wasmtime host
# providing any 0.2.x satisfies (its linker matches semver-compatible names).
COMPONENTIZE_PY = "0.25.1"
WORLD = "message-filter"

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
APP = HERE / "app.py"
WIT = REPO / "wit"


class BuildError(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")


def run(step: str, cmd: list, env: dict = None) -> str:
    """Runs `cmd`, returning its stdout; on failure, a BuildError with its output."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:
        raise BuildError(step, f"cannot run {cmd[0]}: {e}") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise BuildError(step, f"`{' '.join(map(str, cmd))}` exited {done.returncode}:\n{output}")
    return done.stdout


def ensure_venv(venv: Path) -> Path:
    """Creates the venv if needed; returns its componentize-py."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"build.py: creating venv {venv}", file=sys.stderr)
        run("venv", [sys.executable, "-m", "venv", str(venv)])
    tool = venv / "bin" / "componentize-py"
    # Asking the tool its version (~0.1 s) is cheaper than asking pip, and
    # also proves it runs.
    if tool.exists():
        try:
            version = subprocess.run([str(tool), "--version"], capture_output=True, text=True).stdout
        except OSError:
            version = ""
        if version.split() == ["componentize-py", COMPONENTIZE_PY]:
            return tool
    print(f"build.py: installing componentize-py=={COMPONENTIZE_PY}", file=sys.stderr)
    run(
        "install",
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"componentize-py=={COMPONENTIZE_PY}"],
    )
    return tool


def inputs_digest() -> str:
    """What the output depends on: the tool's version, the app and the WIT."""
    h = hashlib.sha256()
    h.update(f"componentize-py {COMPONENTIZE_PY} world {WORLD}\n".encode())
    for path in [APP, *sorted(WIT.rglob("*.wit"))]:
        h.update(f"{path.relative_to(REPO)}\n".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stamp_path(venv: Path, out: Path) -> Path:
    # One stamp per output path, kept in the venv (our cache), not beside OUT.
    key = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return venv / "throng-builds" / f"{key}.json"


def up_to_date(stamp: Path, out: Path, inputs: str) -> bool:
    try:
        recorded = json.loads(stamp.read_text())
        return (
            recorded.get("inputs") == inputs
            and out.is_file()
            and recorded.get("output") == file_digest(out)
        )
    except (OSError, ValueError):
        return False


def componentize(tool: Path, out: Path) -> None:
    # Stage app.py alone: componentize-py would otherwise see build.py and
    # README.md too, and CPython would write __pycache__ into the source tree.
    stage = Path(tempfile.mkdtemp(prefix="filter-python-"))
    # The temporary output sits beside OUT so the rename is atomic.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        shutil.copy2(APP, stage / "app.py")
        # componentize-py appends $VIRTUAL_ENV's site-packages to the app's
        # path; a venv the caller happens to have active must not leak in.
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        # A Python error is reported with its traceback; the tool's own Rust
        # backtrace (printed when RUST_BACKTRACE is set) would bury it.
        env["RUST_LIB_BACKTRACE"] = "0"
        run(
            "componentize",
            [str(tool), "--quiet", "-d", str(WIT), "-w", WORLD,
             "componentize", "app", "-p", str(stage), "-o", tmp],
            env=env,
        )
        if os.path.getsize(tmp) == 0:
            raise BuildError("componentize", "componentize-py wrote an empty file")
        # mkstemp makes the file private (0600); give it a normal file's mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description="Build the Python message filter into a Wasm component.")
    parser.add_argument("out", type=Path, help="the component to write, e.g. filter-python.wasm")
    parser.add_argument("--venv", type=Path, default=REPO / "target" / "py-filter" / "venv",
                        help="venv holding componentize-py (created if missing; default %(default)s)")
    parser.add_argument("--bindings", type=Path, help="also write the generated Python bindings here")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT is up to date")
    args = parser.parse_args()
    out = args.out.resolve()
    venv = args.venv.resolve()

    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BuildError("output", f"cannot make folder {out.parent}: {e}") from e
        tool = ensure_venv(venv)
        if args.bindings:
            run("bindings", [str(tool), "--quiet", "-d", str(WIT), "-w", WORLD,
                             "bindings", str(args.bindings.resolve())])
        inputs = inputs_digest()
        stamp = stamp_path(venv, out)
        if not args.force and up_to_date(stamp, out, inputs):
            print(f"build.py: {out} is up to date", file=sys.stderr)
            return 0
        componentize(tool, out)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"inputs": inputs, "output": file_digest(out)}) + "\n")
    except BuildError as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 1
    print(f"build.py: wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
