#!/usr/bin/env bash
# Warm vs cold rollback on the local provider (runc), with the example app.
#
# Warm: the previous release's instances are still running (within keep_previous), so
# `kiln rollback` is one route swap. Measured: wall time of the `kiln rollback` command, from
# its start until it returns — the daemon answers only after the new table is published, so
# every request that starts after that goes to the target release (checked with 20 requests
# after each rollback). Cold: keep_previous has expired, the target's instances are gone, and
# rollback rolls the target out again (no rebuild) — timed until the rollout completes.
#
# Needs root and runc. Usage: sudo bench/rollback.sh [ROUNDS] (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-10}
cargo build --release --locked -q -p kiln -p hello
KILN=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/kiln
WORK=$(mktemp -d)
STATE=$WORK/state
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
  "$KILN" --state "$STATE" down bench >/dev/null 2>&1 || true
  [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

spec() { # version keep_previous
  cat > "$WORK/kiln.toml" <<TOML
name = "bench"
[image]
entrypoint = ["/hello"]
[[image.copy]]
from = "$PWD/target/x86_64-unknown-linux-gnu/release/hello"
to = "/hello"
allow_outside = true
[service]
replicas = 2
env = { HELLO_VERSION = "$1" }
[service.health]
path = "/healthz"
interval = "100ms"
timeout = "100ms"
[deploy]
keep_previous = "$2"
[route]
listen = "127.0.0.1:$PORT"
TOML
}

"$KILN" --state "$STATE" serve >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 100); do [ -S "$STATE/kiln.sock" ] && break; sleep 0.05; done
spec v1 10m
IMAGE=$("$KILN" --state "$STATE" build -q -f "$WORK/kiln.toml")
"$KILN" --state "$STATE" apply -q -f "$WORK/kiln.toml" --image "$IMAGE"
spec v2 10m
"$KILN" --state "$STATE" apply -q -f "$WORK/kiln.toml" --image "$IMAGE"

now_ms() { date +%s%3N; }
check() { # expected version
  for _ in $(seq 20); do
    got=$(curl -s "http://127.0.0.1:$PORT/")
    [ "$got" = "hello from $1" ] || { echo "after the rollback a request got '$got', not v$1" >&2; exit 1; }
  done
}

warm=()
for i in $(seq "$ROUNDS"); do
  if [ $((i % 2)) = 1 ]; then to=1; v=v1; else to=2; v=v2; fi
  t0=$(now_ms)
  "$KILN" --state "$STATE" rollback bench --to "$to" -q
  t1=$(now_ms)
  check "$v"
  warm+=($((t1 - t0)))
done

# Cold: make the previous release expire, then roll back to it.
cold=()
for i in 1 2 3; do
  live=$("$KILN" --state "$STATE" status bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["live"])')
  spec "v$((i + 2))" 1s
  "$KILN" --state "$STATE" apply -q -f "$WORK/kiln.toml" --image "$IMAGE"
  sleep 1.5 # keep_previous (1s) passes: release $live's instances are retired
  t0=$(now_ms)
  "$KILN" --state "$STATE" rollback bench -q
  t1=$(now_ms)
  cold+=($((t1 - t0)))
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "warm rollback (route swap), ms per command: ${warm[*]}"
echo "cold rollback (new rollout of the old release), ms: ${cold[*]}"
wm=$(median "${warm[@]}"); cm=$(median "${cold[@]}")
echo "median: warm ${wm} ms, cold ${cm} ms (target: warm < 100 ms)"
