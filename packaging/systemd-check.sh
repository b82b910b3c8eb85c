#!/usr/bin/env bash
# The package under a real systemd, by hand (not in CI: it needs a Docker Engine, debootstrap
# and the Debian archive, and takes minutes). A clean Debian bookworm (debootstrap, minbase,
# with systemd) runs with systemd as PID 1 in a container; the .deb scripts/package.sh built
# is installed with apt-get, pulling its dependencies from the archive; then the service is
# checked the way an operator uses it:
#   - postinst started it; `kiln` as root outside a project uses /var/lib/kiln;
#   - the example app rolled out through the service; `systemctl restart kiln` keeps the
#     same instance and router processes, a package upgrade (reinstall) the same instances,
#     and the new daemon adopts them;
#   - log lines reach the journal at their priority (warning 4, error 3);
#   - `apt-get remove` stops the daemon but not the apps, which still answer through the
#     router, and keeps /var/lib/kiln; `purge` keeps it while instances have mounts in it.
# Needs root. Run scripts/package.sh and `cargo build --release -p hello` first.
source "$(dirname "$0")/../scripts/lib.sh"
out=${CARGO_TARGET_DIR:-$ROOT/target}/deb
hello=$ROOT/target/x86_64-unknown-linux-gnu/release/hello
name=kiln-systemd-check
rootfs=${KILN_CHECK_ROOTFS:-/tmp/$name-rootfs}

fail() {
  echo "systemd-check: $*" >&2
  exit 1
}
ok() { echo "systemd-check: ok: $*"; }

shopt -s nullglob
debs=("$out"/kiln_*_amd64.deb)
[ ${#debs[@]} = 1 ] || fail "want one kiln_*_amd64.deb in $out: run scripts/package.sh"
[ -x "$hello" ] || fail "no $hello: cargo build --release -p hello"
command -v debootstrap >/dev/null || fail "needs debootstrap: apt-get install -y debootstrap"
docker info >/dev/null 2>&1 || fail "needs a running Docker Engine"

if [ ! -x "$rootfs/lib/systemd/systemd" ]; then
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,man-db,ca-certificates,curl \
    bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  : >"$rootfs/etc/machine-id"
fi
tar -C "$rootfs" -c . | docker import - "$name:bookworm" >/dev/null

# --privileged, unless this host's own bounding set lacks capabilities (a sandbox): then every
# capability it has, with what --privileged also lifts.
caps=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
if [ "$((0x$caps & 0x1ffffffffff))" = "$((0x1ffffffffff))" ]; then
  powers=(--privileged)
else
  powers=(--cap-add ALL --security-opt seccomp=unconfined --security-opt apparmor=unconfined
    --device-cgroup-rule 'a *:* rwm')
  for bit in $(seq 0 40); do
    if [ "$(((0x$caps >> bit) & 1))" = 0 ]; then
      cap=$(capsh --decode="$(printf 0x%x $((1 << bit)))" 2>/dev/null | sed 's/.*=cap_//')
      [ -n "$cap" ] && powers+=(--cap-drop "${cap^^}")
    fi
  done
fi
docker rm -f "$name" >/dev/null 2>&1 || true
docker volume rm "$name-state" >/dev/null 2>&1 || true
cleanup() {
  # runc's delete also removes each instance's cgroup, which is the host's (--cgroupns=host).
  docker exec "$name" sh -c 'for id in $(runc --root /var/lib/kiln/runc list -q); do
    runc --root /var/lib/kiln/runc delete -f "$id"; done' >/dev/null 2>&1 || true
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker volume rm "$name-state" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# /var/lib/kiln on a volume: the container's own root is overlayfs, which cannot hold the
# instances' overlay upper directories.
docker run -d --name "$name" "${powers[@]}" --cgroupns=host \
  -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
  -v "$name-state:/var/lib/kiln" -v "$out:/deb:ro" -v "$ROOT/examples/hello:/src/hello:ro" \
  -v "$hello:/src/hello-bin:ro" "$name:bookworm" /lib/systemd/systemd >/dev/null
inside() { docker exec "$name" sh -c "$1"; }
for _ in $(seq 1 100); do
  state=$(inside 'systemctl is-system-running' 2>/dev/null || true)
  case $state in running | degraded) break ;; esac
  sleep 0.2
done
ok "systemd runs in $name ($state)"

deb=/deb/$(basename "${debs[0]}")
inside "apt-get update -qq && apt-get install -y -qq $deb >/dev/null 2>&1" || fail "apt-get install $deb"
[ "$(inside 'systemctl is-active kiln')" = active ] || fail "kiln.service is not active after install"
ok "apt-get install pulled $(inside 'dpkg-query -W -f="\${Version}" runc') runc and started kiln.service"

inside 'cd /root && kiln doctor --json' | grep -q '"why": "the system service'"'"'s (root, outside a project)"' ||
  fail "kiln doctor as root outside a project did not choose /var/lib/kiln"
inside 'mkdir -p /srv/hello && sed "s|^from = .*|from = \"/src/hello-bin\"|" /src/hello/kiln.toml >/srv/hello/kiln.toml
    cd /root && kiln build -q -f /srv/hello/kiln.toml && kiln test -q -f /srv/hello/kiln.toml &&
    kiln apply -q -f /srv/hello/kiln.toml' || fail "the example app did not roll out"
instances() { inside 'runc --root /var/lib/kiln/runc list -q | sort | while read -r id; do
  echo "$id $(runc --root /var/lib/kiln/runc state "$id" | sed -n "s/.*\"pid\": \([0-9]*\).*/\1/p")"; done'; }
before=$(instances)
[ "$(wc -l <<<"$before")" = 2 ] || fail "want 2 instances, have: $before"
inside 'curl -fsS http://127.0.0.1:8080/' | grep -q 'hello from v1' || fail "the app does not answer"
router=$(inside 'cat /var/lib/kiln/router.pid')
ok "the example app is live through the service: $(tr '\n' ' ' <<<"$before")(router $router)"

wait_ready() {
  for _ in $(seq 1 100); do
    inside 'cd /root && kiln status hello --json' 2>/dev/null | grep -q '"healthy"' && return 0
    sleep 0.2
  done
  fail "kiln status never showed the app healthy again"
}
inside 'systemctl restart kiln'
wait_ready
[ "$(instances)" = "$before" ] || fail "systemctl restart changed the instances: $(instances)"
[ "$(inside 'cat /var/lib/kiln/router.pid')" = "$router" ] || fail "systemctl restart replaced the router"
inside 'curl -fsS http://127.0.0.1:8080/' | grep -q 'hello from v1' || fail "the app does not answer after a restart"
ok "systemctl restart kiln: the same instance and router processes, adopted and answering"

inside "apt-get install -y -qq --reinstall $deb >/dev/null 2>&1" || fail "the reinstall failed"
wait_ready
[ "$(instances)" = "$before" ] || fail "a package upgrade changed the instances: $(instances)"
ok "package upgrade (reinstall): the same instance processes"

probe=$(inside 'systemd-run --quiet --wait --unit kiln-probe sh -c "mkdir -m 755 /tmp/s && kiln --state /tmp/s status" ;
  journalctl -u kiln-probe -o json --no-pager' || true)
grep -q '"PRIORITY":"4".*"MESSAGE":"the state directory was readable' <<<"$probe" ||
  grep -q '"MESSAGE":"the state directory was readable.*"PRIORITY":"4"' <<<"$probe" ||
  fail "no warning at priority 4 in the journal: $probe"
grep -q '"PRIORITY":"3".*"MESSAGE":"error: no kiln daemon' <<<"$probe" ||
  grep -q '"MESSAGE":"error: no kiln daemon.*"PRIORITY":"3"' <<<"$probe" ||
  fail "no error at priority 3 in the journal: $probe"
ok "journal: a warning at priority 4, an error at priority 3"

inside 'apt-get remove -y -qq kiln >/dev/null 2>&1' || fail "apt-get remove failed"
[ "$(inside 'systemctl is-active kiln' || true)" = inactive ] || fail "kiln.service still runs after remove"
[ "$(instances)" = "$before" ] || fail "apt-get remove stopped instances: $(instances)"
inside 'curl -fsS http://127.0.0.1:8080/' | grep -q 'hello from v1' || fail "the app does not answer without its daemon"
inside 'apt-get purge -y -qq kiln >/dev/null 2>&1' || fail "apt-get purge failed"
inside 'test -d /var/lib/kiln/runc' || fail "purge deleted /var/lib/kiln under running instances"
ok "remove: daemon stopped, the app still answers; purge: /var/lib/kiln kept while instances have mounts"
