#!/usr/bin/env bash
# Builds the three bench binaries (st, mt, memory) and bench-report here, and
# copies them with run-all.sh into a git-ignored folder (default:
# benches/device-bin/) that can be copied to a machine without Rust.
#
#   benches/scripts/package.sh [DEST]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-bench}
dest=${1:-$root/benches/device-bin}
mkdir -p "$dest"
cd "$root"

# The bench executables: cargo names them st-<hash> etc.; its JSON messages
# give their paths (kind "bench" only: the lib's unit tests are built too).
cargo bench -p segment-registry-benches --no-run --message-format=json \
    | jq -r 'select(.reason == "compiler-artifact" and .target.kind == ["bench"] and .executable != null)
             | "\(.target.name) \(.executable)"' \
    | while read -r name exe; do
        cp "$exe" "$dest/$name"
        echo "copied $exe -> $dest/$name"
    done
cargo build -p segment-registry-benches --release --bin bench-report
cp "$CARGO_TARGET_DIR/release/bench-report" "$dest/bench-report"
cp "$root/benches/scripts/run-all.sh" "$dest/run-all.sh"
# Debug info only makes the copy larger; keep symbols for perf.
if command -v strip >/dev/null; then
    strip --strip-debug "$dest/st" "$dest/mt" "$dest/memory" "$dest/bench-report"
fi
ls -l "$dest"
