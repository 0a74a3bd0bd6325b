#!/usr/bin/env bash
# Two ranks on two GPUs: the real collective registration (issue 8).
# Runs on the device machine from the repository root, with
# cuda-glue/device-bin carried (see README.md next to this file).
#
#   bash cuda-glue/multi-gpu/run-two-ranks.sh
#        [--only rust|rust-cvd|rust-index|torch|control] [--cycles N] [--timeout SECONDS]
#
# Steps (each starts with a "=== " line; every step runs; the exit status
# is non-zero if any failed):
#   1. rust-cvd:   segment-registry-two-ranks, one process per GPU, each
#                  seeing only its GPU (CUDA_VISIBLE_DEVICES=<rank>)
#   2. rust-index: the same, both processes seeing both GPUs, device = rank
#   3. torch:      torch_two_ranks.py under torchrun --nproc_per_node=2
# and, only when asked (--only control), the negative control: rank 1
# allocates two buffers in the opposite order; that run must fail, not hang.
# For the Rust steps this script starts both processes, waits for them with
# a timeout (each also has its own watchdog), prints their output, and
# compares their registration logs (rank 0 compares them too).
# SEGREG_ALLOW_NO_GPU=1 skips the GPU count check and SEGREG_NO_NCCL_SHIM=1
# the libnccl.so symlink (both for fake/dry-run.sh on a CPU machine);
# SEGREG_BIN_DIR overrides cuda-glue/device-bin.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
glue=$(cd "$here/.." && pwd)
bin=${SEGREG_BIN_DIR:-$glue/device-bin}
exe=$bin/segment-registry-two-ranks
lib=$bin/libsegment_registry_nccl.so
only=all
cycles=40
timeout_s=90
control_timeout=30
while [ $# -gt 0 ]; do
    case $1 in
        --only) only=$2; shift 2 ;;
        --cycles) cycles=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

PY=${PY:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=python3
export NCCL_NVLS_ENABLE=0
# cudarc looks for libnccl.so; the wheel ships libnccl.so.2 only. Point at
# PyTorch's NCCL (the one the torch step must share with our library).
if [ -n "${SEGREG_NO_NCCL_SHIM:-}" ]; then
    :
elif NCCL_LIB=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0] + "/lib")' 2>/dev/null); then
    shim=$(mktemp -d)
    ln -sf "$NCCL_LIB/libnccl.so.2" "$shim/libnccl.so"
    export LD_LIBRARY_PATH="$shim:$NCCL_LIB:${LD_LIBRARY_PATH:-}"
else
    echo "warning: no nvidia.nccl in $PY; relying on LD_LIBRARY_PATH for libnccl" >&2
fi

ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
nvidia-smi topo -m 2>/dev/null | head -5 || true
if [ "${ngpu:-0}" -lt 2 ] && [ -z "${SEGREG_ALLOW_NO_GPU:-}" ]; then
    echo "needs 2 GPUs, found ${ngpu:-0}: run it with a two-GPU kind of the device tool (nvidia-h200-x2)" >&2
    exit 1
fi

status=0

# rust MODE [ARGS...]: MODE is cvd (one visible GPU per process) or index;
# ARGS go to both ranks.
rust() {
    local mode=$1 dir rc0 rc1 r
    shift
    if [ ! -x "$exe" ]; then
        echo "missing $exe: build it with cuda-glue/gpu/build-device-bin.sh (see README.md)"
        return 1
    fi
    dir=$(mktemp -d "${TMPDIR:-/tmp}/two-ranks.XXXXXX")
    local pids=()
    for r in 0 1; do
        if [ "$mode" = cvd ]; then
            CUDA_VISIBLE_DEVICES=$r timeout -k 10 $((timeout_s + 30)) "$exe" \
                --rank $r --world-size 2 --device 0 --dir "$dir" \
                --cycles "$cycles" --timeout "$timeout_s" "$@" >"$dir/out.rank$r" 2>&1 &
        else
            timeout -k 10 $((timeout_s + 30)) "$exe" \
                --rank $r --world-size 2 --device $r --dir "$dir" \
                --cycles "$cycles" --timeout "$timeout_s" "$@" >"$dir/out.rank$r" 2>&1 &
        fi
        pids+=($!)
    done
    wait "${pids[0]}"; rc0=$?
    wait "${pids[1]}"; rc1=$?
    for r in 0 1; do sed "s/^/  [rank $r] /" "$dir/out.rank$r"; done
    echo "  exit status: rank 0 $rc0, rank 1 $rc1 (124: timeout)"
    local ok=0
    [ "$rc0" -eq 0 ] && [ "$rc1" -eq 0 ] || ok=1
    if [ -s "$dir/regs.rank0.log" ] && [ -s "$dir/regs.rank1.log" ]; then
        if cmp -s "$dir/regs.rank0.log" "$dir/regs.rank1.log"; then
            echo "  launcher: registration logs identical ($(wc -l <"$dir/regs.rank0.log") calls)"
            echo "  first calls:"; head -12 "$dir/regs.rank0.log" | sed 's/^/    /'
        else
            echo "  launcher: registration logs DIFFER:"
            diff "$dir/regs.rank0.log" "$dir/regs.rank1.log" | head -20 | sed 's/^/    /'
            ok=1
        fi
    else
        echo "  launcher: a registration log is missing or empty"
        ok=1
    fi
    echo "  (files kept in $dir)"
    return $ok
}

# The negative control: rank 1 allocates in another order. Passes when the
# run fails (NCCL error, log mismatch or watchdog) within the time bound.
control() {
    local start=$SECONDS rc
    timeout_s=$control_timeout rust cvd --control-swap; rc=$?
    echo "  control: took $((SECONDS - start)) s (bound $((control_timeout + 40)) s)"
    if [ $rc -eq 0 ]; then
        echo "  control: the mismatched run PASSED: the mismatch went unnoticed"
        return 1
    fi
    echo "  control: the mismatched run failed, as it must, and did not hang"
}

torch_step() {
    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/two-ranks-torch.XXXXXX")
    timeout -k 10 $((2 * timeout_s + 60)) "$PY" -m torch.distributed.run \
        --standalone --nproc_per_node=2 "$here/torch_two_ranks.py" \
        --lib "$lib" --timeout $((2 * timeout_s)) --log-dir "$dir" || return $?
    cmp -s "$dir/torch.rank0.log" "$dir/torch.rank1.log" || {
        echo "  launcher: torch registration logs differ"; return 1; }
    echo "  launcher: torch registration logs identical ($(wc -l <"$dir/torch.rank0.log") passes)"
}

step() {
    echo; echo "=== $*"
    "$@"; local rc=$?
    if [ $rc -ne 0 ]; then echo "=== FAILED ($rc): $*"; status=1; else echo "=== passed: $*"; fi
}

case $only in
    all) step rust cvd; step rust index; step torch_step ;;
    control) step control ;;
    rust) step rust cvd; step rust index ;;
    rust-cvd) step rust cvd ;;
    rust-index) step rust index ;;
    torch) step torch_step ;;
    *) echo "unknown --only $only" >&2; exit 2 ;;
esac
exit $status
