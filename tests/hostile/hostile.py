#!/usr/bin/env python3
"""Hostile raw-QUIC clients against a Throng edge, with the edge watched.

Each attack is a client a hostile user could write with any QUIC library
(here aioquic, `pip install aioquic`): it speaks `throng/3` by hand, so it can
do what the Rust client library never does. The script starts a release
`throng serve` on its embedded defaults (or attaches to a running one with
--pid/--server), runs one attack for --seconds, and meanwhile samples the
edge's RSS and CPU from /proc once a second and checks, every two seconds,
that a legitimate viewer from another source address (127.0.0.2) still gets
in: Hello -> Welcome, Join -> Joined, Ping -> Pong.

    python3 tests/hostile/hostile.py ATTACK [--seconds 60]   # prints a JSON report

Attacks (what each was observed to do to an unbounded edge, see BENCHMARKS.md):
  churn          one viewer token cycles Join/Leave over new room names
  ping-flood     no flow-control credit granted, Pings streamed
  ping-stall     Pings under the control rate, no credit granted: replies pile up
  unjoined-send  Sends to a room the client never joined
  initial-flood  QUIC Initial packets from 64 sockets, never finished
  never-hello    handshakes completed, Hello never sent
  half-open      handshakes started (Initial answered), never finished
  wt-never-connect  browser-protocol (h3) handshakes finished, no CONNECT, held
  wt-never-hello    WebTransport sessions opened (CONNECT answered 200), no Hello, held
  wt-churn       a WebTransport session cycles Join/Leave over new room names
  wt-ping-flood  a WebTransport session granting no credit, Pings streamed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived

ROOT = Path(__file__).resolve().parents[2]
ATTACKER = "127.0.0.1"
PROBE_SOURCE = "127.0.0.2"

# --- throng/3 frames: a 4-byte big-endian length, then postcard ------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def text(s: str) -> bytes:
    b = s.encode()
    return varint(len(b)) + b


def framed(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def hello(token: str) -> bytes:
    return framed(varint(0) + text(token))


def join(room: str) -> bytes:
    return framed(varint(1) + text(room) + b"\x00" + varint(0))  # no resume, epoch 0


def leave(room: str) -> bytes:
    return framed(varint(2) + text(room))


def send(room: str, body: bytes, msg_id: int) -> bytes:
    return framed(varint(3) + text(room) + varint(0) + varint(len(body)) + body + varint(msg_id))


def ping(nonce: int) -> bytes:
    return framed(varint(4) + varint(nonce))


EDGE_FRAMES = [
    "Welcome", "Joined", "Batch", "Ack", "Rejected", "Error", "Pong",
    "JoinRefused", "Presence", "PresenceRefused", "Refreshed", "RefreshRefused",
]


def read_varint(buf: bytes, at: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        b = buf[at]
        at += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, at


def edge_frame_name(payload: bytes) -> str:
    tag, _ = read_varint(payload, 0)
    return EDGE_FRAMES[tag] if tag < len(EDGE_FRAMES) else f"unknown({tag})"


# --- a raw QUIC client -----------------------------------------------------


class Raw(QuicConnectionProtocol):
    """Counts the edge's control frames and how it closed the connection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bufs: dict[int, bytes] = {}
        self.seen: dict[str, int] = {}
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.welcome = asyncio.Event()
        self.joined = asyncio.Event()
        self.pong = asyncio.Event()
        self.control: int | None = None

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            self.frames(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, ConnectionTerminated) and not self.closed.done():
            self.closed.set_result(event.error_code)

    def frames(self, stream_id: int, data: bytes, ended: bool) -> None:
        # Control frames come on the control stream; Joined and Batch on each
        # room's own stream. Every stream is parsed; a stalled one costs us,
        # not the edge.
        buf = self.bufs.get(stream_id, b"") + data
        while len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) < 4 + n:
                break
            name = edge_frame_name(buf[4 : 4 + n])
            buf = buf[4 + n :]
            self.seen[name] = self.seen.get(name, 0) + 1
            {"Welcome": self.welcome, "Joined": self.joined, "Pong": self.pong}.get(
                name, asyncio.Event()
            ).set()
        if ended:
            self.bufs.pop(stream_id, None)
        else:
            self.bufs[stream_id] = buf

    def write(self, data: bytes) -> None:
        if self.control is None:
            self.control = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(self.control, data)
        self.transmit()


class Web(Raw):
    """The same client as a browser reaches the edge: HTTP/3, a CONNECT to
    the session path, then the protocol on WebTransport streams."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.session: int | None = None
        self.answered: asyncio.Future = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event) -> None:
        if isinstance(event, ConnectionTerminated) and not self.closed.done():
            self.closed.set_result(event.error_code)
        # aioquic does not mark a bidirectional WebTransport stream it opened
        # as one, and would parse the edge's answers as HTTP/3 frames.
        if isinstance(event, StreamDataReceived) and event.stream_id == self.control:
            self.frames(event.stream_id, event.data, event.end_stream)
            return
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived) and e.stream_id == self.session and not self.answered.done():
                self.answered.set_result(dict(e.headers).get(b":status", b"?").decode())
            elif isinstance(e, WebTransportStreamDataReceived):
                self.frames(e.stream_id, e.data, e.stream_ended)

    def open_session(self, authority: str, path: str = "/throng") -> None:
        self.session = self._quic.get_next_available_stream_id()
        self.h3.send_headers(self.session, [
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", authority.encode()),
            (b":path", path.encode()), (b":protocol", b"webtransport"),
        ])
        self.transmit()

    def write(self, data: bytes) -> None:
        if self.control is None:
            self.control = self.h3.create_webtransport_stream(self.session, is_unidirectional=False)
        try:
            self._quic.send_stream_data(self.control, data)
        except (RuntimeError, ValueError):
            # The edge stopped or ended the stream (it is closing the session).
            if not self.closed.done():
                self.closed.set_result("stream stopped")
        self.transmit()


async def open_web(server: tuple[str, int], source: str, *, credit: int | None = None, connect: bool = True) -> Web:
    """An h3 connection, and (with `connect`) a WebTransport session the edge accepted."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="localhost")
    config.verify_mode = ssl.CERT_NONE
    config.idle_timeout = 30.0
    if credit is not None:
        config.max_data = credit
        config.max_stream_data = credit
    quic = QuicConnection(configuration=config)
    if credit is not None:
        freeze_credit(quic)
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: Web(quic), local_addr=(source, 0))
    proto.connect(server)
    await proto.wait_connected()
    if connect:
        proto.open_session(f"{server[0]}:{server[1]}")
        status = await asyncio.wait_for(proto.answered, 5)
        if status != "200":
            raise RuntimeError(f"CONNECT answered {status}")
    return proto


def freeze_credit(quic: QuicConnection) -> None:
    """Never grant the edge more flow-control credit than the handshake did."""
    quic._write_connection_limits = lambda builder, space: None
    quic._write_stream_limits = lambda builder, space, stream: None


async def open_raw(
    server: tuple[str, int], source: str, *, credit: int | None = None, wait: bool = True
) -> Raw:
    config = QuicConfiguration(is_client=True, alpn_protocols=["throng/3"], server_name="localhost")
    config.verify_mode = ssl.CERT_NONE
    config.idle_timeout = 30.0
    if credit is not None:
        config.max_data = credit
        config.max_stream_data = credit
    quic = QuicConnection(configuration=config)
    if credit is not None:
        freeze_credit(quic)
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: Raw(quic), local_addr=(source, 0))
    proto.connect(server)
    if wait:
        await proto.wait_connected()
    return proto


def drop(proto: Raw) -> None:
    # Abandon without a CONNECTION_CLOSE: the edge must time it out. The
    # connection's own timers must not write to the closed socket either.
    proto.transmit = lambda: None
    proto._transport.close()


async def close(proto: Raw) -> None:
    try:
        proto.close()
        await asyncio.wait_for(proto.wait_closed(), 1)
    except (asyncio.TimeoutError, Exception):
        pass
    drop(proto)


# --- attacks ---------------------------------------------------------------


@dataclass
class Tally:
    connections: int = 0
    sent: int = 0
    frames: dict = field(default_factory=dict)
    closes: dict = field(default_factory=dict)
    errors: int = 0

    def absorb(self, proto: Raw) -> None:
        for k, v in proto.seen.items():
            self.frames[k] = self.frames.get(k, 0) + v
        if proto.closed.done():
            code = str(proto.closed.result())
            self.closes[code] = self.closes.get(code, 0) + 1


async def authenticated(server, token, *, credit=None) -> Raw:
    proto = await asyncio.wait_for(open_raw(server, ATTACKER, credit=credit), 5)
    proto.write(hello(token))
    await asyncio.wait_for(proto.welcome.wait(), 5)
    return proto


async def churn(server, token, until, tally: Tally, connect=None) -> None:
    """Join/Leave over distinct new room names, as fast as the edge lets it."""
    connect = connect or authenticated
    while time.monotonic() < until:
        try:
            proto = await connect(server, token)
        except Exception:
            tally.errors += 1
            await asyncio.sleep(0.05)
            continue
        tally.connections += 1
        while time.monotonic() < until and not proto.closed.done():
            for _ in range(50):
                room = "churn-" + uuid.uuid4().hex[:16]
                proto.write(join(room) + leave(room))
                tally.sent += 2
            await asyncio.sleep(0.01)
        tally.absorb(proto)
        await close(proto)


async def ping_flood(server, token, until, tally: Tally, connect=None) -> None:
    """Grant 16 KiB of credit once, then stream Pings and never read more."""
    connect = connect or authenticated
    nonce = 0
    while time.monotonic() < until:
        try:
            proto = await connect(server, token, credit=16 * 1024)
        except Exception:
            tally.errors += 1
            await asyncio.sleep(0.05)
            continue
        tally.connections += 1
        while time.monotonic() < until and not proto.closed.done():
            proto.write(b"".join(ping(nonce + i) for i in range(200)))
            nonce += 200
            tally.sent += 200
            await asyncio.sleep(0.005)
        tally.absorb(proto)
        await close(proto)


async def ping_stall(server, token, until, tally: Tally) -> None:
    """Pings just under the control rate, 4 KiB of credit, never read."""
    nonce = 0
    while time.monotonic() < until:
        try:
            proto = await authenticated(server, token, credit=4 * 1024)
        except Exception:
            tally.errors += 1
            await asyncio.sleep(0.05)
            continue
        tally.connections += 1
        while time.monotonic() < until and not proto.closed.done():
            proto.write(ping(nonce))
            nonce += 1
            tally.sent += 1
            await asyncio.sleep(1 / 95)
        tally.absorb(proto)
        await close(proto)


async def unjoined_send(server, token, until, tally: Tally) -> None:
    """Send (with a full-size body) to a room this connection never joined."""
    body = b"x" * 4000
    msg_id = 0
    while time.monotonic() < until:
        try:
            proto = await authenticated(server, token)
        except Exception:
            tally.errors += 1
            await asyncio.sleep(0.05)
            continue
        tally.connections += 1
        while time.monotonic() < until and not proto.closed.done():
            proto.write(b"".join(send("never-joined", body, msg_id + i) for i in range(20)))
            msg_id += 20
            tally.sent += 20
            await asyncio.sleep(0.002)
        tally.absorb(proto)
        await close(proto)


def initial_datagram() -> bytes:
    config = QuicConfiguration(is_client=True, alpn_protocols=["throng/3"], server_name="localhost")
    quic = QuicConnection(configuration=config)
    quic.connect(("127.0.0.1", 4433), now=time.monotonic())
    return quic.datagrams_to_send(now=time.monotonic())[0][0]


async def initial_flood(server, token, until, tally: Tally) -> None:
    """Fresh Initial packets (new connection ids) from 64 sockets, never answered.

    Making an Initial costs the client a TLS ClientHello; 512 distinct ones are
    made up front and replayed round robin, which to the edge are new
    connections as long as their connection ids differ per socket.
    """
    pool = [initial_datagram() for _ in range(512)]
    socks = []
    for _ in range(64):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((ATTACKER, 0))
        socks.append(s)
    i = 0
    while time.monotonic() < until:
        for s in socks:
            try:
                s.sendto(pool[i % len(pool)], server)
                tally.sent += 1
            except BlockingIOError:
                pass
            i += 1
            # Drain what the edge answers (Retry, Handshake) so the socket
            # buffer does not hide the edge's work.
            try:
                while s.recv(2048):
                    tally.frames["datagrams_back"] = tally.frames.get("datagrams_back", 0) + 1
            except BlockingIOError:
                pass
        await asyncio.sleep(0.001)
    for s in socks:
        s.close()


async def held(open_one, until, tally: Tally) -> None:
    """Open connections 16 at a time and hold them; forget what the edge closed."""
    kept: list = []
    while time.monotonic() < until:
        batch = [asyncio.create_task(asyncio.wait_for(open_one(), 3)) for _ in range(16)]
        for t in batch:
            try:
                kept.append(await t)
                tally.connections += 1
            except Exception:
                tally.errors += 1
        for p in [p for p in kept if p.closed.done()]:
            tally.absorb(p)
            drop(p)
        kept = [p for p in kept if not p.closed.done()]
        await asyncio.sleep(0.02)
    for p in kept:
        tally.absorb(p)
        drop(p)


async def never_hello(server, token, until, tally: Tally) -> None:
    """Finish handshakes, open no stream, send nothing; keep opening more."""
    await held(lambda: open_raw(server, ATTACKER), until, tally)


async def half_open(server, token, until, tally: Tally) -> None:
    """Start handshakes and abandon them after the edge's first answer."""
    while time.monotonic() < until:
        batch = []
        for _ in range(32):
            batch.append(await open_raw(server, ATTACKER, wait=False))
            tally.connections += 1
        await asyncio.sleep(0.05)
        for p in batch:
            drop(p)


async def web_authenticated(server, token, *, credit=None) -> Web:
    proto = await asyncio.wait_for(open_web(server, ATTACKER, credit=credit), 5)
    proto.write(hello(token))
    await asyncio.wait_for(proto.welcome.wait(), 5)
    return proto


async def wt_never_connect(server, token, until, tally: Tally) -> None:
    """Finish h3 handshakes and never ask for a session; keep opening more."""
    await held(lambda: open_web(server, ATTACKER, connect=False), until, tally)


async def wt_never_hello(server, token, until, tally: Tally) -> None:
    """Open WebTransport sessions and never say Hello; keep opening more."""
    await held(lambda: open_web(server, ATTACKER), until, tally)


async def wt_churn(server, token, until, tally: Tally) -> None:
    """`churn` over WebTransport."""
    await churn(server, token, until, tally, connect=web_authenticated)


async def wt_ping_flood(server, token, until, tally: Tally) -> None:
    """`ping-flood` over WebTransport: 16 KiB of credit, never raised."""
    await ping_flood(server, token, until, tally, connect=web_authenticated)


ATTACKS = {
    "churn": churn,
    "ping-flood": ping_flood,
    "ping-stall": ping_stall,
    "unjoined-send": unjoined_send,
    "initial-flood": initial_flood,
    "never-hello": never_hello,
    "half-open": half_open,
    "wt-never-connect": wt_never_connect,
    "wt-never-hello": wt_never_hello,
    "wt-churn": wt_churn,
    "wt-ping-flood": wt_ping_flood,
}

# --- the legitimate viewer and the watcher ----------------------------------


async def probe(server, token) -> float | None:
    """Seconds from nothing to Pong for a legitimate viewer; None if refused."""
    start = time.monotonic()
    proto = None
    try:
        proto = await asyncio.wait_for(open_raw(server, PROBE_SOURCE), 3)
        proto.write(hello(token))
        await asyncio.wait_for(proto.welcome.wait(), 3)
        proto.write(join("probe-room"))
        await asyncio.wait_for(proto.joined.wait(), 3)
        proto.write(ping(7))
        await asyncio.wait_for(proto.pong.wait(), 3)
        return time.monotonic() - start
    except Exception:
        return None
    finally:
        if proto is not None:
            await close(proto)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def watch(pid, server, token, until, samples, probes) -> None:
    next_probe = time.monotonic()
    while time.monotonic() < until:
        samples.append((time.monotonic(), rss_kib(pid), cpu_seconds(pid)))
        if time.monotonic() >= next_probe:
            next_probe += 2
            probes.append(await probe(server, token))
        await asyncio.sleep(max(0.0, 1 - (time.monotonic() - samples[-1][0])))


def mint(binary: Path, config: list[str], user: str) -> str:
    out = subprocess.run(
        [str(binary), "token", *config, "--tenant", "dev", "--user", user, "--role", "viewer",
         "--rooms", "*", "--ttl", "3600s"],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def start_edge(binary: Path, data_dir: Path) -> tuple[subprocess.Popen, tuple[str, int], Path]:
    log = data_dir / "edge.log"
    proc = subprocess.Popen(
        [str(binary), "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--admin", "off"],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("throng ready"):
            addr = line.split("quic=")[1].split()[0]
            host, port = addr.rsplit(":", 1)
            return proc, (host, int(port)), log
    proc.kill()
    raise SystemExit(f"edge did not start; see {log}")


async def run(args) -> dict:
    binary = Path(args.binary)
    tmp = Path(tempfile.mkdtemp(prefix="throng-hostile-"))
    proc = None
    if args.pid:
        pid, server = args.pid, (args.server.split(":")[0], int(args.server.split(":")[1]))
    else:
        proc, server, _ = start_edge(binary, tmp)
        pid = proc.pid
    try:
        token = mint(binary, args.token_args, "mallory")
        probe_token = mint(binary, args.token_args, "alice")
        # Warm up: the first legitimate viewer, then the baseline.
        await probe(server, probe_token)
        baseline, samples, probes, after = [], [], [], []
        await watch(pid, server, probe_token, time.monotonic() + 5, baseline, [])
        tally = Tally()
        until = time.monotonic() + args.seconds
        await asyncio.gather(
            ATTACKS[args.attack](server, token, until, tally),
            watch(pid, server, probe_token, until, samples, probes),
        )
        await watch(pid, server, probe_token, time.monotonic() + 10, after, [])
        rss = [s[1] for s in samples]
        # Flat means: after the attack's first 10 s (connection setup, pools
        # filling), RSS stays within 10% of where it was at 10 s.
        settled = [s[1] for s in samples if s[0] - samples[0][0] >= 10] or rss
        ok = [p for p in probes if p is not None]
        return {
            "attack": args.attack,
            "seconds": args.seconds,
            "rss_before_mib": round(baseline[-1][1] / 1024, 1),
            "rss_max_mib": round(max(rss) / 1024, 1),
            "rss_at_10s_mib": round(settled[0] / 1024, 1),
            "rss_end_mib": round(rss[-1] / 1024, 1),
            "rss_after_10s_idle_mib": round(after[-1][1] / 1024, 1),
            "flat_after_10s": max(settled) <= settled[0] * 1.10,
            "edge_cpu_percent": round(100 * (samples[-1][2] - samples[0][2]) / (samples[-1][0] - samples[0][0]), 1),
            "probe_ok": f"{len(ok)}/{len(probes)}",
            "probe_worst_ms": round(1000 * max(ok), 1) if ok else None,
            "attacker": {
                "connections": tally.connections,
                "sent": tally.sent,
                "frames_back": tally.frames,
                "closes_by_code": tally.closes,
                "failed_connects": tally.errors,
            },
            "edge_alive": proc is None or proc.poll() is None,
        }
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attack", choices=sorted(ATTACKS))
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "throng"))
    p.add_argument("--pid", type=int, help="watch a running edge instead of starting one")
    p.add_argument("--server", default="127.0.0.1:4433")
    p.add_argument("--token-args", nargs="*", default=[], help="extra `throng token` args, e.g. --secret")
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["edge_alive"] else 1)


if __name__ == "__main__":
    main()
