#!/usr/bin/env bash
# Commit-to-live time of kiln's git follower (`kiln source add`), with the example app.
#
# A bare repository the script pushes to; the daemon follows its `main` with a 2 s poll.
# For each of ROUNDS commits (each changes HELLO_VERSION): from `git push` returning until
# the router answers with the new version: fetch, checkout, build, `[image.test]`, plan,
# apply and a rolling update of one instance. Then the same with a source that polls
# hourly and a signed webhook call right after the push (`X-Hub-Signature-256`): the time
# from the call to the fetch, and to live.
#
# Peer: Argo CD's default reconcile interval is 180 s (`timeout.reconciliation`), so a
# commit waits up to 180 s before Argo CD even looks at it; no Kubernetes server is
# available here to run it side by side, so that figure is its documented default, not a
# measurement.
#
# Needs root, runc and git. Usage: sudo bench/gitops.sh [ROUNDS] (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
cargo build --release --locked -q -p kiln -p hello
KILN=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/kiln
HELLO=target/x86_64-unknown-linux-gnu/release/hello
[ -x "$HELLO" ] || cp "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/hello" "$HELLO"
WORK=$(mktemp -d)
STATE=$WORK/state
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
API=$(free_port)
cleanup() {
  "$KILN" --state "$STATE" down bench >/dev/null 2>&1 || true
  [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

g() { git -C "$WORK/work" -c user.name=bench -c user.email=bench@example.com "$@"; }
git init -q --bare -b main "$WORK/origin.git"
git init -q -b main "$WORK/work"
g remote add origin "$WORK/origin.git"
cp "$HELLO" "$WORK/work/hello"

push() { # version
  cat > "$WORK/work/kiln.toml" <<TOML
name = "bench"
[image]
entrypoint = ["/hello"]
[[image.copy]]
from = "hello"
to = "/hello"
[image.test]
command = ["/hello", "migrate"]
[service]
replicas = 1
writable = ["/tmp"]
stop_grace = "1s"
env = { HELLO_VERSION = "$1" }
[service.health]
path = "/healthz"
interval = "100ms"
timeout = "100ms"
[route]
listen = "127.0.0.1:$PORT"
drain_timeout = "2s"
TOML
  g add -A
  g commit -q -m "version $1"
  g push -q origin main
}

now() { date +%s.%N; }
# Waits until the app answers with `hello from $1`; prints the seconds since $2.
until_live() {
  local deadline=$((SECONDS + 300))
  until curl -fsS -H 'Host: bench' "http://127.0.0.1:$PORT/" 2>/dev/null | grep -q "hello from $1\$"; do
    [ $SECONDS -lt $deadline ] || { echo "version $1 never went live" >&2; exit 1; }
    sleep 0.05
  done
  echo "$(now) - $2" | bc
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "t0ken-bench" > "$WORK/token"
printf 'a-webhook-secret-for-the-bench\n' > "$WORK/hook"
"$KILN" --state "$STATE" serve --api-listen "127.0.0.1:$API" --token-file "$WORK/token" \
  >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 200); do [ -S "$STATE/kiln.sock" ] && break; sleep 0.05; done

push v0
"$KILN" --state "$STATE" source add bench --git "$WORK/origin.git" --interval 2s >/dev/null
until_live v0 "$(now)" >/dev/null

: > "$WORK/poll"
for i in $(seq 1 "$ROUNDS"); do
  push "p$i"
  t=$(now)
  until_live "p$i" "$t" | tee -a "$WORK/poll" | sed "s/^/commit $i live after /; s/$/ s/" >&2
done

# Webhook: the same app followed by a source that polls hourly.
"$KILN" --state "$STATE" source remove bench >/dev/null
"$KILN" --state "$STATE" source add hooked --git "$WORK/origin.git" --interval 1h \
  --webhook-secret-file "$WORK/hook" >/dev/null
sleep 2
: > "$WORK/hook.live"
: > "$WORK/hook.fetch"
BODY='{"ref":"refs/heads/main"}'
SIG=$(printf '%s' "$BODY" | openssl dgst -sha256 -hmac "$(cat "$WORK/hook" | tr -d '\n')" -r | cut -d' ' -f1)
for i in $(seq 1 "$ROUNDS"); do
  push "w$i"
  head=$(g rev-parse HEAD)
  t=$(now)
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:$API/v1/sources/hooked/webhook" \
    -H "X-Hub-Signature-256: sha256=$SIG" -H 'Content-Type: application/json' -d "$BODY"
  until "$KILN" --state "$STATE" source list --json | grep -q "$head"; do sleep 0.02; done
  echo "$(now) - $t" | bc >> "$WORK/hook.fetch"
  until_live "w$i" "$t" >> "$WORK/hook.live"
done

echo
echo "commit to live, poll every 2 s, median of $ROUNDS: $(median < "$WORK/poll") s (goal <= 10 s)"
echo "webhook call to fetched, median of $ROUNDS: $(median < "$WORK/hook.fetch") s (goal <= 1 s)"
echo "webhook call to live, median of $ROUNDS: $(median < "$WORK/hook.live") s"
echo "peer: Argo CD reconciles every 180 s by default (documented, not run here): a commit waits up to 180 s before it is looked at"
