#!/usr/bin/env bash
# Instruction counts (callgrind, repeatable on one machine) of the
# registry's hot operations, for one or more commits side by side:
# track, untrack, lookup and a nothing-pending pass at n segments.
#
#   bash benches/scripts/callgrind-ops.sh [-n N] [-i ITERS] COMMIT...
#
# Each commit is checked out in a temporary worktree and built with the
# bench profile into one shared target folder, so dependencies build once.
# Prints, per operation, the instructions per call inside `measured_*`.
set -euo pipefail
n=1000 iters=20000
while getopts "n:i:" o; do
  case $o in n) n=$OPTARG ;; i) iters=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-n N] [-i ITERS] COMMIT..." >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is required" >&2; exit 1; }
root=$(git rev-parse --show-toplevel)
target=${CARGO_TARGET_DIR:-$root/target-callgrind}
work=$(mktemp -d)
trap 'for w in "$work"/wt-*; do git -C "$root" worktree remove --force "$w" 2>/dev/null || true; done; rm -rf "$work"' EXIT
printf '%-12s' op; for c in "$@"; do printf '%14s' "$(git -C "$root" rev-parse --short "$c")"; done; echo
declare -A ir
for c in "$@"; do
  wt=$work/wt-$(git -C "$root" rev-parse --short "$c")
  git -C "$root" worktree add -q --detach "$wt" "$c"
  (cd "$wt" && CARGO_TARGET_DIR=$target cargo build -q --locked --profile bench \
      -p segment-registry-benches --example profile)
  for op in track untrack lookup pass_none; do
    out=$work/cg.$op
    (cd "$work" && valgrind --tool=callgrind --callgrind-out-file="$out" \
        --toggle-collect='*measured_*' "$target/release/examples/profile" \
        registry "$op" "$n" "$iters" >/dev/null 2>&1)
    total=$(grep -m1 '^summary:' "$out" | awk '{print $2}')
    ir[$c.$op]=$(awk -v t="$total" -v k="$iters" 'BEGIN { printf "%.1f", t / k }')
  done
done
for op in track untrack lookup pass_none; do
  printf '%-12s' "$op"; for c in "$@"; do printf '%14s' "${ir[$c.$op]}"; done; echo
done
