#!/usr/bin/env bash
# kiln's main job on the example app: builds kiln and the example, then checks the example's
# kiln.toml. (Later issues grow this into a live rollout: build, test, apply, rollback.)
source "$(dirname "$0")/lib.sh"
need_cargo
echo "==> building kiln and the example app (release)"
cargo build --release --locked -p kiln
build_example
KILN=$TARGET_DIR/release/kiln
echo "==> kiln validate -f examples/hello/kiln.toml -v"
"$KILN" validate -f examples/hello/kiln.toml -v
echo
echo "kiln is at $KILN; try: $KILN --help"
