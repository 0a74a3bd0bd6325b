#!/usr/bin/env bash
# A dry run of the two-process plumbing on a CPU machine: builds the fake
# CUDA/NCCL of fake_cuda_nccl.c and segment-registry-two-ranks, then runs
# run-two-ranks.sh's Rust steps against the fake (two processes, unique ids
# through a file, comm init, passes, all-reduces, log comparison, exit
# codes), then the negative control (rank 1 allocates in another order:
# the run must fail, not hang), then run-never-hang.sh's scenarios. It
# checks the plumbing only, not NCCL: see README.md.
#
#   bash cuda-glue/multi-gpu/fake/dry-run.sh [--cycles N]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-glue}
work=$(mktemp -d "${TMPDIR:-/tmp}/two-ranks-dry.XXXXXX")
cc -shared -fPIC -O2 -Wall -Wextra -o "$work/libfake.so" "$here/fake_cuda_nccl.c"
for name in libcuda.so libnccl.so libnccl.so.2; do ln -s libfake.so "$work/$name"; done
(cd "$root" && cargo build --release -q -p segment-registry-nccl --bins)
mkdir "$work/bin"
# The bin is named segment-registry-two-ranks once Cargo.toml has its
# [[bin]] entry; before that, cargo names it after the file.
for name in segment-registry-two-ranks two_ranks; do
    if [ -x "$CARGO_TARGET_DIR/release/$name" ]; then
        cp "$CARGO_TARGET_DIR/release/$name" "$work/bin/segment-registry-two-ranks"
        break
    fi
done
export LD_LIBRARY_PATH="$work${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FAKE_NCCL_DIR=$work SEGREG_ALLOW_NO_GPU=1 SEGREG_NO_NCCL_SHIM=1 SEGREG_BIN_DIR=$work/bin
echo "dry run in $work (fake CUDA/NCCL)"
status=0
bash "$here/../run-two-ranks.sh" --only rust --cycles 4 --timeout 60 "$@" || status=1
bash "$here/../run-two-ranks.sh" --only control --cycles 2 || status=1
# The never-hang scenarios: a peer that never makes a call leaves a
# non-blocking call in progress after 2 s (as NCCL leaves it), so the
# glue's 6 s deadlines end it.
FAKE_NCCL_PEER_WAIT_MS=2000 bash "$here/../run-never-hang.sh" --call-deadline 6 \
    --iterations 50 --timeout 120 || status=1
echo
[ $status -eq 0 ] && echo "dry run: PASS" || echo "dry run: FAIL"
exit $status
