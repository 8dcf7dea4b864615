#!/usr/bin/env python3
"""A tenant's administrator (or anyone who can reach the admin port)
attacking an edge's admin endpoint, with the edge watched.

The script starts a release `throng serve` on its embedded defaults with a
fresh data dir, runs one attack for --seconds, and meanwhile, twice a
second, times an operator's `GET /stats` and a load balancer's
`GET /healthz`, and samples the edge's RSS and CPU (/proc) and the size of
its data dir. Standard library only.

    python3 tests/hostile/admin_attacks.py ATTACK [--seconds 30]

Attacks (what each did on a090a11 is in BENCHMARKS.md):
  partial      600 connections at once that never finish their headers,
               each reopened as soon as the edge cuts it
  deployments  a tenant creates filter deployments as fast as it can,
               never activating them
  refused      a tenant uploads modules that compile and are then refused
               (each a new hash, so each compiles)
  events       a tenant opens 40 `/v1/events` streams and holds them
  slow-upload  a tenant sends upload bodies a byte every 2 s
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_KEY = "throng-dev-operator-key-change-me"
# The built-in keyword filter: deployed by name, and uploaded (as the
# component the build made) without its `words` param, so that it compiles
# and is then refused.
FILTER = "builtin:filter-keywords"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, token: str | None, body: bytes | None = None,
            timeout: float = 30) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def proc_figures(pid: int) -> tuple[int, float]:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Watch:
    """Operator and health-check latency, RSS, CPU and disk, twice a second."""

    def __init__(self, pid: int, port: int, data: Path):
        self.pid, self.port, self.data = pid, port, data
        self.stats_ms: list[float] = []
        self.health_ms: list[float] = []
        self.failed = 0
        self.rss: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for path, token, into in (("/stats", OPERATOR_KEY, self.stats_ms), ("/healthz", None, self.health_ms)):
                t = time.monotonic()
                try:
                    status, _ = request(self.port, "GET", path, token, timeout=60)
                    if status != 200:
                        self.failed += 1
                except OSError:
                    self.failed += 1
                into.append((time.monotonic() - t) * 1000)
            self.rss.append(proc_figures(self.pid)[0])
            self.stop.wait(0.5)


def tenant_token(binary: Path) -> str:
    out = subprocess.run(
        [str(binary), "token", "--tenant", "dev", "--user", "attacker", "--role", "tenant-admin", "--ttl", "1h"],
        check=True, capture_output=True, text=True)
    return out.stdout.strip()


def module_bytes() -> bytes:
    path = ROOT / "target" / "guest-modules" / "wasm32-wasip2" / "release" / "filter_keywords.wasm"
    if not path.exists():
        raise SystemExit(f"no {path}: build the workspace first (cargo build --release)")
    return path.read_bytes()


def variant(module: bytes, i: int) -> bytes:
    tag = f"attack-{i}".encode()
    section = bytes([len(tag)]) + tag
    return module + bytes([0, len(section)]) + section


def attack_partial(port, token, until, tally, ctx) -> None:
    held: list[socket.socket] = []
    while time.monotonic() < until:
        while len(held) < 600:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                s.setblocking(False)
                held.append(s)
                tally["opened"] = tally.get("opened", 0) + 1
            except OSError:
                tally["refused"] = tally.get("refused", 0) + 1
                break
        alive = []
        for s in held:
            try:
                if s.recv(1) == b"":
                    s.close()
                    tally["cut"] = tally.get("cut", 0) + 1
                    continue
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                tally["cut"] = tally.get("cut", 0) + 1
                continue
            alive.append(s)
        held = alive
        time.sleep(0.05)
    for s in held:
        s.close()


def count(tally, status: int) -> None:
    tally[str(status)] = tally.get(str(status), 0) + 1


def attack_deployments(port, token, until, tally, ctx) -> None:
    # Large: a long word list and a long note; each a new version.
    words = ",".join(f"w{i:06d}" for i in range(400))
    i = 0
    while time.monotonic() < until:
        i += 1
        body = json.dumps({"filters": [{"module": FILTER, "params": {"words": words}}],
                           "note": f"{i} " + "n" * 1000}).encode()
        status, _ = request(port, "POST", "/v1/deployments/filters/dev", token, body)
        count(tally, status)


def attack_refused(port, token, until, tally, ctx) -> None:
    i = 0
    while time.monotonic() < until:
        i += 1
        path = "/v1/modules?name=kw&version=1&world=message-filter&params=%7B%7D"
        status, _ = request(port, "POST", path, token, variant(ctx["module"], i), timeout=120)
        count(tally, status)


def attack_events(port, token, until, tally, ctx) -> None:
    held = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        line = s.recv(64).split(b"\r\n")[0]
        count(tally, int(line.split()[1]) if len(line.split()) > 1 else 0)
        held.append(s)
    while time.monotonic() < until:
        time.sleep(0.5)
    for s in held:
        s.close()


def attack_slow_upload(port, token, until, tally, ctx) -> None:
    held = []
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall((f"POST /v1/modules?name=s&version=1&world=message-filter HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n").encode())
        s.setblocking(False)
        held.append(s)
    while time.monotonic() < until:
        for s in held:
            try:
                s.send(b"\0")
            except OSError:
                pass
        time.sleep(2)
    for s in held:
        try:
            s.setblocking(True)
            s.settimeout(1)
            line = s.recv(64).split(b"\r\n")[0]
            count(tally, int(line.split()[1]) if len(line.split()) > 1 else 0)
        except OSError:
            count(tally, 0)
        s.close()


ATTACKS = {
    "partial": attack_partial,
    "deployments": attack_deployments,
    "refused": attack_refused,
    "events": attack_events,
    "slow-upload": attack_slow_upload,
}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attack", choices=sorted(ATTACKS))
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "throng"))
    args = p.parse_args()
    binary = Path(args.binary)
    tmp = Path(tempfile.mkdtemp(prefix="throng-admin-attack-"))
    data = tmp / "data"
    port = free_port()
    log = open(tmp / "edge.log", "w")
    proc = subprocess.Popen(
        [str(binary), "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0", "--admin", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("throng ready") or not line:
            break
    ctx = {"module": module_bytes() if args.attack == "refused" else b""}
    token = tenant_token(binary)
    time.sleep(1)
    rss0, cpu0 = proc_figures(proc.pid)
    disk0 = dir_bytes(data)
    watch = Watch(proc.pid, port, data)
    watch.thread.start()
    time.sleep(2)  # a baseline of the watched figures before the attack
    base_stats, base_health = list(watch.stats_ms), list(watch.health_ms)
    tally: dict[str, int] = {}
    until = time.monotonic() + args.seconds
    threads = [threading.Thread(target=ATTACKS[args.attack], args=(port, token, until, tally, ctx))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + 180)
    during_stats = watch.stats_ms[len(base_stats):]
    during_health = watch.health_ms[len(base_health):]
    watch.stop.set()
    watch.thread.join(70)
    rss1, cpu1 = proc_figures(proc.pid)
    disk1 = dir_bytes(data)
    alive = proc.poll() is None
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    result = {
        "attack": args.attack,
        "seconds": args.seconds,
        "attacker_answers": tally,
        "edge_alive": alive,
        "rss_kib": {"before": rss0, "max": max(watch.rss or [rss0]), "after": rss1},
        "edge_cpu_s": round(cpu1 - cpu0, 1),
        "data_dir_bytes": {"before": disk0, "after": disk1},
        "operator_stats_ms": {"baseline_p50": pct(base_stats, 0.5), "p50": pct(during_stats, 0.5),
                              "max": pct(during_stats, 1.0)},
        "healthz_ms": {"baseline_p50": pct(base_health, 0.5), "p50": pct(during_health, 0.5),
                       "max": pct(during_health, 1.0)},
        "watch_failures": watch.failed,
    }
    print(json.dumps(result, indent=2))
    sys.exit(0 if alive and watch.failed == 0 else 1)


if __name__ == "__main__":
    main()
