#!/usr/bin/env bash
# Instance start-up on the local provider against its peers, in one run: the median time
# from "create" to "healthy" for the example app (`hello`, a static binary on scratch) on
# kiln's local provider (overlay mount + OCI bundle + runc + kiln's own health check), next
# to a bare `runc run` of the same bundle and a plain fork/exec of the binary.
# Target: kiln / runc <= 1.2x.
#
# Usage: sudo bench/instance.sh   (RUNS=20 by default; needs runc)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-20}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

[ "$(id -u)" = 0 ] || { echo "bench/instance.sh needs root (overlay mounts, runc)" >&2; exit 1; }
command -v runc >/dev/null || { echo "runc is missing: apt-get install -y runc" >&2; exit 1; }

echo "building hello and the benchmark (release)…" >&2
(cd "$ROOT" && cargo build --release -q --locked -p hello \
  && cargo build --release -q --locked -p kiln-runtime --example bench_instance)

"$OUT/examples/bench_instance" "$OUT/hello" "$RUNS"
