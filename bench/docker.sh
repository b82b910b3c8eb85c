#!/usr/bin/env bash
# Instance start-up on the docker provider against its peers, in one run: the median time
# from "create" to "healthy" for the example app (`hello`, a static binary on scratch, built
# into an image by `kiln build`) on kiln's docker provider (Engine API calls, record write,
# kiln's own health check), next to a plain `docker run -d` of the same image until its first
# successful response — with kiln's hardening flags and bare — and a create + start through
# the Engine API with no CLI. The first instance loads the image into the engine; it is a
# warm-up and is left out.
# Target: kiln / docker run (same hardening) <= 1.2x.
#
# Usage: bench/docker.sh   (RUNS=10 by default; PROFILE=1 also times when the app first
#                           answered, to show kiln's health-check lag; needs a Docker Engine
#                           and the docker CLI, as a user that may use the engine's socket)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-10}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

command -v docker >/dev/null || { echo "the docker CLI is missing: apt-get install -y docker.io" >&2; exit 1; }
if ! docker info >/dev/null 2>&1; then
  echo "no Docker Engine answers (\`docker info\` failed). Start one, e.g.:" >&2
  echo "  sudo systemctl start docker        # with systemd" >&2
  echo "  sudo dockerd >/tmp/dockerd.log 2>&1 &   # without" >&2
  echo "or point DOCKER_HOST at one." >&2
  exit 1
fi

echo "building kiln, hello and the benchmark (release)…" >&2
(cd "$ROOT" && cargo build --release -q --locked -p hello -p kiln \
  && cargo build --release -q --locked -p kiln-runtime --example bench_docker)

WORK="$(mktemp -d)"
# Every container the benchmark creates carries this label, so nothing outlives a crash.
export BENCH_LABEL="$$-$RANDOM"
cleanup() {
  docker ps -aq --filter "label=kiln-bench=$BENCH_LABEL" | xargs -r docker rm -f >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The example app's image, as examples/hello/kiln.toml describes it, from this target dir.
cat >"$WORK/kiln.toml" <<EOF
name = "hello"

[image]
base = "scratch"
entrypoint = ["/hello"]
env = { HELLO_VERSION = "bench" }

[[image.copy]]
from = "$OUT/hello"
to = "/hello"
mode = "0755"
allow_outside = true

[service]
port = 8080
EOF
IMAGE="$("$OUT/kiln" --quiet --state "$WORK/state" build -f "$WORK/kiln.toml")"

"$OUT/examples/bench_docker" "$WORK/state" "$IMAGE" "$RUNS"
