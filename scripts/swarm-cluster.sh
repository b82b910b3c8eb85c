#!/usr/bin/env bash
# A 3-node Docker Swarm on one machine, for kiln's swarm tests, benchmarks and the README.
#
#   bash scripts/swarm-cluster.sh up | down | status | env
#   bash scripts/swarm-cluster.sh kill-node N [--all] | start-node N
#   bash scripts/swarm-cluster.sh trust-registry ADDR:PORT CA_FILE
#   bash scripts/swarm-cluster.sh trust-registry ADDR:PORT --insecure
#
# Needs root, iproute2, iptables, docker.io (dockerd 20.10 and its containerd) and util-linux.
#
# Layout. Node N (1..3) is the network namespace kiln-swN with a veth named eth0 at
# 10.89.0.1N/24; the other ends are on the bridge kiln-sw0 in the root namespace, which holds
# 10.89.0.1 (kiln's daemon, router, health checks, wrk and registry live there, and each node
# routes to it by default). Each node runs its own dockerd (and the containerd that dockerd
# starts and manages) in that network namespace, in a mount namespace of its own (with the
# node's own /sys, as `ip netns exec` gives, but keeping the cgroup mounts) and in a UTS
# namespace named kiln-swN (so `docker node ls` tells the nodes apart):
#   config     /run/kiln-swarm/nN/daemon.json (written by this script; --config-file)
#   socket     unix:///run/kiln-swarm/nN/docker.sock
#   pidfile    /run/kiln-swarm/nN/docker.pid
#   log        /run/kiln-swarm/nN/dockerd.log
#   exec-root  /run/kiln-swarm/nN/exec (containerd's socket and state, netns files)
#   data-root  /var/lib/kiln-swarm/nN (images, containers, swarm state)
#   cgroups    /kiln-swarm-nN (cgroup-parent of every container of the node)
# Every container runs with no-new-privileges: it is set in each node's daemon config
# because the Swarm service API of Engine 20.10 cannot ask for it per service. Node 1 is the
# only manager; 2 and 3 join as workers.
#
# Registry trust. Engine 20.10 reads /etc/docker/certs.d/<host:port>/*.crt on every pull, in
# every dockerd on the machine (the path is fixed, not under --data-root), so installing a CA
# there is enough for all three nodes; `trust-registry ADDR:PORT CA_FILE` does it and `down`
# removes what it installed. TLS is preferred because of what "insecure" means to the engine:
# for a registry in `insecure-registries` it tries HTTPS *without verifying the certificate at
# all* (certs.d is not even read) and then falls back to plain HTTP. Marking kiln's address
# insecure would therefore switch off the CA check for every pull from it. Plain HTTP stays
# available as an explicit choice: `trust-registry ADDR:PORT --insecure` adds ADDR:PORT to every
# node's insecure-registries and reloads the daemons (SIGHUP; the setting is reloadable).
# Loopback does not help here: each node has its own loopback.
#
# Faults. `kill-node N` sends SIGKILL to node N's dockerd (its containerd dies with it, by the
# parent-death signal dockerd gives it): the manager marks the node Down after a few missed
# heartbeats and reschedules its tasks, while the node's containers (and their shims) keep
# running and answering, as on a real host whose engine crashed, until the engine comes back
# and stops them. `kill-node N --all` kills every process of the node (engine, containerd,
# shims, containers), as a machine that loses power. `start-node N` starts that dockerd again
# on its kept state: it rejoins the swarm by itself.
#
# What this script changes outside its own directories: the bridge, veths and namespaces named
# kiln-sw*, one iptables rule in the root namespace's FORWARD chain (the host's Docker sets its
# policy to DROP, and with br_netfilter the traffic between nodes over kiln-sw0 passes that
# chain), and /etc/docker/certs.d/<addr> for trust-registry. `down` removes all of it.
#
# Known limit: Swarm's ingress routing mesh needs IPVS in the kernel (CONFIG_IP_VS). Where the
# kernel has none, `status` says so and published ingress ports do not answer; host-mode
# published ports (what kiln uses) do not need it.
set -euo pipefail

readonly NODES=(1 2 3)
readonly SUBNET_PREFIX=10.89.0
readonly HOST_ADDR=10.89.0.1
readonly BRIDGE=kiln-sw0
readonly RUN_ROOT=/run/kiln-swarm
readonly DATA_ROOT=/var/lib/kiln-swarm
readonly CERTS_DIR=/etc/docker/certs.d
# Overlay networks (ingress included) take their subnets from here, clear of 10.89.0.0/24.
readonly ADDR_POOL=10.90.0.0/16
# How often workers report to the manager; a node is marked Down after a few missed beats.
readonly HEARTBEAT=${KILN_SWARM_HEARTBEAT:-2s}
readonly FORWARD_RULE=(FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment "kiln-swarm: between nodes" -j ACCEPT)

say() { echo "swarm-cluster: $*" >&2; }
die() {
  say "$*"
  exit 1
}
usage() {
  sed -n '4,7p' "$0" | sed 's/^#   /usage: /' >&2
  exit 2
}

netns() { echo "kiln-sw$1"; }
node_addr() { echo "$SUBNET_PREFIX.$((10 + $1))"; }
node_dir() { echo "$RUN_ROOT/n$1"; }
node_sock() { echo "unix://$RUN_ROOT/n$1/docker.sock"; }
# The docker CLI pointed at node N's engine.
dk() {
  local n=$1
  shift
  docker -H "$(node_sock "$n")" "$@"
}

print_env() {
  local socks=() addrs=() n
  for n in "${NODES[@]}"; do
    socks+=("$(node_sock "$n")")
    addrs+=("$(node_addr "$n")")
  done
  echo "KILN_SWARM_MANAGER=$(node_sock 1)"
  echo "KILN_SWARM_NODES=\"${socks[*]}\""
  echo "KILN_SWARM_NODE_ADDRS=\"${addrs[*]}\""
  echo "KILN_SWARM_HOST_ADDR=$HOST_ADDR"
}

# Whether process $1 runs (a zombie nobody reaped yet does not).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  [[ "${stat##*) }" != Z* ]]
}

# The pid in node N's pidfile if that process is alive, else nothing.
dockerd_pid() {
  local f pid
  f="$(node_dir "$1")/docker.pid"
  [ -r "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && alive "$pid"; then echo "$pid"; fi
}

# How many nodes the manager reports Ready (0 when it does not answer).
ready_nodes() {
  local out
  out=$(dk 1 node ls --format '{{.Status}}' 2>/dev/null) || {
    echo 0
    return
  }
  grep -c '^Ready$' <<<"$out" || true
}

cluster_up() {
  local n
  for n in "${NODES[@]}"; do
    [ -n "$(dockerd_pid "$n")" ] || return 1
    [ "$(dk "$n" info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null)" = active ] || return 1
  done
  [ "$(ready_nodes)" -eq "${#NODES[@]}" ]
}

# Anything of a cluster on this machine, whole or a crash's leftovers.
anything_left() {
  local n
  [ -e "$DATA_ROOT" ] || ip link show "$BRIDGE" >/dev/null 2>&1 && return 0
  for n in "${NODES[@]}"; do
    [ -e "$(node_dir "$n")" ] && return 0
    ip netns list | grep -qw "$(netns "$n")" && return 0
  done
  [ -n "$(node_pids)" ]
}

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local limit=$1 i
  shift
  for ((i = 0; i < limit * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

write_config() {
  local n=$1 dir insecure=""
  dir=$(node_dir "$n")
  if [ -s "$RUN_ROOT/insecure-registries" ]; then
    insecure=$(sed 's/.*/"&"/' "$RUN_ROOT/insecure-registries" | paste -sd, -)
  fi
  cat >"$dir/daemon.json.tmp" <<EOF
{
  "hosts": ["$(node_sock "$n")"],
  "data-root": "$DATA_ROOT/n$n",
  "exec-root": "$dir/exec",
  "pidfile": "$dir/docker.pid",
  "cgroup-parent": "/kiln-swarm-n$n",
  "no-new-privileges": true,
  "insecure-registries": [$insecure],
  "storage-driver": "overlay2",
  "log-level": "info"
}
EOF
  mv "$dir/daemon.json.tmp" "$dir/daemon.json"
}

# Runs inside node N's namespaces as `sh -c`: names the node, gives it a /sys of its own network
# namespace (as `ip netns exec` would, but keeping the cgroup hierarchies that dockerd needs)
# and a resolver that fails at once (the nodes have no way out, and Swarm tries to pull every
# task's image before it falls back to a local one: with the host's resolver each such try
# waits for a DNS timeout), then becomes dockerd. $1 node name, $2 node directory, then
# dockerd's command line.
# shellcheck disable=SC2016 # expanded by that sh
readonly NODE_INIT='
set -e
hostname "$1"
mkdir -p "$2/cgroup"
mount --rbind /sys/fs/cgroup "$2/cgroup"
umount -l /sys
mount -t sysfs sysfs /sys
mount --rbind "$2/cgroup" /sys/fs/cgroup
umount -l "$2/cgroup"
echo "nameserver 127.0.0.1" >"$2/resolv.conf"
mount --bind "$2/resolv.conf" /etc/resolv.conf
shift 2
exec "$@"
'

start_dockerd() {
  local n=$1 dir pid i
  dir=$(node_dir "$n")
  write_config "$n"
  # dockerd refuses a pidfile naming a process that still has a /proc entry, and waits for the
  # containerd its containerd.pid names: a killed engine or containerd may stay a zombie for a
  # while before it is reaped (by pid 1, whose pace is its own).
  [ -n "$(dockerd_pid "$n")" ] || rm -f "$dir/docker.pid"
  local containerd_pid="$dir/exec/containerd/containerd.pid"
  if [ -r "$containerd_pid" ] && ! alive "$(cat "$containerd_pid")"; then
    rm -f "$containerd_pid"
  fi
  # setsid: the engine outlives the shell (and the test) that started it. Its own mount
  # namespace (a slave of the host's): what dockerd mounts goes away with its processes.
  setsid nsenter --net="/run/netns/$(netns "$n")" \
    unshare --mount --propagation slave --uts \
    sh -c "$NODE_INIT" sh "$(netns "$n")" "$dir" \
    dockerd --config-file "$dir/daemon.json" </dev/null >>"$dir/dockerd.log" 2>&1 &
  pid=$!
  for ((i = 0; i < 600; i++)); do
    dk "$n" version >/dev/null 2>&1 && return 0
    alive "$pid" || break
    sleep 0.1
  done
  tail -n 20 "$dir/dockerd.log" >&2 || true
  die "node $n: dockerd did not answer on $(node_sock "$n") (log: $dir/dockerd.log)"
}

make_network() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  iptables -C "${FORWARD_RULE[@]}" 2>/dev/null || iptables -I "${FORWARD_RULE[@]}"
  local n ns
  for n in "${NODES[@]}"; do
    ns=$(netns "$n")
    ip netns add "$ns"
    ip link add "$ns-h" type veth peer name "$ns-n"
    ip link set "$ns-h" master "$BRIDGE" up
    ip link set "$ns-n" netns "$ns"
    ip -n "$ns" link set "$ns-n" name eth0
    ip -n "$ns" addr add "$(node_addr "$n")/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$HOST_ADDR"
    mkdir -p "$(node_dir "$n")" "$DATA_ROOT/n$n"
  done
}

cmd_up() {
  if cluster_up; then
    print_env
    return
  fi
  if anything_left; then
    say "cleaning up what an earlier cluster left"
    remove_nodes
  fi
  mkdir -p "$RUN_ROOT" "$DATA_ROOT"
  make_network
  local n
  for n in "${NODES[@]}"; do
    start_dockerd "$n"
  done
  dk 1 swarm init --advertise-addr "$(node_addr 1)" --listen-addr "$(node_addr 1):2377" \
    --default-addr-pool "$ADDR_POOL" --dispatcher-heartbeat "$HEARTBEAT" >/dev/null
  local token
  token=$(dk 1 swarm join-token -q worker)
  for n in "${NODES[@]:1}"; do
    dk "$n" swarm join --token "$token" --advertise-addr "$(node_addr "$n")" \
      --listen-addr "$(node_addr "$n"):2377" "$(node_addr 1):2377" >/dev/null
  done
  if ! wait_for 60 all_ready; then
    dk 1 node ls >&2 || true
    die "the swarm did not report ${#NODES[@]} nodes Ready within 60s"
  fi
  print_env
}

dead() { ! alive "$1"; }
all_ready() { [ "$(ready_nodes)" -eq "${#NODES[@]}" ]; }

# Every process of node N: those in its network namespace (dockerd, containerd, the shims,
# docker-proxy) and those in its containers' cgroups.
pids_of_node() {
  local n=$1 ns inode f
  ns=$(netns "$n")
  if [ -e "/run/netns/$ns" ]; then
    inode=$(stat -L -c %i "/run/netns/$ns")
    # One stat for all processes: "INODE /proc/PID/ns/net" each.
    stat -L -c '%i %n' /proc/[0-9]*/ns/net 2>/dev/null |
      awk -v i="$inode" '$1 == i { split($2, p, "/"); print p[3] }' || true
  fi
  if [ -d "/sys/fs/cgroup/pids/kiln-swarm-n$n" ]; then
    while IFS= read -r f; do
      cat "$f" 2>/dev/null || true
    done < <(find "/sys/fs/cgroup/pids/kiln-swarm-n$n" -name cgroup.procs)
  fi
  # An engine whose namespace is already gone still has its pidfile.
  dockerd_pid "$n"
}

# Every process of the cluster.
node_pids() {
  local n
  for n in "${NODES[@]}"; do pids_of_node "$n"; done
}

# Mount points under the cluster's directories, deepest first, as the root namespace sees them.
cluster_mounts() {
  awk -v a="$RUN_ROOT" -v b="$DATA_ROOT" '$2 == a || index($2, a "/") == 1 || $2 == b || index($2, b "/") == 1 { print $2 }' /proc/self/mounts |
    awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-
}

# Everything of the nodes (processes, mounts, namespaces, links, cgroups, files); what
# trust-registry recorded stays.
remove_nodes() {
  local n pids i m
  # Nothing is kept, so nothing needs a graceful stop: SIGKILL everything until none is left.
  for ((i = 0; i < 100; i++)); do
    pids=$(node_pids | sort -u)
    [ -z "$pids" ] && break
    # shellcheck disable=SC2086 # one pid a word
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  [ -z "$(node_pids)" ] || die "processes of the cluster survived SIGKILL: $(node_pids | sort -u | tr '\n' ' ')"
  while IFS= read -r m; do
    [ -n "$m" ] && umount -l "$m"
  done < <(cluster_mounts)
  for n in "${NODES[@]}"; do
    ip netns list | grep -qw "$(netns "$n")" && ip netns del "$(netns "$n")"
    ip link del "$(netns "$n")-h" 2>/dev/null || true
    # Container cgroups, deepest first, in every hierarchy.
    find /sys/fs/cgroup/*/"kiln-swarm-n$n" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  while iptables -C "${FORWARD_RULE[@]}" 2>/dev/null; do iptables -D "${FORWARD_RULE[@]}"; done
  [ -z "$(cluster_mounts)" ] || die "mounts left under $RUN_ROOT or $DATA_ROOT: $(cluster_mounts | tr '\n' ' ')"
  for n in "${NODES[@]}"; do rm -rf --one-file-system "$(node_dir "$n")"; done
  rm -rf --one-file-system "$DATA_ROOT"
}

cmd_down() {
  local m
  remove_nodes
  if [ -r "$RUN_ROOT/trusted-registries" ]; then
    while IFS= read -r m; do
      rm -f "$CERTS_DIR/$m/ca.crt"
      rmdir "$CERTS_DIR/$m" 2>/dev/null || true
    done <"$RUN_ROOT/trusted-registries"
  fi
  rm -rf --one-file-system "$RUN_ROOT"
}

cmd_status() {
  local n pid state rc=0
  for n in "${NODES[@]}"; do
    pid=$(dockerd_pid "$n")
    if [ -z "$pid" ]; then
      echo "node $n: $(netns "$n") $(node_addr "$n"): dockerd not running"
      rc=1
      continue
    fi
    state=$(dk "$n" info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo "not answering")
    echo "node $n: $(netns "$n") $(node_addr "$n"): dockerd pid $pid, swarm $state"
  done
  if [ -n "$(dockerd_pid 1)" ]; then dk 1 node ls || rc=1; fi
  if ! { [ -r /proc/config.gz ] && zcat /proc/config.gz | grep -q '^CONFIG_IP_VS=[ym]'; } &&
    [ ! -d /proc/sys/net/ipv4/vs ]; then
    echo "note: no IPVS in this kernel: Swarm's ingress routing mesh and service VIPs do not work"
  fi
  [ "$rc" -eq 0 ] && all_ready
}

node_arg() {
  case "${1:-}" in
    1 | 2 | 3) ;;
    *) usage ;;
  esac
}

cmd_kill_node() {
  local n=$1 whole=${2:-} pid pids i
  pid=$(dockerd_pid "$n")
  [ -n "$pid" ] || die "node $n: dockerd is not running"
  kill -9 "$pid"
  wait_for 10 dead "$pid" || die "node $n: dockerd $pid survived SIGKILL"
  [ "$whole" = --all ] || return 0
  for ((i = 0; i < 100; i++)); do
    pids=$(pids_of_node "$n" | sort -u)
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086 # one pid a word
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  die "node $n: processes survived SIGKILL: $pids"
}

cmd_start_node() {
  local n=$1 hostname
  [ -e "/run/netns/$(netns "$n")" ] || die "node $n: no namespace $(netns "$n"): run up first"
  [ -z "$(dockerd_pid "$n")" ] || die "node $n: dockerd is already running"
  start_dockerd "$n"
  hostname=$(netns "$n")
  if ! wait_for 60 node_ready "$hostname"; then
    dk 1 node ls >&2 || true
    die "node $n did not come back Ready within 60s"
  fi
}

node_ready() {
  dk 1 node ls --format '{{.Hostname}} {{.Status}}' 2>/dev/null | grep -qx "$1 Ready"
}

cmd_trust_registry() {
  local addr=${1:-} ca=${2:-} n pid
  [[ "$addr" =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] || usage
  [ -n "$ca" ] || usage
  mkdir -p "$RUN_ROOT"
  if [ "$ca" = --insecure ]; then
    grep -qxF "$addr" "$RUN_ROOT/insecure-registries" 2>/dev/null || echo "$addr" >>"$RUN_ROOT/insecure-registries"
    for n in "${NODES[@]}"; do
      [ -d "$(node_dir "$n")" ] || continue
      write_config "$n"
      pid=$(dockerd_pid "$n")
      [ -n "$pid" ] && kill -HUP "$pid"
    done
    return
  fi
  openssl x509 -noout -in "$ca" 2>/dev/null || die "$ca: not a PEM certificate"
  install -D -m 0644 "$ca" "$CERTS_DIR/$addr/ca.crt"
  grep -qxF "$addr" "$RUN_ROOT/trusted-registries" 2>/dev/null || echo "$addr" >>"$RUN_ROOT/trusted-registries"
}

[ "$(id -u)" -eq 0 ] || die "needs root"
case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env)
    cluster_up || die "no cluster is up (run: bash $0 up)"
    print_env
    ;;
  kill-node)
    node_arg "${2:-}"
    case "${3:-}" in "" | --all) ;; *) usage ;; esac
    cmd_kill_node "$2" "${3:-}"
    ;;
  start-node)
    node_arg "${2:-}"
    cmd_start_node "$2"
    ;;
  trust-registry) cmd_trust_registry "${2:-}" "${3:-}" ;;
  *) usage ;;
esac
