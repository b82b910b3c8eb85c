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
# openssh-client: tests/remote.rs drives a daemon over a real sshd. curl: tests/registry.rs
# fetches from kiln's registry over TLS trusting kiln's CA only. util-linux (nsenter,
# unshare, setsid) and shellcheck: scripts/swarm-cluster.sh, the swarm tests' cluster.
# docker-registry (the CNCF distribution registry) and ca-certificates: tests/push.rs pushes
# kiln's images to a real registry it runs itself; kiln's push verifies HTTPS against the bundle.
# git: crates/git's tests make real repositories with it (kiln itself reads them with gix).
# chromium and chromium-driver: crates/kiln/tests/dashboard.rs drives the dashboard in a real
# headless Chromium through chromedriver (W3C WebDriver).
# cryptsetup-bin (veritysetup), fdisk (sfdisk), gdisk (sgdisk) and cpio: crates/machine's
# tests check its verity trees, GPT disks and initramfs archives with the tools that read them.
# erofs-utils (mkfs.erofs), dosfstools (mkfs.vfat), mtools (mcopy), systemd-boot-efi (the EFI
# stub), binutils (objcopy, objdump) and qemu-utils (qemu-img): `kiln image export --format
# raw|qcow2` drives them; tests/machine_image.rs checks its disks (its kernel comes from
# `apt-get download`, so the package lists must be current). sbsigntool (sbverify) and openssl:
# it checks the Secure Boot signature of a signed disk's kernel image and makes test keys;
# ovmf's snakeoil firmware is the Secure Boot machine it boots.
packages=(runc time openssh-server openssh-client golang-github-containers-common containernetworking-plugins iptables busybox-static docker.io skopeo umoci wrk nginx-light haproxy socat iproute2 procps systemd man-db binutils curl util-linux shellcheck docker-registry ca-certificates git chromium chromium-driver cryptsetup-bin fdisk gdisk cpio erofs-utils dosfstools mtools systemd-boot-efi qemu-utils qemu-system-x86 ovmf sbsigntool openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# tests/machine_image.rs asks apt for the current kernel package: it needs package lists.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
  apt-get update -qq
fi
# Debian starts nginx on install where it can; the benchmarks start their own.
service nginx stop >/dev/null 2>&1 || true
# Likewise docker-registry (on :5000, with htpasswd auth): tests/push.rs runs its own.
service docker-registry stop >/dev/null 2>&1 || true

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
# The validator of `kiln export kubernetes` (crates/kiln/tests/kubernetes.rs), offline once
# installed: kubernetes-validate (bundles the Kubernetes schemas) and its dependencies pinned
# in a venv of Debian's python3, and Argo Rollouts' published API models (npm, pinned by
# package-lock.json) for Rollouts. Reinstalled only when a pin changes.
k8s_pins="$(cd "$(dirname "$0")" && pwd)/kubernetes-validate"
missing_k8s=()
for p in python3 python3-venv nodejs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing_k8s+=("$p")
done
if [ ${#missing_k8s[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing_k8s[@]}" >/dev/null
fi
if ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
if ! cmp -s "$k8s_pins/requirements.txt" /opt/kiln-ci/venv/kiln-requirements.txt; then
  rm -rf /opt/kiln-ci/venv
  /usr/bin/python3 -m venv /opt/kiln-ci/venv
  /opt/kiln-ci/venv/bin/pip install -q --disable-pip-version-check --no-deps -r "$k8s_pins/requirements.txt"
  cp "$k8s_pins/requirements.txt" /opt/kiln-ci/venv/kiln-requirements.txt
fi
if ! cmp -s "$k8s_pins/package-lock.json" /opt/kiln-ci/argo/package-lock.json; then
  rm -rf /opt/kiln-ci/argo
  mkdir -p /opt/kiln-ci/argo
  cp "$k8s_pins/package.json" "$k8s_pins/package-lock.json" /opt/kiln-ci/argo/
  (cd /opt/kiln-ci/argo && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# Third-party checkers of kiln's supply-chain output (crates/kiln/tests/supply_chain*.rs):
# the in-toto reference implementation and securesystemslib (DSSE envelopes, in-toto
# statements), in-toto-attestation (the Statement v1 and SLSA v1 provenance bindings,
# crates/kiln/tests/attest.rs) and spdx-tools (SPDX 2.3 validation), pinned in their own
# venv; reinstalled only when a pin changes.
attest_pins="$(cd "$(dirname "$0")" && pwd)/attest-tools"
if ! cmp -s "$attest_pins/requirements.txt" /opt/kiln-ci/attest/kiln-requirements.txt; then
  rm -rf /opt/kiln-ci/attest
  /usr/bin/python3 -m venv /opt/kiln-ci/attest
  /opt/kiln-ci/attest/bin/pip install -q --disable-pip-version-check --no-deps -r "$attest_pins/requirements.txt"
  cp "$attest_pins/requirements.txt" /opt/kiln-ci/attest/kiln-requirements.txt
fi

echo "ci-setup: $(runc --version | head -n1); docker $(docker version --format '{{.Server.Version}}'); $(/opt/kiln-ci/venv/bin/kubernetes-validate --version)"
