#!/usr/bin/env bash
# kiln's main job on the example app, on the embedded local provider (runc): builds kiln and
# the example, then `kiln up` builds the image, tests it, starts a daemon in this process,
# rolls the app out behind kiln's router and streams events until Ctrl-C (which stops the
# app and the daemon).
source "$(dirname "$0")/lib.sh"
need_cargo
# runc, the container seccomp profile every sealed instance gets (kiln carries none), and the
# CNI plugins that give each instance its own network namespace.
if ! command -v runc >/dev/null 2>&1 || [ ! -f /usr/share/containers/seccomp.json ] || [ ! -x /usr/lib/cni/bridge ] || ! command -v iptables >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing runc, the container seccomp profile and the CNI plugins kiln's local provider needs"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends runc golang-github-containers-common containernetworking-plugins iptables >/dev/null
  else
    echo "kiln's local provider needs runc, the container seccomp profile, the CNI plugins and root: run 'sudo apt-get install -y runc golang-github-containers-common containernetworking-plugins iptables', then this script as root" >&2
    exit 1
  fi
fi
if [ "$(id -u)" != 0 ]; then
  echo "kiln's local provider mounts overlay filesystems and runs runc: run this script as root" >&2
  exit 1
fi
echo "==> building kiln and the example app (release)"
# One invocation, so kiln and the example share their dependencies' build.
cargo build --release --locked -p kiln -p hello
KILN=$TARGET_DIR/release/kiln
echo "==> kiln is $KILN; in another terminal: export PATH=$(dirname "$KILN"):\$PATH"
exec "$KILN" up -f examples/hello/kiln.toml "$@"
