#!/usr/bin/env bash
# A CI/CD job's deploy step: build, test, plan and apply one kiln spec from a checkout.
#
#   deploy.sh [--host URL] [SPEC]          SPEC defaults to kiln.toml
#
# The daemon is the local one (the state in KILN_STATE, else kiln's default), or a remote
# one named by --host or KILN_HOST (ssh://[user@]host[:port][/state] or unix:///path/kiln.sock;
# a kiln context works too). The image is built and tested here, on the runner; `kiln apply`
# sends it, with its test attestation, to a remote daemon (only the blobs it lacks).
#
# Exit codes, as kiln's own: 0 deployed, or nothing to do; 1 a step failed (the build, the
# image's [image.test], the plan or the rollout: a rollout that fails is rolled back by the
# daemon and the release live before keeps serving); 2 usage.
#
# Keep the runner's state (KILN_STATE) outside the checkout, or .kiln/ in .gitignore: an
# untracked .kiln/ makes the image's provenance say the work tree had uncommitted changes.
#
# Needs bash >= 4.4 and kiln on PATH (or KILN=/path/to/kiln); no jq: kiln's --json output is
# pretty-printed with two spaces per level, so a top-level field is one line at a known
# indentation, which sed reads. docs/ci.md says more.
set -euo pipefail

kiln_bin="${KILN:-kiln}"
host=()
spec=""

usage() {
  echo "usage: $0 [--host URL] [SPEC]   (SPEC defaults to kiln.toml)" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --host)
      [ $# -ge 2 ] || usage
      host=(--host "$2")
      shift 2
      ;;
    --host=*)
      host=(--host "${1#--host=}")
      shift
      ;;
    -h | --help)
      sed -n '/^set -euo/q; 2,$s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    -*) usage ;;
    *)
      [ -z "$spec" ] || usage
      spec="$1"
      shift
      ;;
  esac
done
spec="${spec:-kiln.toml}"
[ -f "$spec" ] || {
  echo "deploy: no spec at $spec" >&2
  exit 2
}

step() { printf '\n==> %s\n' "$*"; }
fail() {
  printf '\ndeploy: FAILED: %s\n' "$*" >&2
  exit 1
}

# The value of a top-level field of a --json document ("field": value, indented by `indent`
# spaces: 2 for an object, 4 for the objects of an array), without quotes or trailing comma.
json_field() {
  local field="$1" indent="$2"
  sed -n "s/^ \{$indent\}\"$field\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p"
}

where="${host[1]:-${KILN_HOST:-the local daemon (or the current context)}}"
echo "deploy: $spec to $where"

# 1. Build. The digest names the image from here on: what is tested is what is applied.
step "kiln build --json -f $spec"
build_json="$("$kiln_bin" build --json -f "$spec")" || fail "kiln build failed"
digest="$(printf '%s\n' "$build_json" | json_field digest 2)"
tag="$(printf '%s\n' "$build_json" | json_field tag 2)"
printf '%s\n' "$digest" | grep -Eqx 'sha256:[0-9a-f]{64}' ||
  fail "kiln build --json printed no image digest: $build_json"
app="${tag%%:*}"
echo "built $tag: $digest"

# 2. Test. `kiln test` runs [image.test] on the image and records a test attestation, which
# `kiln apply` requires when the spec has tests. A spec without a [image.test] table skips
# this step; one that writes its tests another way is still refused at apply if untested.
step "kiln test -f $spec $digest"
if grep -q '^[[:space:]]*\[image\.test\]' "$spec"; then
  "$kiln_bin" test -f "$spec" "$digest" || fail "image $digest failed its tests: nothing deployed"
else
  echo "$spec has no [image.test]: not tested"
fi

# 3. Plan: exit 0 when the daemon already runs what the spec describes, 2 when applying
# would change something, 1 on an error.
step "kiln plan --detailed-exitcode -f $spec"
plan=0
"$kiln_bin" "${host[@]}" plan --detailed-exitcode -f "$spec" || plan=$?
case "$plan" in
  0)
    # The plan compares with the live release (after an aborted rollout, not the one rolled
    # back), so nothing to change means the live release is what the spec describes.
    echo
    echo "deploy: nothing to do: $app already runs $digest as $spec describes"
    exit 0
    ;;
  2) ;;
  *) fail "kiln plan failed (exit $plan)" ;;
esac

# 4. Apply: record the release and follow its rollout; exit 1 when the daemon refuses it or
# rolls it back.
step "kiln apply -f $spec --image $digest"
"$kiln_bin" "${host[@]}" apply -f "$spec" --image "$digest" ||
  fail "$app: the release of $digest did not go live (refused, or rolled back: kiln status $app, kiln history $app)"

# 5. Report.
step "kiln status $app"
"$kiln_bin" "${host[@]}" status "$app"
status_json="$("$kiln_bin" "${host[@]}" status "$app" --json)" || fail "kiln status $app failed"
live="$(printf '%s\n' "$status_json" | json_field live 4)"
listen="$(printf '%s\n' "$status_json" | json_field listen 4)"
echo
echo "deploy: $app release $live is live on http://$listen (image $digest)"
