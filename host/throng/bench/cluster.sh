#!/usr/bin/env bash
# Cluster CPU per delivered viewer-frame: the same viewers and sends served
# by one edge, then by EDGES clustered edges over a local nats-server, in
# one run on one machine (BENCHMARKS.md, "Cluster"). Needs nats-server and
# a release build:
#
#   cargo build --release -p throng && host/throng/bench/cluster.sh
#
# Settings (environment): EDGES (3), VIEWERS (3000), RATE (200 msgs/s),
# DURATION (15s), ROOMS (1), PAIRS (2: single, cluster, single, cluster),
# EDGE_CPU (0) and LOAD_CPU (1): every edge runs on EDGE_CPU and the load
# generator on LOAD_CPU, so the edges share one core in both setups.
set -euo pipefail
cd "$(dirname "$0")/../../.."
BIN=${BIN:-target/release/throng}
EDGES=${EDGES:-3}
VIEWERS=${VIEWERS:-3000}
RATE=${RATE:-200}
DURATION=${DURATION:-15s}
ROOMS=${ROOMS:-1}
PAIRS=${PAIRS:-2}
EDGE_CPU=${EDGE_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

work=$(mktemp -d)
# Every process this script starts, one PID a line: edges are started in
# subshells, so an array here would not see them.
touch "$work/pids"
cleanup() {
    while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/pids"
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

nats_port=$(free_port)
nats-server -a 127.0.0.1 -p "$nats_port" >"$work/nats.log" 2>&1 &
echo $! >>"$work/pids"
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
    sleep 0.1
done

# The load generator's own config (no rate limits, 50 ms tick, no cap).
"$BIN" load --write-config "$work/load.toml" >/dev/null 2>&1

# Starts an edge: $1 name, $2 extra config; prints "addr cert pid".
start_edge() {
    local name=$1 extra=$2
    cat "$work/load.toml" >"$work/$name.toml"
    printf '%s\n' "$extra" >>"$work/$name.toml"
    mkdir -p "$work/$name"
    taskset -c "$EDGE_CPU" "$BIN" serve --config "$work/$name.toml" --listen 127.0.0.1:0 --data-dir "$work/$name" \
        >"$work/$name.out" 2>"$work/$name.log" &
    local pid=$!
    echo "$pid" >>"$work/pids"
    for _ in $(seq 300); do
        if grep -q '^throng ready' "$work/$name.out"; then
            local line
            line=$(grep '^throng ready' "$work/$name.out")
            local addr=${line#throng ready quic=}
            addr=${addr%% *}
            # The ready line goes on after cert= (webtransport=, demo=, ...).
            local cert=${line#* cert=}
            cert=${cert%% *}
            echo "$addr $cert $pid"
            return
        fi
        sleep 0.1
    done
    echo "edge $name did not start: $(cat "$work/$name.log")" >&2
    exit 1
}

load() {
    taskset -c "$LOAD_CPU" "$BIN" load --quiet --json --viewers "$VIEWERS" --rooms "$ROOMS" --rate "$RATE" \
        --duration "$DURATION" "$@"
}

read -r s_addr s_cert s_pid < <(start_edge single "")
addrs=() certs=() epids=()
for i in $(seq "$EDGES"); do
    read -r a c p < <(start_edge "e$i" "
[cluster]
nats = [\"nats://127.0.0.1:$nats_port\"]
edge_id = \"e$i\"
heartbeat = \"250ms\"
dead_after = \"2s\"")
    addrs+=("$a") certs+=("$c") epids+=("$p")
done
sleep 1 # let the edges hear each other before the first join
join() { local IFS=,; echo "$*"; }

cat >"$work/summary.py" <<'PY'
import json, sys
r = json.load(sys.stdin)
s = r.get("server") or {}
d = r["delivery"]
print("%-8s us_cpu/frame %7.2f  cores %5.2f  frames/s %8.0f  msgs/viewer/s %6.1f  missed %d" % (
    sys.argv[1], s.get("us_cpu_per_frame") or 0, s.get("cores") or 0,
    d["frames_per_sec"], d["per_viewer_per_sec"]["median"], d["missed"]))
PY
summary() { python3 "$work/summary.py" "$1"; }

echo "viewers $VIEWERS, rooms $ROOMS, rate $RATE/s, window $DURATION, $EDGES clustered edges; $(nproc) cores"
for pair in $(seq "$PAIRS"); do
    load --server "$s_addr" --cert "$s_cert" --edge-pid "$s_pid" | tee "$work/single-$pair.json" | summary single
    load --server "$(join "${addrs[@]}")" --cert "$(join "${certs[@]}")" --edge-pid "$(join "${epids[@]}")" \
        | tee "$work/cluster-$pair.json" | summary cluster
done
