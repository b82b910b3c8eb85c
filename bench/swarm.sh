#!/usr/bin/env bash
# A rolling update of the same 3-replica app on a 3-node Docker Swarm: kiln (the swarm
# provider, kiln's router in front) vs Swarm's own `docker service update`, under the same wrk
# load, in one run on the cluster of scripts/swarm-cluster.sh.
#
# The app on both sides is the example `hello`, built once by `kiln build`, and every node
# pulls it by digest from the daemon's registry (`kiln serve --registry-listen`, TLS with
# kiln's CA): kiln's instances and Swarm's service run the very same image reference
# `ADDR:PORT/kiln/web@sha256:…`. 3 replicas, health on `GET /healthz`, and each update changes
# only HELLO_VERSION (v1 → v2 → v1 …, alternating over the rounds).
#
#   kiln:  `kiln apply` of the spec with the other HELLO_VERSION (rolling, the default
#          strategy); timed from the command to its return, which is when the release is
#          completed (3 new instances healthy and routed, the old ones drained). wrk loads kiln's
#          router (`-H 'Host: web'`).
#   Swarm: `docker service update --env-add HELLO_VERSION=… SERVICE` without --detach; timed
#          from the command to its return, which is when the service's UpdateStatus.State is
#          "completed" (checked after each round). Swarm's update settings are its defaults
#          (parallelism 1, delay 0s, monitor 5s, failure action pause) but for the order, see
#          below. The image has no shell, so there is no container HEALTHCHECK: Swarm counts a
#          task as up once its container runs, and health is judged by the load balancer in
#          front, as below. SWARM_UPDATE_FLAGS adds flags to the measured updates (e.g.
#          SWARM_UPDATE_FLAGS='--update-monitor 0s' drops the 5 s failure watch that Swarm's
#          completion includes by default); the output's label shows them.
#
# What Swarm's side is reached through depends on this kernel:
#   - with the ingress routing mesh (IPVS in the kernel: /proc/net/ip_vs exists, or a probe
#     service's published ingress port answers), the service is published on the mesh
#     (`--publish published=P,target=8080`) with --update-order start-first, and wrk loads one
#     node's P: the issue's comparison, as is;
#   - without it (CONFIG_IP_VS unset: the mesh cannot work at all), the service is published in
#     host mode on a fixed port of every node (`--publish mode=host,published=P,target=8080`,
#     `--replicas-max-per-node 1`) behind HAProxy in the root namespace, which sends wrk's load
#     to the three node addresses with active health checks (`option httpchk GET /healthz`,
#     inter 200ms, fall 2, rise 2) and retries a failed connection or an empty response on
#     another server (`retries 3`, `option redispatch`, `retry-on conn-failure empty-response`):
#     how a team without the mesh fronts a Swarm service. Every node holds a task, and with
#     the port taken on every node, `--update-order start-first` has nowhere to start the new
#     task: the bench tries it once (at most START_FIRST_WAIT seconds, default 60), prints
#     what Swarm did (the update state and the new task's state and error), and measures the
#     rounds with --update-order stop-first, the order that completes there. The output's label
#     says which variant ran.
#
# A round: wrk -t2 -c16 starts, 1 s of load, the update, 1 s of load after it returns, wrk
# stops, and 10 requests must then get the new version's answer. Failed requests are wrk's
# socket errors (connect, read, write, timeout) plus non-2xx/3xx over that whole window.
# Printed: per-round times and failures, each side's median time and total failed requests,
# and the ratio kiln/Swarm of the medians (the issue's goal: kiln 0 failed and ≤ 1.0× Swarm's
# time); also, for Swarm, the manager's own update time
# (UpdateStatus.StartedAt to CompletedAt), which leaves out the CLI's polling.
#
# Needs root, wrk, haproxy, Docker Engine binaries (dockerd 20.10) and what
# scripts/swarm-cluster.sh needs. Brings up the kiln-sw* cluster and refuses to run if one is
# already up (somebody else's); on exit it removes what it made: the apps, the cluster, the
# daemon, HAProxy, wrk and its temp dir.
#
# Usage: sudo bench/swarm.sh [ROUNDS]   (default 5 updates per side)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
START_FIRST_WAIT=${START_FIRST_WAIT:-60}
CLUSTER=scripts/swarm-cluster.sh
SERVICE=kiln-bench-swarm
SWARM_PORT=18480

[ "$(id -u)" = 0 ] || { echo "bench/swarm.sh: needs root" >&2; exit 1; }
for tool in wrk haproxy docker dockerd curl python3; do
  command -v "$tool" >/dev/null || { echo "bench/swarm.sh: $tool is missing (bash scripts/ci-setup.sh)" >&2; exit 1; }
done
if bash "$CLUSTER" env >/dev/null 2>&1; then
  echo "bench/swarm.sh: a kiln-sw cluster is already up (somebody else's?); bring it down first" >&2
  exit 1
fi

cargo build --release --locked -q -p kiln -p hello
TARGET=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release
KILN=$TARGET/kiln
HELLO=$(realpath "$TARGET/hello")
WORK=$(mktemp -d /tmp/kiln-bench-swarm.XXXXXX)
STATE=$WORK/state
PIDS=()
CLUSTER_UP=

cleanup() {
  set +e
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null; done
  if [ -n "$CLUSTER_UP" ]; then
    docker -H "$KILN_SWARM_MANAGER" service rm "$SERVICE" "$SERVICE-probe" >/dev/null 2>&1
    [ -S "$STATE/kiln.sock" ] && "$KILN" --state "$STATE" down web >/dev/null 2>&1
  fi
  [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null
  wait 2>/dev/null
  [ -n "$CLUSTER_UP" ] && bash "$CLUSTER" down >/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }
sw() { docker -H "$KILN_SWARM_MANAGER" "$@"; }
say() { echo "$*" >&2; }

# wait_http URL [SECONDS] [HOST]: until URL answers 2xx.
wait_http() {
  local deadline=$(($(date +%s) + ${2:-60}))
  until curl -fsS -m 2 -H "Host: ${3:-web}" -o /dev/null "$1" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# failed FILE: wrk's socket errors plus non-2xx/3xx responses.
failed() {
  local non2xx sockerr
  non2xx=$(awk -F': *' '/Non-2xx or 3xx responses/ { print $2 }' "$1")
  sockerr=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$1")
  echo $((${non2xx:-0} + ${sockerr:-0}))
}
requests() { awk '/requests in/ { print $1 }' "$1"; }

# round NAME N URL HOST COMMAND...: one timed update under wrk; appends "ms failed" to
# $WORK/NAME.rounds and prints the round.
round() {
  local name=$1 n=$2 url=$3 host=$4
  shift 4
  local out=$WORK/wrk-$name-$n.txt t0 t1 rc=0
  wrk -t2 -c16 -d600s -H "Host: $host" "$url" >"$out" 2>&1 &
  local wrk_pid=$!
  PIDS+=("$wrk_pid")
  sleep 1
  t0=$(now_ms)
  "$@" >"$WORK/update-$name-$n.log" 2>&1 || rc=$?
  t1=$(now_ms)
  sleep 1
  kill -INT "$wrk_pid"
  wait "$wrk_pid" || true
  if [ "$rc" != 0 ]; then
    say "$name round $n: the update failed (exit $rc):"
    cat "$WORK/update-$name-$n.log" >&2
    exit 1
  fi
  echo "$((t1 - t0)) $(failed "$out")" >>"$WORK/$name.rounds"
  printf '  %-6s round %d: %7.1f s   %6d requests   %4d failed\n' \
    "$name" "$n" "$(echo "$((t1 - t0))" | awk '{ print $1 / 1000 }')" "$(requests "$out")" "$(failed "$out")"
}

# serving URL VERSION: checks that 10 requests in a row get the new release's answer.
serving() {
  local got
  for _ in $(seq 10); do
    got=$(curl -sS -m 5 -H "Host: web" "$1")
    [ "$got" = "hello from $2" ] || { say "after the update $1 answered '$got', not $2"; exit 1; }
  done
}

# summary NAME: "median_ms total_failed".
summary() {
  sort -n "$WORK/$1.rounds" | awk '{ t[NR] = $1; f += $2 } END { print t[int((NR + 1) / 2)], f }'
}

# --- the cluster, kiln's daemon and its registry -----------------------------------------
say "bringing up the 3-node swarm ($CLUSTER)"
CLUSTER_UP=1
eval "$(bash "$CLUSTER" up)"
REGISTRY=$KILN_SWARM_HOST_ADDR:$(free_port)
"$KILN" --state "$STATE" serve --registry-listen "$REGISTRY" >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 200); do [ -S "$STATE/kiln.sock" ] && break; sleep 0.05; done
[ -S "$STATE/kiln.sock" ] || { cat "$WORK/daemon.log" >&2; exit 1; }
for _ in $(seq 200); do [ -f "$STATE/registry/ca.crt" ] && break; sleep 0.05; done
bash "$CLUSTER" trust-registry "$REGISTRY" "$STATE/registry/ca.crt" >/dev/null

KILN_PORT=$(free_port)
spec() { # HELLO_VERSION
  cat >"$WORK/kiln.toml" <<TOML
name = "web"

[image]
entrypoint = ["/hello"]

[[image.copy]]
from = "$HELLO"
to = "/hello"
allow_outside = true

[service]
replicas = 3
writable = ["/tmp"]
env = { HELLO_VERSION = "$1" }

[service.health]
path = "/healthz"
interval = "100ms"
timeout = "100ms"

[target]
provider = "swarm"
docker_host = "$KILN_SWARM_MANAGER"

[route]
listen = "127.0.0.1:$KILN_PORT"
TOML
}
spec v1
IMAGE=$("$KILN" --state "$STATE" build -q -f "$WORK/kiln.toml")
REF=$REGISTRY/kiln/web@$IMAGE
say "image $REF"

# --- kiln -----------------------------------------------------------------------------------
say "kiln: release 1 (v1) on the swarm"
"$KILN" --state "$STATE" apply -q -f "$WORK/kiln.toml" --image "$IMAGE"
wait_http "http://127.0.0.1:$KILN_PORT/" 60 web
kiln_update() {
  spec "$1"
  "$KILN" --state "$STATE" apply -q -f "$WORK/kiln.toml" --image "$IMAGE"
}
echo "kiln: rolling update by \`kiln apply\`, kiln's router in front, wrk -t2 -c16 -H 'Host: web'"
for n in $(seq "$ROUNDS"); do
  if [ $((n % 2)) = 1 ]; then v=v2; else v=v1; fi
  round kiln "$n" "http://127.0.0.1:$KILN_PORT/" web kiln_update "$v"
  serving "http://127.0.0.1:$KILN_PORT/" "$v"
done
"$KILN" --state "$STATE" down web >/dev/null

# --- Swarm ----------------------------------------------------------------------------------
read -r -a NODE_ADDRS <<<"$KILN_SWARM_NODE_ADDRS"
MESH=no
if [ -e /proc/net/ip_vs ]; then
  MESH=yes
else
  # No IPVS to see from here: a probe service on the mesh settles it.
  sw service create -q --detach --name "$SERVICE-probe" --replicas 1 \
    --publish "published=$SWARM_PORT,target=8080" --env PORT=8080 "$REF" >/dev/null
  if wait_http "http://${NODE_ADDRS[0]}:$SWARM_PORT/healthz" 30 web; then MESH=yes; fi
  sw service rm "$SERVICE-probe" >/dev/null
  # Let the probe's task and its ingress port go before the port is used again.
  for _ in $(seq 100); do
    [ -z "$(sw service ps -q "$SERVICE-probe" 2>/dev/null)" ] && break
    sleep 0.2
  done
fi

if [ "$MESH" = yes ]; then
  LABEL="swarm (routing mesh, start-first)"
  ORDER=start-first
  sw service create -q --name "$SERVICE" --replicas 3 \
    --publish "published=$SWARM_PORT,target=8080" \
    --env PORT=8080 --env HELLO_VERSION=v1 "$REF" >/dev/null
  SWARM_URL=http://${NODE_ADDRS[0]}:$SWARM_PORT/
  wait_http "$SWARM_URL" 60 web
else
  say "swarm: no ingress routing mesh on this kernel (no IPVS); HAProxy in front of host-mode ports"
  sw service create -q --name "$SERVICE" --replicas 3 --replicas-max-per-node 1 \
    --publish "mode=host,published=$SWARM_PORT,target=8080" \
    --env PORT=8080 --env HELLO_VERSION=v1 "$REF" >/dev/null
  HAPROXY_PORT=$(free_port)
  {
    cat <<CFG
global
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  retries 3
  option redispatch
  retry-on conn-failure empty-response
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend be
backend be
  balance roundrobin
  option httpchk GET /healthz
  default-server inter 200ms fall 2 rise 2
CFG
    i=0
    for a in "${NODE_ADDRS[@]}"; do
      i=$((i + 1))
      echo "  server node$i $a:$SWARM_PORT check"
    done
  } >"$WORK/haproxy.cfg"
  haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
  PIDS+=("$!")
  SWARM_URL=http://127.0.0.1:$HAPROXY_PORT/
  for a in "${NODE_ADDRS[@]}"; do wait_http "http://$a:$SWARM_PORT/healthz" 60 web; done
  wait_http "$SWARM_URL" 30 web

  # start-first, once: where can the new task go?
  say "swarm: trying --update-order start-first (at most ${START_FIRST_WAIT}s)"
  t0=$(now_ms)
  if timeout "$START_FIRST_WAIT" docker -H "$KILN_SWARM_MANAGER" service update -q \
    --update-order start-first --env-add HELLO_VERSION=v2 "$SERVICE" >"$WORK/start-first.log" 2>&1; then
    START_FIRST="completed in $(($(now_ms) - t0)) ms"
  else
    state=$(sw service inspect -f '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' "$SERVICE")
    task=$(sw service ps --no-trunc -f desired-state=running \
      --format '{{.CurrentState}}: {{.Error}}' "$SERVICE" | grep -i pending | head -1 || true)
    START_FIRST="not completed after ${START_FIRST_WAIT}s: update state '$state', new task ${task:-(none pending)}"
  fi
  say "swarm: start-first with host-mode ports: $START_FIRST"
  # Back to 3 running v1 tasks (stop-first takes the pending update over).
  sw service update -q --update-order stop-first --env-add HELLO_VERSION=v1 "$SERVICE" >/dev/null
  ORDER=stop-first
  LABEL="swarm (no routing mesh here: HAProxy + host-mode ports, stop-first)"
fi

read -r -a EXTRA <<<"${SWARM_UPDATE_FLAGS:-}"
[ ${#EXTRA[@]} = 0 ] || LABEL="${LABEL%)}, ${EXTRA[*]})"
swarm_update() {
  docker -H "$KILN_SWARM_MANAGER" service update -q --update-order "$ORDER" "${EXTRA[@]}" \
    --env-add "HELLO_VERSION=$1" "$SERVICE" || return
  local state
  state=$(docker -H "$KILN_SWARM_MANAGER" service inspect \
    -f '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' "$SERVICE")
  [ "$state" = completed ] || { echo "update state: $state" >&2; return 1; }
  # The manager's own account of the update, free of the CLI's polling.
  docker -H "$KILN_SWARM_MANAGER" service inspect -f '{{json .UpdateStatus}}' "$SERVICE" |
    python3 -c 'import json, sys
from datetime import datetime
def t(s):  # RFC 3339 with nanoseconds: keep microseconds for fromisoformat
    s = s.replace("Z", "+00:00"); head, _, tz = s.rpartition("+")
    if "." in head: a, b = head.split("."); head = a + "." + b[:6].ljust(6, "0")
    return datetime.fromisoformat(head + "+" + tz)
u = json.load(sys.stdin)
print(round((t(u["CompletedAt"]) - t(u["StartedAt"])).total_seconds() * 1000))' >>"$WORK/swarm.manager"
}
echo "$LABEL: \`docker service update --update-order $ORDER${EXTRA[*]:+ ${EXTRA[*]}}\`, wrk -t2 -c16"
for n in $(seq "$ROUNDS"); do
  if [ $((n % 2)) = 1 ]; then v=v2; else v=v1; fi
  round swarm "$n" "$SWARM_URL" web swarm_update "$v"
  serving "$SWARM_URL" "$v"
done

# --- summary --------------------------------------------------------------------------------
read -r kiln_ms kiln_failed < <(summary kiln)
read -r swarm_ms swarm_failed < <(summary swarm)
echo
[ "$MESH" = yes ] || {
  echo "note: Swarm's ingress routing mesh does not work on this kernel (no IPVS), so Swarm was"
  echo "      measured behind HAProxy with health checks; start-first with host-mode ports: $START_FIRST"
}
printf '%-70s median %6.1f s   failed requests %5d  (%d updates)\n' \
  "kiln (rolling, kiln's router)" "$(awk -v m="$kiln_ms" 'BEGIN { print m / 1000 }')" "$kiln_failed" "$ROUNDS"
printf '%-70s median %6.1f s   failed requests %5d  (%d updates)\n' \
  "$LABEL" "$(awk -v m="$swarm_ms" 'BEGIN { print m / 1000 }')" "$swarm_failed" "$ROUNDS"
sort -n "$WORK/swarm.manager" | awk '{ t[NR] = $1 } END {
  printf "  (Swarm'"'"'s own UpdateStatus, StartedAt to CompletedAt: median %.1f s)\n", t[int((NR + 1) / 2)] / 1000 }'
awk -v k="$kiln_ms" -v s="$swarm_ms" -v kf="$kiln_failed" 'BEGIN {
  r = k / s
  printf "kiln / swarm time: %.2fx   goal (kiln 0 failed, <= 1.0x): %s\n", r,
    (kf == 0 && r <= 1.0) ? "met" : "NOT met"
}'
