#!/usr/bin/env bash
# Blue→green switch latency under load, for kiln's router, nginx and HAProxy (1 worker each).
#
# Two backends (nginx answering "blue" and "green"). While wrk -t2 -c64 loads the proxy, 20
# switches alternate green/blue, each through the proxy's own mechanism:
#   kiln:    a line on its control socket (an atomic route-table swap);
#   nginx:   rewrite the upstream block and `nginx -s reload`;
#   HAProxy: the runtime API on its admin socket (one server to ready, the other to maint).
# A switch is timed from the switch command to the first response from the new release, on a
# keep-alive probe connection opened before the switch that sends requests back to back while
# the command runs (and reconnects if the proxy closes it). That time includes the probe's own
# hops (its process being scheduled, the command's socket or fork, one request through a
# loaded proxy), the same for every proxy. Also shown: the slowest acknowledgement of the
# switch command itself (kiln's control socket answer, nginx -s reload's exit, HAProxy's
# answer). Failed requests are wrk's non-2xx/3xx plus socket errors over the whole run.
#
# kiln's router also reports the switch as it sees it, free of the probe's hops: the time the
# route-table swap took, and the time from the swap to the first response head it received
# from the new release for any client (wrk's load or the probe), stamped by the router itself
# (App::watch_first_response). Targets: kiln <= 1 ms per switch, 0 failures.
#
# Usage: bench/switch.sh
source "$(dirname "$0")/proxy-lib.sh"

SWITCHES="${SWITCHES:-20}"
BLUE=127.0.0.1:18090
GREEN=127.0.0.1:18091
need_peers
build_router
nginx_backends 18090 blue 18091 green
wait_port 18090; wait_port 18091

# run NAME PORT SWITCH_ARGS_FN: loads 127.0.0.1:PORT, performs the switches, prints a row.
run() {
  local name="$1" port="$2" switch_fn="$3" times=() color
  wait_port "$port"
  wrk -t2 -c64 -d120s "http://127.0.0.1:$port/" >"$WORK/wrk-$name.txt" 2>&1 &
  local wrk_pid=$!
  PIDS+=("$wrk_pid")
  sleep 1
  for i in $(seq 1 "$SWITCHES"); do
    if [ $((i % 2)) -eq 1 ]; then color=green; else color=blue; fi
    times+=("$("$switch_fn" "$port" "$color")")
    sleep 0.25
  done
  kill -INT "$wrk_pid"; wait "$wrk_pid" || true
  read -r rps _ _ failed < <(wrk_fields "$WORK/wrk-$name.txt")
  printf '%s\n' "${times[@]}" | sort -n | awk -v name="$name" -v failed="$failed" -v rps="$rps" '
    { t[NR] = $1; if ($2 > ack) ack = $2 }
    END { printf "%-8s first new response: median %7.3f ms  max %7.3f ms   (switch acknowledged within %7.3f ms)   failed requests %5d   load %s req/s\n",
            name, t[int((NR + 1) / 2)] / 1000, t[NR] / 1000, ack / 1000, failed, rps }'
  # kiln's own view: columns 3 and 4 (swap, swap to first new response), in microseconds.
  printf '%s\n' "${times[@]}" | awk 'NF >= 4 { print $3, $4 }' | sort -k2,2n | awk -v name="$name" '
    { if ($1 > swap) swap = $1; if ($2 ~ /^[0-9]+$/) r[++n] = $2; else missed++ }
    END { if (NR > 0 && n > 0)
            printf "%-8s as the router sees it: swap within %.3f ms; swap to first new response: median %.3f ms  max %.3f ms  (%d switches, %d with none within 1 s)\n",
              name, swap / 1000, r[int((n + 1) / 2)] / 1000, r[n] / 1000, NR, missed + 0 }'
}

kiln_switch() {
  "$ROUTER" probe --addr "127.0.0.1:$1" --expect "$2" --unix "$KILN_SOCK" --send "$2"
}

nginx_switch() {
  local upstream=$BLUE
  [ "$2" = green ] && upstream=$GREEN
  "$ROUTER" probe --addr "127.0.0.1:$1" --expect "$2" --exec \
    "echo 'upstream app { server $upstream; keepalive 64; }' > $NGINX_PROXY_DIR/upstream.conf && nginx -p $NGINX_PROXY_DIR -c $NGINX_PROXY_DIR/nginx.conf -s reload 2>/dev/null"
}

haproxy_switch() {
  local on=blue off=green
  [ "$2" = green ] && { on=green; off=blue; }
  "$ROUTER" probe --addr "127.0.0.1:$1" --expect "$2" --unix "$HAPROXY_SOCK" \
    --send "set server be/$on state ready; set server be/$off state maint"
}

kiln_proxy 18083 1 "$BLUE" "$GREEN"; pid=$LAST_PID
run kiln 18083 kiln_switch; stop_pid "$pid"

nginx_proxy 18081 1 "$BLUE"; pid=$LAST_PID
run nginx 18081 nginx_switch; stop_pid "$pid"

haproxy_proxy 18082 1 "$BLUE" "$GREEN"; pid=$LAST_PID
run haproxy 18082 haproxy_switch; stop_pid "$pid"
