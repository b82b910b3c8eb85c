#!/usr/bin/env bash
# Installs the real components kiln's tests and benchmarks drive (runc, a Docker Engine, OCI
# tools, load generators and peer proxies) and starts dockerd. Needs root; idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# golang-github-containers-common: /usr/share/containers/seccomp.json, the seccomp allowlist
# of every sealed local instance. containernetworking-plugins + iptables: each local
# instance's own network namespace on kiln's bridge.
# time: /usr/bin/time -v measures the peak memory of kiln on hostile archives (tests/hostile.rs).
# systemd (systemd-analyze verify), man-db and binutils (strip): scripts/package.sh and
# scripts/package-check.sh build, install and check the .deb. openssh-server and
# openssh-client: tests/remote.rs drives a daemon over a real sshd. util-linux (nsenter,
# unshare, setsid) and shellcheck: scripts/swarm-cluster.sh, the swarm tests' cluster.
packages=(runc time openssh-server openssh-client golang-github-containers-common containernetworking-plugins iptables busybox-static docker.io skopeo umoci wrk nginx-light haproxy socat iproute2 procps systemd man-db binutils util-linux shellcheck)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts nginx on install where it can; the benchmarks start their own.
service nginx stop >/dev/null 2>&1 || true

if ! docker info >/dev/null 2>&1; then
  (dockerd >/tmp/kiln-ci-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    echo "dockerd did not start; its log:" >&2
    tail -n 50 /tmp/kiln-ci-dockerd.log >&2
    exit 1
  fi
fi
echo "ci-setup: $(runc --version | head -n1); docker $(docker version --format '{{.Server.Version}}')"
