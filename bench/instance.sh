#!/usr/bin/env bash
# Instance start-up on the local provider against its peers, in one run: the median time
# from "create" to "healthy" (first 200 from /healthz) for the example app (`hello`, a static
# binary on scratch) on kiln's local provider (overlay mount + own network namespace on the
# kiln0 bridge through CNI + OCI bundle + runc + kiln's own health check), next to a bare
# `runc run` of the same bundle given the same network setup (a namespace, the CNI loopback
# plugin, then kiln's network list; CNI DEL after each run), the same two on the host's
# network (`network = "host"`, so the CNI cost shows), `podman run -d` of the same binary as
# an image on podman's default network, and a plain fork/exec of the binary. The series are
# interleaved run by run. See crates/runtime/examples/bench_instance.rs for what each times.
# Targets: kiln / bare runc (same network setup) <= 1.2x; kiln / podman run <= 0.5x.
#
# Usage: sudo bench/instance.sh   (RUNS=20 by default; needs runc and the CNI plugins in
# /usr/lib/cni; podman is installed unless PODMAN=0, which leaves it out)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-20}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

[ "$(id -u)" = 0 ] || { echo "bench/instance.sh needs root (overlay mounts, runc)" >&2; exit 1; }
command -v runc >/dev/null || { echo "runc is missing: apt-get install -y runc" >&2; exit 1; }
[ -x /usr/lib/cni/bridge ] || {
  echo "the CNI plugins are missing: apt-get install -y containernetworking-plugins" >&2; exit 1; }
PODMAN="${PODMAN:-1}"
if [ "$PODMAN" = 1 ] && ! command -v podman >/dev/null; then
  echo "installing podman" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman >/dev/null
fi

echo "building hello and the benchmark (release)…" >&2
(cd "$ROOT" && cargo build --release -q --locked -p hello \
  && cargo build --release -q --locked -p kiln-runtime --example bench_instance)

PODMAN_IMAGE=""
if [ "$PODMAN" = 1 ]; then
  # The same image as kiln runs: the binary at /hello on scratch, its entry point and env.
  PODMAN_IMAGE=localhost/kiln-bench-hello
  ctx="$(mktemp -d)"
  trap 'rm -rf "$ctx"; podman ps -a --format "{{.Names}}" | grep "^kiln-bench-" | xargs -r podman rm -f -t 0 >/dev/null' EXIT
  cp "$OUT/hello" "$ctx/hello"
  printf 'FROM scratch\nCOPY hello /hello\nENV HELLO_VERSION=bench\nENTRYPOINT ["/hello"]\n' >"$ctx/Containerfile"
  podman build -q -t "$PODMAN_IMAGE" "$ctx" >/dev/null
fi

PODMAN_IMAGE="$PODMAN_IMAGE" "$OUT/examples/bench_instance" "$OUT/hello" "$RUNS"
