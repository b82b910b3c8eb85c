#!/usr/bin/env bash
# Runs every test of the workspace. Tests that need root, runc or a Docker Engine run when
# those are present and always in CI (CI=true), where .ci/run provides them.
source "$(dirname "$0")/lib.sh"
need_cargo
build_example
cargo test --workspace --locked "$@"
