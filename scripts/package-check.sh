#!/usr/bin/env bash
# Installs the package scripts/package.sh built, checks what it installed, runs the unit's
# daemon command on the package's state directory, then removes and purges the package.
# Needs root, apt-get and systemd-analyze (scripts/ci-setup.sh installs them). It installs
# and purges kiln, so it refuses to run where kiln is installed or /var/lib/kiln exists.
source "$(dirname "$0")/lib.sh"
out=${CARGO_TARGET_DIR:-$ROOT/target}/deb
state=/var/lib/kiln
unit=/lib/systemd/system/kiln.service

fail() {
  echo "package-check: $*" >&2
  exit 1
}
ok() { echo "package-check: ok: $*"; }

[ "$(id -u)" = 0 ] || fail "needs root (it installs the package)"
shopt -s nullglob
debs=("$out"/kiln_*_amd64.deb)
[ ${#debs[@]} = 1 ] || fail "want one kiln_*_amd64.deb in $out, found ${#debs[@]}: run scripts/package.sh"
deb=${debs[0]}
if dpkg-query -W -f='${Status}' kiln 2>/dev/null | grep -q installed; then
  fail "kiln is installed here; this check installs and purges it: remove it first"
fi
[ ! -e "$state" ] || fail "$state exists; this check would purge it: move it away first"
# Slim container images tell dpkg not to install manual pages (path-exclude in
# /etc/dpkg/dpkg.cfg.d); the check needs them, so it includes kiln's back for this install.
dpkg_options=()
if grep -rqs '^path-exclude.*/usr/share/man' /etc/dpkg/dpkg.cfg.d/; then
  dpkg_options=(-o "Dpkg::Options::=--path-include=/usr/share/man/man1/kiln*")
fi

daemon=
router=
# Whether $1 is a running `kiln router` (a pid from router.pid, which may have been reused).
is_router() { [ -n "$1" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q ' router'; }
cleanup() {
  if [ -n "$daemon" ]; then
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
  fi
  if is_router "$router"; then
    kill -TERM "$router" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# Dependencies come from the configured archives (ci-setup.sh has installed them in CI).
apt-get install -y -qq "${dpkg_options[@]}" "$deb" >/dev/null
version=$(dpkg-query -W -f='${Version}' kiln)
ok "installed $(basename "$deb") (kiln $version)"

[ "$(kiln --version)" = "kiln $version" ] || fail "kiln --version says '$(kiln --version)', the package $version"
ok "kiln --version: $(kiln --version)"

[ "$(stat -c '%a %U' "$state")" = "700 root" ] ||
  fail "$state is $(stat -c '%a %U' "$state"), want 700 root"
ok "$state is 0700 root"

listed=$(dpkg -L kiln)
for path in /usr/bin/kiln \
  /usr/share/bash-completion/completions/kiln \
  /usr/share/zsh/vendor-completions/_kiln \
  /usr/share/fish/vendor_completions.d/kiln.fish \
  /usr/share/man/man1/kiln.1.gz \
  /usr/share/man/man1/kiln-serve.1.gz \
  /usr/share/man/man1/kiln-apply.1.gz \
  "$unit" \
  /usr/share/doc/kiln/copyright; do
  grep -qxF "$path" <<<"$listed" || fail "dpkg -L kiln does not list $path"
  [ -s "$path" ] || fail "$path is missing or empty"
done
ok "dpkg -L kiln lists the binary, completions, man pages, unit and copyright"

zcat /usr/share/man/man1/kiln.1.gz | grep -q '^\.TH kiln 1' || fail "kiln.1.gz has no .TH kiln 1"
zcat /usr/share/man/man1/kiln-serve.1.gz | grep -q '^\.TH kiln-serve 1' ||
  fail "kiln-serve.1.gz has no .TH kiln-serve 1"
pages=$(grep -c '^/usr/share/man/man1/kiln.*\.1\.gz$' <<<"$listed")
if command -v man >/dev/null 2>&1; then
  man -P cat kiln-apply 2>/dev/null | grep -q 'kiln-apply' || fail "man kiln-apply shows no page"
  ok "$pages man pages; man kiln-apply renders"
else
  ok "$pages man pages with .TH (man is not installed: not rendered)"
fi

bash -c 'source /usr/share/bash-completion/completions/kiln && complete -p kiln' >/dev/null ||
  fail "the bash completion does not define a completion for kiln"
ok "bash completion loads"

# systemd-analyze verify also checks that ExecStart's binary exists and that the man pages
# Documentation= names are there, which the install provides.
if ! verify=$(systemd-analyze verify "$unit" 2>&1) || [ -n "$verify" ]; then
  fail "systemd-analyze verify $unit: $verify"
fi
ok "systemd-analyze verify $unit"

# The unit's own command, as systemd would run it (this check may run without systemd):
# the daemon serves on the package's state directory, and root's `kiln` outside a project
# finds it there without --state.
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
[ -n "$exec_start" ] || fail "no ExecStart= in $unit"
log=$(mktemp)
# shellcheck disable=SC2086 # the unit's command line, split as systemd splits it
$exec_start >"$log" 2>&1 &
daemon=$!
# Its first line on stdout says it serves; a SIGTERM before that would be a stop during start.
for _ in $(seq 1 300); do
  grep -q '^kiln daemon serving' "$log" && break
  sleep 0.1
done
grep -q "^kiln daemon serving $state/kiln.sock" "$log" || fail "'$exec_start' did not serve $state/kiln.sock: $(cat "$log")"
away=$(mktemp -d)
doctor=$(cd "$away" && env -u KILN_STATE kiln doctor --json 2>/dev/null || true)
grep -q "\"dir\": \"$state\"" <<<"$doctor" || fail "kiln doctor outside a project did not choose $state: $doctor"
(cd "$away" && env -u KILN_STATE kiln status >/dev/null) || fail "kiln status did not reach the daemon on $state"
router=$(cat "$state/router.pid" 2>/dev/null || true)
kill -TERM "$daemon"
wait "$daemon" || fail "the daemon did not stop cleanly on SIGTERM: $(cat "$log")"
daemon=
rmdir "$away"
ok "'$exec_start' serves; kiln as root outside a project uses $state (kiln doctor, kiln status)"

apt-get remove -y -qq kiln >/dev/null
[ ! -e /usr/bin/kiln ] || fail "/usr/bin/kiln is still there after apt-get remove"
[ -d "$state" ] || fail "apt-get remove deleted $state; only purge may"
ok "apt-get remove kiln: binary gone, $state kept"

apt-get purge -y -qq kiln >/dev/null
[ ! -e "$state" ] || fail "apt-get purge kiln left $state"
# The router the daemon started outlives it (traffic outlives the control plane); with its
# state gone it stops by itself.
for _ in $(seq 1 100); do
  is_router "$router" || break
  sleep 0.1
done
! is_router "$router" || fail "the router (pid $router) still runs after the purge"
ok "apt-get purge kiln: $state gone${router:+, and the router it held (pid $router) stopped}"
rm -f "$log"
