#!/usr/bin/env bash
# Builds what the device machine runs (it has no Rust) and copies it,
# stripped, into cuda-glue/device-bin/ (git-ignored; carry it):
#   libsegment_registry_nccl.so  the cdylib (release)
#   segment-registry-demo        the demo (release)
#   gpu_real                     the GPU test binary (tests/gpu_real.rs)
#   checked_costs                the checked-pass costs (examples/)
#   segment-registry-two-ranks   the two-rank run (multi-gpu/)
set -euo pipefail
glue=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$glue/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-glue}
out=$glue/device-bin
rm -rf "$out"
mkdir -p "$out"
cd "$root"
cargo build --release -p segment-registry-nccl --lib --bin segment-registry-demo
cp "$CARGO_TARGET_DIR/release/segment-registry-demo" \
   "$CARGO_TARGET_DIR/release/libsegment_registry_nccl.so" "$out/"
cargo build --release -p segment-registry-nccl --bin segment-registry-two-ranks
cp "$CARGO_TARGET_DIR/release/segment-registry-two-ranks" "$out/"
cargo build --release -p segment-registry-nccl --example checked_costs
cp "$CARGO_TARGET_DIR/release/examples/checked_costs" "$out/"
exe=$(cargo test --release -p segment-registry-nccl --test gpu_real --no-run \
        --message-format=json 2>/dev/null |
      python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == "gpu_real":
        print(m["executable"])')
cp "$exe" "$out/gpu_real"
strip "$out"/*
ls -la "$out"
du -sh "$out"
