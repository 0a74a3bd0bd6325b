#!/usr/bin/env bash
# Builds the multi-thread bench (`mt`) of two commits, for a side-by-side
# run on a machine without Rust (compare-mt-pair.sh runs them there).
#
#   benches/scripts/package-mt-pair.sh OLD NEW [DEST]   (default benches/device-bin)
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OLD NEW [DEST]" >&2; exit 2; }
root=$(git rev-parse --show-toplevel)
dest=${3:-$root/benches/device-bin}
target=${CARGO_TARGET_DIR:-$root/target-bench}
mkdir -p "$dest"
work=$(mktemp -d)
trap 'for w in "$work"/wt-*; do git -C "$root" worktree remove --force "$w" 2>/dev/null || true; done; rm -rf "$work"' EXIT
for side in old new; do
  c=$1; [ $side = new ] && c=$2
  wt=$work/wt-$side
  git -C "$root" worktree add -q --detach "$wt" "$c"
  exe=$(cd "$wt" && CARGO_TARGET_DIR=$target cargo bench -q --locked -p segment-registry-benches \
        --bench mt --no-run --message-format=json \
        | jq -r 'select(.reason == "compiler-artifact" and .target.kind == ["bench"] and .executable != null) | .executable')
  cp "$exe" "$dest/mt-$side"
  strip --strip-debug "$dest/mt-$side" 2>/dev/null || true
  echo "$side: $(git -C "$root" rev-parse --short "$c") -> $dest/mt-$side"
done
cp "$root/benches/scripts/compare-mt-pair.sh" "$dest/"
