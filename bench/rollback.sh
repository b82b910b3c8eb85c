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
# Under load: the same warm rollback with wrk saturating the router, median of 10.
#
# Needs root and runc (and wrk for the loaded run). Usage: sudo bench/rollback.sh [ROUNDS]
# (default 10).
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

# Warm under load: wrk saturates the router (both cores busy) while 10 warm rollbacks are
# timed from the command's start to its return, with the daemon's own route swap beside it
# (`switch_us`): the rest is process start, the API round trip and the ledger's writes.
loaded=()
swaps=()
if command -v wrk >/dev/null; then
  wrk -t2 -c64 -d600s -H "Host: bench" "http://127.0.0.1:$PORT/" >"$WORK/wrk.log" 2>&1 &
  WRK=$!
  sleep 2
  "$KILN" --state "$STATE" rollback bench --to 1 -q || true # warm-up, not timed (1 may be live)
  for i in $(seq 10); do
    if [ $((i % 2)) = 1 ]; then to=2; else to=1; fi
    t0=$EPOCHREALTIME
    out=$("$KILN" --state "$STATE" rollback bench --to "$to" --json -q)
    t1=$EPOCHREALTIME
    loaded+=($(python3 -c "print(round(($t1 - $t0) * 1000))"))
    swaps+=($(printf '%s' "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["switch_us"] / 1000, 1))'))
  done
  kill "$WRK" 2>/dev/null || true
  wait "$WRK" 2>/dev/null || true
else
  echo "wrk not found: no rollback under load" >&2
fi

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
if [ ${#loaded[@]} -gt 0 ]; then
  echo "warm rollback under wrk load, ms per command: ${loaded[*]} (route swap in the daemon, ms: ${swaps[*]})"
  echo "median under load: $(median "${loaded[@]}") ms command, $(median "${swaps[@]}") ms swap (target: command <= 50 ms)"
fi
