# Shared by bench/proxy.sh and bench/switch.sh: installing the peers, building kiln's router,
# writing configs, starting and stopping processes, and reading wrk's output.
# Everything listens on 127.0.0.1 only (but for a backend in a network namespace on kiln's
# bridge, bridge_netns_up); every process started here is stopped on exit, and the namespace
# is torn down with CNI DEL.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d /tmp/kiln-bench.XXXXXX)"
PIDS=()

cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  bridge_netns_down
  rm -rf "$WORK"
}
trap cleanup EXIT

need_peers() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v haproxy >/dev/null || missing+=(haproxy)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The packages start their own services; this benchmark runs its own instances instead.
  systemctl stop nginx haproxy 2>/dev/null || true
}

build_router() {
  # KILN_ROUTER names an already built router binary (skips the build).
  if [ -n "${KILN_ROUTER:-}" ]; then ROUTER="$KILN_ROUTER"; return; fi
  (cd "$ROOT" && cargo build --release -q -p kiln-proxy --bin kiln-router)
  local target="${CARGO_TARGET_DIR:-$ROOT/target}"
  ROUTER="$target/x86_64-unknown-linux-gnu/release/kiln-router"
  [ -x "$ROUTER" ] || { echo "kiln-router not found at $ROUTER" >&2; exit 1; }
}

# start NAME COMMAND...: runs COMMAND in the background, remembering its pid.
start() {
  local name="$1"; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  LAST_PID=$!
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# wait_port PORT: waits (at most 10 s) until something accepts on 127.0.0.1:PORT.
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  exit 1
}

# nginx_backend PORT BODY...: an nginx that answers every request with BODY; one worker.
nginx_backends() {
  local dir="$WORK/backend"
  mkdir -p "$dir/logs"
  {
    echo "worker_processes 1; daemon off; pid $dir/nginx.pid; error_log $dir/error.log;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; keepalive_requests 1000000;"
    while [ $# -gt 0 ]; do
      echo "  server { listen 127.0.0.1:$1 reuseport; location / { return 200 \"$2\n\"; } }"
      shift 2
    done
    echo "}"
  } >"$dir/nginx.conf"
  start nginx-backend nginx -p "$dir" -c "$dir/nginx.conf"
}

# nginx_proxy PORT WORKERS UPSTREAM [pin]: nginx as a reverse proxy with keep-alive upstream
# connections; the upstream block lives in its own file so a switch can rewrite it. With
# "pin", each worker is pinned to a core (worker_cpu_affinity auto).
nginx_proxy() {
  local port="$1" workers="$2" upstream="$3" pin="${4:-}" dir="$WORK/nginx-proxy${4:-}"
  local affinity=""
  [ "$pin" = pin ] && affinity="worker_cpu_affinity auto;"
  mkdir -p "$dir/logs"
  echo "upstream app { server $upstream; keepalive 64; }" >"$dir/upstream.conf"
  cat >"$dir/nginx.conf" <<CONF
worker_processes $workers; $affinity daemon off; pid $dir/nginx.pid; error_log $dir/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  include $dir/upstream.conf;
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
    }
  }
}
CONF
  NGINX_PROXY_DIR="$dir"
  start nginx-proxy nginx -p "$dir" -c "$dir/nginx.conf"
}

# haproxy_proxy PORT THREADS BLUE [GREEN]: HAProxy with keep-alive upstream connections and
# an admin socket; GREEN, if given, starts in maintenance.
haproxy_proxy() {
  local port="$1" threads="$2" blue="$3" green="${4:-}" dir="$WORK/haproxy"
  mkdir -p "$dir"
  cat >"$dir/haproxy.cfg" <<CONF
global
  nbthread $threads
  maxconn 8000
  stats socket $dir/admin.sock mode 600 level admin
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:$port
  default_backend be
backend be
  http-reuse always
  server blue $blue
CONF
  [ -n "$green" ] && echo "  server green $green disabled" >>"$dir/haproxy.cfg"
  HAPROXY_SOCK="$dir/admin.sock"
  start haproxy haproxy -f "$dir/haproxy.cfg" -db
}

# kiln_proxy PORT THREADS BLUE [GREEN]: kiln's router with a control socket.
kiln_proxy() {
  local port="$1" threads="$2" blue="$3" green="${4:-}"
  KILN_SOCK="$WORK/kiln-$port.sock"
  local args=(proxy --listen "127.0.0.1:$port" --threads "$threads" --blue "$blue" --control "$KILN_SOCK")
  [ -n "$green" ] && args+=(--green "$green")
  start kiln "$ROUTER" "${args[@]}"
}

# to_ms VALUE: wrk's "1.23ms" / "456.00us" / "1.20s" in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else printf "%s", v }'
}

# wrk_fields FILE: prints "req/s p50_ms p99_ms failures" from a wrk --latency output.
wrk_fields() {
  local f="$1" rps p50 p99 non2xx sockerr
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$f")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$f")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$f")")
  non2xx=$(awk -F': *' '/Non-2xx or 3xx responses/ { print $2 }' "$f")
  sockerr=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$f")
  echo "${rps:-0} ${p50:-0} ${p99:-0} $(( ${non2xx:-0} + ${sockerr:-0} ))"
}

# The network list kiln gives an instance by default (crates/runtime/src/local/network.rs):
# bridge kiln0 with host-local IPAM (kiln's masquerade and forward rules are per subnet, not
# per instance). One plugin's configuration per line, as kiln runs them (the list's name and
# version in each).
CNI_BIN=/usr/lib/cni
kiln_cni_plugins() {
  echo '{"cniVersion":"1.0.0","name":"kiln","type":"bridge","bridge":"kiln0","isGateway":true,"ipMasq":false,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.209.0.0/16"}]],"routes":[{"dst":"0.0.0.0/0"}]}}'
}

# cni_exec COMMAND IFNAME CONF [PREV_RESULT]: runs one CNI plugin on the namespace
# $BRIDGE_NETNS, as kiln does; prints its result.
cni_exec() {
  local conf="$3"
  [ -n "${4:-}" ] && conf="${conf%\}},\"prevResult\":$4}"
  local plugin
  plugin=$(jq -r .type <<<"$conf")
  CNI_COMMAND="$1" CNI_CONTAINERID="$BRIDGE_NETNS" CNI_NETNS="/run/netns/$BRIDGE_NETNS" \
    CNI_IFNAME="$2" CNI_PATH="$CNI_BIN" "$CNI_BIN/$plugin" <<<"$conf"
}

# bridge_netns_up: a network namespace joined to kiln's bridge as kiln joins an instance
# (lo up, then kiln's network list); sets BRIDGE_NETNS and BRIDGE_IP.
bridge_netns_up() {
  BRIDGE_NETNS="kiln-bench-$$"
  ip netns add "$BRIDGE_NETNS"
  cni_exec ADD lo '{"cniVersion":"1.0.0","name":"lo","type":"loopback"}' >/dev/null
  local conf result=""
  while read -r conf; do
    result=$(cni_exec ADD eth0 "$conf" "$result")
  done < <(kiln_cni_plugins)
  BRIDGE_RESULT="$result"
  BRIDGE_IP=$(jq -r '.ips[0].address' <<<"$result" | cut -d/ -f1)
}

# bridge_netns_down: CNI DEL in reverse (the address, the plugins' iptables rules), then the
# namespace. Nothing to do without one.
bridge_netns_down() {
  [ -n "${BRIDGE_NETNS:-}" ] || return 0
  local conf
  while read -r conf; do
    cni_exec DEL eth0 "$conf" "${BRIDGE_RESULT:-}" >/dev/null || true
  done < <(kiln_cni_plugins | tac)
  cni_exec DEL lo '{"cniVersion":"1.0.0","name":"lo","type":"loopback"}' >/dev/null || true
  ip netns del "$BRIDGE_NETNS" 2>/dev/null || true
  BRIDGE_NETNS=""
}
