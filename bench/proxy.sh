#!/usr/bin/env bash
# Throughput and latency of kiln's router against its peers, on this machine.
#
# The same backend (nginx answering a small static response, one worker) and the same load
# (wrk -t2 -c64 -d10s) for: the backend directly, nginx as a reverse proxy with keep-alive
# upstream connections, HAProxy, and kiln's router; each proxy at 1 worker thread and at 2.
# Prints req/s, p50 and p99, and kiln's ratios to nginx. Targets: kiln >= 1.0x nginx req/s,
# kiln p99 <= nginx p99.
#
# Usage: bench/proxy.sh            (DURATION=10s by default; set DURATION=3s for a quick look)
source "$(dirname "$0")/proxy-lib.sh"

DURATION="${DURATION:-10s}"
BACKEND=18080
need_peers
build_router
nginx_backends "$BACKEND" "hello"
wait_port "$BACKEND"

# measure NAME PORT: runs wrk against 127.0.0.1:PORT and prints one table row.
measure() {
  local name="$1" port="$2" out="$WORK/wrk-$1.txt"
  wrk -t2 -c64 -d"$DURATION" --latency "http://127.0.0.1:$port/" >"$out"
  read -r rps p50 p99 failed < <(wrk_fields "$out")
  printf '%-22s %12s %10s %10s %8s\n' "$name" "$rps" "$p50" "$p99" "$failed"
  RESULT_RPS="$rps"; RESULT_P99="$p99"
}

printf '%-22s %12s %10s %10s %8s\n' "target" "req/s" "p50 ms" "p99 ms" "failed"
measure direct "$BACKEND"
for threads in 1 2; do
  nginx_proxy 18081 "$threads" "127.0.0.1:$BACKEND"; pid_nginx=$LAST_PID
  haproxy_proxy 18082 "$threads" "127.0.0.1:$BACKEND"; pid_haproxy=$LAST_PID
  kiln_proxy 18083 "$threads" "127.0.0.1:$BACKEND"; pid_kiln=$LAST_PID
  wait_port 18081; wait_port 18082; wait_port 18083
  # Each proxy runs alone while it is measured; the idle ones cost nothing.
  measure "nginx ($threads worker)" 18081; nginx_rps=$RESULT_RPS; nginx_p99=$RESULT_P99
  measure "haproxy ($threads thread)" 18082
  measure "kiln ($threads thread)" 18083; kiln_rps=$RESULT_RPS; kiln_p99=$RESULT_P99
  awk -v kr="$kiln_rps" -v nr="$nginx_rps" -v kp="$kiln_p99" -v np="$nginx_p99" -v t="$threads" \
    'BEGIN { printf "kiln/nginx at %d: req/s %.2fx (target >= 1.00x), p99 %.2fx (target <= 1.00x)\n", t, kr / nr, kp / np }'
  stop_pid "$pid_nginx"; stop_pid "$pid_haproxy"; stop_pid "$pid_kiln"
done
