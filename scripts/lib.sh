# Shared by scripts/*.sh: where things are and a check for the Rust toolchain.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/x86_64-unknown-linux-gnu

need_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "kiln needs a Rust toolchain (1.95 or newer) to build: install it with rustup" >&2
    echo "  (https://rustup.rs); Debian's own cargo is older" >&2
    exit 1
  fi
}

# The example app's image copies its static release binary.
build_example() {
  cargo build --release --locked -p hello
}
