#!/usr/bin/env bash
# Throughput and latency of kiln's router against its peers, on this machine.
#
# The same backend (nginx answering a small static response, one worker) and the same load
# (wrk -t2 -c64 -d10s) for: the backend directly, nginx as a reverse proxy with keep-alive
# upstream connections, HAProxy, and kiln's router; each proxy at 1 worker thread and at 2.
# Prints req/s, p50 and p99, and kiln's ratios to nginx. Targets: kiln >= 1.0x nginx req/s,
# kiln p99 <= nginx p99.
#
# kiln runs as the daemon runs it by default: one thread per core is pinned (here: at 2
# threads), fewer threads are not pinned and yield their core once per ms of running (see
# ARCHITECTURE.md, "Threads and scheduling"). nginx and HAProxy run with their defaults
# (unpinned); an extra row shows nginx with its workers pinned (worker_cpu_affinity auto), so
# that what pinning alone buys is visible, with kiln's ratios to it.
#
# Also printed: each proxy's CPU time per request (user + system, all its threads or worker
# processes, from /proc over the run). On this 2-core machine the load generator, the backend
# and the proxy share the cores (and other work may too), so req/s says how the cores were
# shared as much as how fast the proxy is; CPU per request is the proxy's own cost.
#
# Through the bridge (as root, with the CNI plugins in /usr/lib/cni; BRIDGE=0 leaves it out):
# kiln's router forwarding to the same nginx backend inside a network namespace joined to
# kiln's bridge kiln0 as kiln joins an instance (the CNI loopback plugin, then bridge +
# host-local + firewall, kiln's own network list), against the backend on 127.0.0.1, in the
# same run: BRIDGE_ROUNDS (3) alternating rounds of each at 1 and at 2 router threads, the
# median req/s of each and the ratio. Target: bridge >= 0.90x loopback. The backends directly
# (wrk -> backend, no router) are printed once each, so the kernel's own share of the cost
# shows. PEERS=0 runs only this part.
#
# Usage: bench/proxy.sh            (DURATION=10s by default; set DURATION=3s for a quick look)
source "$(dirname "$0")/proxy-lib.sh"

DURATION="${DURATION:-10s}"
BACKEND=18080
BRIDGE_BACKEND=18090
PEERS="${PEERS:-1}"
BRIDGE="${BRIDGE:-1}"
BRIDGE_ROUNDS="${BRIDGE_ROUNDS:-3}"
need_peers
build_router
nginx_backends "$BACKEND" "hello"
wait_port "$BACKEND"

# cpu_ticks PID...: user + system clock ticks of these processes (all their threads).
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# measure NAME PORT [PID...]: runs wrk against 127.0.0.1:PORT (or HOST:PORT) and prints one
# table row, with the CPU time the PIDs used per request.
measure() {
  local name="$1" port="$2" out="$WORK/wrk-${1// /_}.txt" before after requests cpu=- addr
  shift 2
  addr="$port"; [[ "$addr" == *:* ]] || addr="127.0.0.1:$port"
  before=$(cpu_ticks "$@")
  wrk -t2 -c64 -d"$DURATION" --latency "http://$addr/" >"$out"
  after=$(cpu_ticks "$@")
  read -r rps p50 p99 failed < <(wrk_fields "$out")
  requests=$(awk '/requests in/ { print $1 }' "$out")
  if [ $# -gt 0 ] && [ "${requests:-0}" -gt 0 ]; then
    cpu=$(awk -v t="$((after - before))" -v n="$requests" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
  fi
  printf '%-22s %12s %10s %10s %8s %12s\n' "$name" "$rps" "$p50" "$p99" "$failed" "$cpu"
  RESULT_RPS="$rps"; RESULT_P99="$p99"; RESULT_CPU="$cpu"
}

peers() {
  printf '%-22s %12s %10s %10s %8s %12s\n' "target" "req/s" "p50 ms" "p99 ms" "failed" "cpu us/req"
  measure direct "$BACKEND"
  for threads in 1 2; do
    nginx_proxy 18081 "$threads" "127.0.0.1:$BACKEND"; pid_nginx=$LAST_PID
    haproxy_proxy 18082 "$threads" "127.0.0.1:$BACKEND"; pid_haproxy=$LAST_PID
    kiln_proxy 18083 "$threads" "127.0.0.1:$BACKEND"; pid_kiln=$LAST_PID
    wait_port 18081; wait_port 18082; wait_port 18083
    # Each proxy runs alone while it is measured; the idle ones cost nothing.
    # nginx's workers are the master's children; HAProxy and kiln are one process each.
    measure "nginx ($threads worker)" 18081 $(pgrep -P "$pid_nginx")
    nginx_rps=$RESULT_RPS; nginx_p99=$RESULT_P99; nginx_cpu=$RESULT_CPU
    measure "haproxy ($threads thread)" 18082 "$pid_haproxy"
    measure "kiln ($threads thread)" 18083 "$pid_kiln"
    kiln_rps=$RESULT_RPS; kiln_p99=$RESULT_P99; kiln_cpu=$RESULT_CPU
    awk -v kr="$kiln_rps" -v nr="$nginx_rps" -v kp="$kiln_p99" -v np="$nginx_p99" -v t="$threads" \
      -v kc="$kiln_cpu" -v nc="$nginx_cpu" \
      'BEGIN { printf "kiln/nginx at %d: req/s %.2fx (target >= 1.00x), p99 %.2fx (target <= 1.00x), CPU per request %.2fx\n", t, kr / nr, kp / np, kc / nc }'
    stop_pid "$pid_nginx"; stop_pid "$pid_haproxy"
    nginx_proxy 18084 "$threads" "127.0.0.1:$BACKEND" pin; pid_pinned=$LAST_PID
    wait_port 18084
    measure "nginx ($threads, pinned)" 18084 $(pgrep -P "$pid_pinned")
    awk -v kr="$kiln_rps" -v nr="$RESULT_RPS" -v kp="$kiln_p99" -v np="$RESULT_P99" -v t="$threads" \
      'BEGIN { printf "kiln/pinned nginx at %d: req/s %.2fx, p99 %.2fx\n", t, kr / nr, kp / np }'
    stop_pid "$pid_pinned"; stop_pid "$pid_kiln"
  done
}

# median VALUE...: the median (the upper one of an even count).
median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int(NR / 2) + 1] }'
}

bridge() {
  bridge_netns_up
  # The same nginx as the loopback backend (one worker), inside the namespace.
  local dir="$WORK/bridge-backend"
  mkdir -p "$dir/logs"
  sed -e "s|$WORK/backend|$dir|g" -e "s|listen 127.0.0.1:$BACKEND|listen $BRIDGE_IP:$BRIDGE_BACKEND|" \
    "$WORK/backend/nginx.conf" >"$dir/nginx.conf"
  start bridge-backend ip netns exec "$BRIDGE_NETNS" nginx -p "$dir" -c "$dir/nginx.conf"
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null "http://$BRIDGE_IP:$BRIDGE_BACKEND/" && break
    sleep 0.05
  done
  echo
  echo "kiln's router to a backend on kiln's bridge ($BRIDGE_IP, netns $BRIDGE_NETNS) vs on 127.0.0.1, $BRIDGE_ROUNDS rounds"
  printf '%-22s %12s %10s %10s %8s %12s\n' "target" "req/s" "p50 ms" "p99 ms" "failed" "cpu us/req"
  measure "direct, loopback" "$BACKEND"
  measure "direct, bridge" "$BRIDGE_IP:$BRIDGE_BACKEND"
  local threads round lo br pid_lo pid_br
  for threads in 1 2; do
    kiln_proxy 18085 "$threads" "127.0.0.1:$BACKEND"; pid_lo=$LAST_PID
    kiln_proxy 18086 "$threads" "$BRIDGE_IP:$BRIDGE_BACKEND"; pid_br=$LAST_PID
    wait_port 18085; wait_port 18086
    lo=(); br=(); paired=(); lo_cpu=(); br_cpu=()
    for round in $(seq 1 "$BRIDGE_ROUNDS"); do
      measure "kiln $threads, loopback" 18085 "$pid_lo"; lo+=("$RESULT_RPS"); lo_cpu+=("$RESULT_CPU")
      measure "kiln $threads, bridge" 18086 "$pid_br"; br+=("$RESULT_RPS"); br_cpu+=("$RESULT_CPU")
      paired+=("$(awk -v b="$RESULT_RPS" -v l="${lo[-1]}" 'BEGIN { printf "%.4f", b / l }')")
    done
    # The ratio of each round's pair (measured back to back, so a load that drifts over the
    # run weighs on both) is the steadier figure on a shared machine; CPU per request too.
    awk -v l="$(median "${lo[@]}")" -v b="$(median "${br[@]}")" -v t="$threads" -v n="$BRIDGE_ROUNDS" \
      -v p="$(median "${paired[@]}")" -v lc="$(median "${lo_cpu[@]}")" -v bc="$(median "${br_cpu[@]}")" \
      'BEGIN { printf "kiln at %d, medians of %d: loopback %.0f req/s, bridge %.0f req/s: bridge/loopback %.2fx, per round %.2fx (target >= 0.90x); CPU per request %.2f vs %.2f us (%.2fx)\n", t, n, l, b, b / l, p, lc, bc, bc / lc }'
    stop_pid "$pid_lo"; stop_pid "$pid_br"
  done
}

[ "$PEERS" = 1 ] && peers
if [ "$BRIDGE" = 1 ]; then
  if [ "$(id -u)" = 0 ] && [ -x "$CNI_BIN/bridge" ]; then
    bridge
  else
    echo "the bridge comparison needs root and the CNI plugins in $CNI_BIN (skipped)" >&2
  fi
fi
