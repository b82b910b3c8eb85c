#!/usr/bin/env bash
# Build time of `kiln build` against `docker build` (BuildKit), on this machine, in one run.
#
# Generates a deterministic reference tree (~300 MB, ~5,000 files: source-like text, mixed
# binaries and incompressible assets), then for each tool measures:
#   clean      — empty cache and store / pruned builder cache and no image
#   no-change  — the same build again
#   one-file   — one small file changed, build again
# and prints the median of REPS runs and kiln/docker ratios. The Dockerfile is
# `FROM scratch` + `COPY tree/ /data/`, the same content and destination as kiln.toml.
# Targets (kiln/docker): clean <= 0.5, no-change <= 0.5, one-file <= 0.15, gzip layers.
# kiln is measured as it ships (every build attaches its SBOM and provenance) and, side by
# side in the same runs, with `--no-attest`: the attestations' cost, target <= 1.10 clean.
#
# Usage: bench/build.sh   (REPS=3 by default; WORK=/tmp/kiln-bench-build; needs dockerd)
#        PEER=none bench/build.sh   (kiln with and without attestations only: no docker, so
#        no `docker builder prune` on a shared engine)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/tmp/kiln-bench-build}"
REPS="${REPS:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
KILN="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/kiln"
# Debian's docker.io client (20.10) has BuildKit built in; a newer client without the
# buildx plugin refuses DOCKER_BUILDKIT=1, so prefer the Debian one when both exist.
DOCKER="${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}"

echo "building kiln (release)…" >&2
(cd "$ROOT" && cargo build --release -q -p kiln)

PEER="${PEER:-docker}"
TOOLS="kiln bare docker"
mkdir -p "$WORK"
if [ "$PEER" = none ]; then
  TOOLS="kiln bare"
else
[ -S /var/run/docker.sock ] || { echo "dockerd is not running (start it: dockerd &)" >&2; exit 1; }
BUILDER="BuildKit"
export DOCKER_BUILDKIT=1
mkdir -p "$WORK"
printf 'FROM scratch\n' > "$WORK/probe.Dockerfile"
if ! "$DOCKER" build -q -f "$WORK/probe.Dockerfile" -t kiln-bench-probe "$WORK" >/dev/null 2>"$WORK/probe.err"; then
  echo "BuildKit is not available here ($(head -1 "$WORK/probe.err")); using the classic builder" >&2
  export DOCKER_BUILDKIT=0
  BUILDER="classic builder"
fi
"$DOCKER" rmi -f kiln-bench-probe >/dev/null 2>&1 || true
fi

# --- the reference tree -------------------------------------------------------------------
if [ ! -f "$WORK/tree.v2" ]; then
  echo "generating the reference tree in $WORK/tree…" >&2
  rm -rf "$WORK/tree"
  python3 - "$WORK/tree" <<'PY'
import os, random, sys
root = sys.argv[1]
rng = random.Random(20261126)
words = [w.encode() for w in (
    "fn let mut impl struct enum match return self pub use mod crate async await "
    "const static trait where for in if else loop while break continue type as ref "
    "Some None Ok Err Vec String Option Result Box Arc Mutex HashMap BTreeMap error "
    "request response handler config value index buffer stream layer image digest").split()]
def text(n):
    out = bytearray()
    while len(out) < n:
        line = b" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        out += b"    " * rng.randint(0, 3) + line + b";\n"
    return bytes(out[:n])
def mixed(n):
    # half structured (compressible), half noise: like object files and images with headers
    return bytes(b if i % 2 else b ^ 0x5a for i, b in enumerate(text(n // 2))) + rng.randbytes(n - n // 2)
# 50 top-level directories, each with source files, mixed binaries and assets, so small and
# large files interleave in sort order as they do in a real application tree.
kinds = [("src", 80, lambda: text(rng.randint(1_000, 19_000))),
         ("lib", 18, lambda: mixed(rng.randint(20_000, 200_000))),
         ("assets", 2, lambda: rng.randbytes(rng.randint(1_000_000, 2_400_000)))]
total = files = 0
for top in range(50):
    for kind, count, gen in kinds:
        for i in range(count):
            d = os.path.join(root, f"m{top:02d}", kind, f"g{i % 4}")
            os.makedirs(d, exist_ok=True)
            data = gen()
            with open(os.path.join(d, f"f{i:03d}.dat"), "wb") as f:
                f.write(data)
            total += len(data); files += 1
print(f"tree: {files} files, {total / 1e6:.0f} MB", file=sys.stderr)
PY
  # Age the tree: a file written this very second would be "racily clean" for any
  # stat cache (kiln's and git's alike) and be re-read on the next build.
  find "$WORK/tree" -exec touch -d '-1 hour' {} +
  touch "$WORK/tree.v2"
fi
echo "tree: $(find "$WORK/tree" -type f | wc -l) files, $(du -sm "$WORK/tree" | cut -f1) MB" >&2

cat > "$WORK/kiln.toml" <<'TOML'
name = "bench"

[image]
base = "scratch"
entrypoint = ["/data/none"]
compression = "gzip"

[[image.copy]]
from = "tree"
to = "/data"

[service]
port = 8080

[route]
listen = "127.0.0.1:18099"
TOML
printf 'FROM scratch\nCOPY tree/ /data/\n' > "$WORK/Dockerfile"
printf '*\n!tree\n' > "$WORK/.dockerignore"

# A small source file in the middle of the tree's sort order: a change costs kiln the part
# of the layer after it (SHA-256 is sequential), so neither end would be a fair pick.
SMALL="$WORK/tree/m25/src/g1/f041.dat"
ORIGINAL="$WORK/original-small.dat"
cp -p "$SMALL" "$ORIGINAL"

warm() { find "$WORK/tree" -type f -exec cat {} + >/dev/null; }
now() { date +%s.%N; }
t_kiln() { local s; s=$(now); "$KILN" --state "$WORK/state" build -f "$WORK/kiln.toml" >"$WORK/kiln.out" 2>"$WORK/kiln.err"; echo "$(now) - $s" | bc; }
t_bare() { local s; s=$(now); "$KILN" --state "$WORK/state" build --no-attest -f "$WORK/kiln.toml" >"$WORK/kiln.out" 2>"$WORK/kiln.err"; echo "$(now) - $s" | bc; }
t_docker() { local s; s=$(now); "$DOCKER" build -q -t kiln-bench:latest "$WORK" >"$WORK/docker.out" 2>"$WORK/docker.err"; echo "$(now) - $s" | bc; }
clean_kiln() { rm -rf "$WORK/state"; }
clean_bare() { rm -rf "$WORK/state"; }
clean_docker() { "$DOCKER" rmi -f kiln-bench:latest >/dev/null 2>&1 || true; "$DOCKER" builder prune -af >/dev/null 2>&1 || true; }
restore_small() { cp -p "$ORIGINAL" "$SMALL"; }
change_small() { printf 'changed %s\n' "$1" >> "$SMALL"; }

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A T
for tool in $TOOLS; do
  for phase in clean nochange onefile; do : > "$WORK/$tool.$phase"; done
done
for rep in $(seq 1 "$REPS"); do
  echo "run $rep/$REPS…" >&2
  # Every other run in the reverse order, so neither tool always runs after the other's
  # state was deleted (ext4 pays for a big deletion in the next run's file creations).
  read -r -a order <<< "$TOOLS"
  if [ $((rep % 2)) -eq 0 ]; then
    for ((i = 0, j = ${#order[@]} - 1; i < j; i++, j--)); do
      t=${order[i]}; order[i]=${order[j]}; order[j]=$t
    done
  fi
  for tool in "${order[@]}"; do
    restore_small
    "clean_$tool"; warm
    "t_$tool" >> "$WORK/$tool.clean"
    "t_$tool" >> "$WORK/$tool.nochange"
    change_small "$rep"
    "t_$tool" >> "$WORK/$tool.onefile"
  done
done
restore_small
for tool in $TOOLS; do
  for phase in clean nochange onefile; do T[$tool.$phase]=$(median < "$WORK/$tool.$phase"); done
done

# Reproducibility in the same run: a clean kiln build of the restored tree twice.
clean_kiln; d1=$("$KILN" --state "$WORK/state" build -q -f "$WORK/kiln.toml")
clean_kiln; d2=$("$KILN" --state "$WORK/state" build -q -f "$WORK/kiln.toml")
layer_mb=$(du -sm "$WORK/state/images/blobs" | cut -f1)

echo
echo "tree: $(find "$WORK/tree" -type f | wc -l) files, $(du -sm "$WORK/tree" | cut -f1) MB; kiln layer store ${layer_mb} MB (gzip); median of $REPS"
if [ "$PEER" != none ]; then
echo "peer: docker build ($BUILDER, $("$DOCKER" version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
printf '%-10s %10s %10s %8s %8s\n' phase "kiln s" "docker s" ratio target
for phase in clean nochange onefile; do
  target=0.5; [ "$phase" = onefile ] && target=0.15
  k=${T[kiln.$phase]}; d=${T[docker.$phase]}
  printf '%-10s %10.3f %10.3f %8.3f %8s\n' "$phase" "$k" "$d" "$(echo "$k / $d" | bc -l)" "$target"
done
fi
echo "attestations (SBOM + provenance) against --no-attest, same runs:"
printf '%-10s %10s %10s %8s %8s\n' phase "kiln s" "bare s" ratio target
for phase in clean nochange onefile; do
  k=${T[kiln.$phase]}; b=${T[bare.$phase]}
  target=-; [ "$phase" = clean ] && target=1.10
  printf '%-10s %10.3f %10.3f %8.3f %8s\n' "$phase" "$k" "$b" "$(echo "$k / $b" | bc -l)" "$target"
done
if [ "$d1" = "$d2" ]; then echo "reproducible: two clean kiln builds gave $d1"; else echo "NOT reproducible: $d1 vs $d2"; exit 1; fi
