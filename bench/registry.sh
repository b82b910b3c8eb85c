#!/usr/bin/env bash
# Getting a kiln image into a Docker Engine, in one run: `docker pull` by digest from kiln's
# registry (`kiln serve --registry-listen 127.0.0.1:PORT`, what a Swarm node does) against
# `kiln image export --format docker-archive` + `docker load` of the same image. Each round
# builds an image of its own (the example binary under a path named after the round, plus
# BIG_MIB of random bytes when set), so no layer is already in the engine; both ways start
# from an engine without it (the image is removed by its exact reference in between).
# Prints the median of each over RUNS rounds.
#
# Usage: bench/registry.sh   (RUNS=7 by default; BIG_MIB=64 adds an incompressible layer;
#                             needs root, a Docker Engine and the docker CLI)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-7}"
BIG_MIB="${BIG_MIB:-0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

docker info >/dev/null 2>&1 || { echo "no Docker Engine answers (\`docker info\` failed)" >&2; exit 1; }
echo "building kiln and hello (release)…" >&2
(cd "$ROOT" && cargo build --release -q --locked -p hello -p kiln)
KILN="$OUT/kiln"

WORK="$(mktemp -d)"
STATE="$WORK/state"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
REFS=()
SERVE=""
cleanup() {
  for r in "${REFS[@]}"; do docker rmi "$r" >/dev/null 2>&1 || true; done
  [ -n "$SERVE" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
  [ -f "$STATE/router.pid" ] && kill "$(cat "$STATE/router.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ms() { echo $(( ($2 - $1) / 1000000 )); }
now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

"$KILN" --state "$STATE" serve --registry-listen "127.0.0.1:$PORT" >"$WORK/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }

[ "$BIG_MIB" -gt 0 ] && head -c "$((BIG_MIB << 20))" /dev/urandom >"$WORK/big"
pulls=() loads=() exports=()
for i in $(seq 1 "$RUNS"); do
  stamp="b$$r$i"
  {
    printf 'name = "%s"\n\n[image]\nentrypoint = ["/%s/hello"]\n\n' "$stamp" "$stamp"
    printf '[[image.copy]]\nfrom = "%s"\nto = "/%s/hello"\nallow_outside = true\n\n' "$OUT/hello" "$stamp"
    [ "$BIG_MIB" -gt 0 ] && printf '[[image.copy]]\nfrom = "%s"\nto = "/%s/big"\nallow_outside = true\n\n' "$WORK/big" "$stamp"
    printf '[service]\nreplicas = 1\n'
  } >"$WORK/kiln.toml"
  digest="$("$KILN" --state "$STATE" build -q -f "$WORK/kiln.toml")"
  ref="127.0.0.1:$PORT/kiln/$stamp@$digest"
  REFS+=("$ref" "$stamp:latest")

  t0=$(now); docker pull -q "$ref" >/dev/null; t1=$(now)
  pulls+=("$(ms "$t0" "$t1")")
  docker rmi "$ref" >/dev/null

  rm -f "$WORK/image.tar"
  t0=$(now); "$KILN" --state "$STATE" image export "$digest" --format docker-archive -o "$WORK/image.tar" >/dev/null; t1=$(now)
  docker load -q -i "$WORK/image.tar" >/dev/null; t2=$(now)
  exports+=("$(ms "$t0" "$t1")")
  loads+=("$(ms "$t1" "$t2")")
  docker rmi "$stamp:latest" >/dev/null
done

size="$(stat -c %s "$WORK/image.tar")"
echo "image: the example app$([ "$BIG_MIB" -gt 0 ] && echo " + $BIG_MIB MiB random"), docker-archive $size bytes; median of $RUNS"
echo "docker pull from kiln's registry:             $(printf '%s\n' "${pulls[@]}" | median) ms"
echo "docker load of kiln's docker-archive:         $(printf '%s\n' "${loads[@]}" | median) ms"
echo "  (+ kiln image export --format docker-archive: $(printf '%s\n' "${exports[@]}" | median) ms)"
