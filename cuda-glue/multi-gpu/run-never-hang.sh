#!/usr/bin/env bash
# The never-hang scenarios on two GPUs, one process per GPU
# (segment-registry-two-ranks --scenario, src/bin/two_ranks/never_hang.rs):
#
#   1. diverge:  divergent sets and a skipped checked pass end in Diverged on
#                both ranks at once; the unchecked control ends at its deadline
#   2. deadline: rank 1 stops taking part; rank 0's pass ends at the
#                deadline, both sides abort, nothing is lost
#   3. costs:    checked and unchecked passes and bare all-reduces at two ranks
#
# From the repository root of a GPU host with the binaries carried in
# cuda-glue/device-bin/ (cuda-glue/gpu/build-device-bin.sh):
#
#   bash cuda-glue/multi-gpu/run-never-hang.sh [--only diverge|deadline|costs]
#        [--call-deadline SECONDS] [--iterations N] [--timeout SECONDS]
#
# Prints the topology and NCCL version first; each step's output per rank
# (and into $OUT/never-hang-<step>.log when $OUT is set). Every step runs;
# the exit status is non-zero if any failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
exe=${SEGREG_BIN_DIR:-$root/cuda-glue/device-bin}/segment-registry-two-ranks
only=all call_deadline=20 iterations=2000 timeout_s=300
while [ $# -gt 0 ]; do
    case $1 in
        --only) only=$2; shift 2 ;;
        --call-deadline) call_deadline=$2; shift 2 ;;
        --iterations) iterations=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

# NVLink multicast stays off in every process (it can take the shared
# host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=python3
if [ -z "${SEGREG_NO_NCCL_SHIM:-}" ] &&
    NCCL_LIB=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0] + "/lib")' 2>/dev/null); then
    # cudarc looks for libnccl.so; the NCCL wheel ships libnccl.so.2 only.
    shim=$(mktemp -d)
    ln -sf "$NCCL_LIB/libnccl.so.2" "$shim/libnccl.so"
    export LD_LIBRARY_PATH="$shim:$NCCL_LIB:${LD_LIBRARY_PATH:-}"
fi

ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
nvidia-smi topo -m 2>/dev/null || true
"$PY" -c 'import torch; print("NCCL (PyTorch)", torch.cuda.nccl.version())' 2>/dev/null || true
if [ "${ngpu:-0}" -lt 2 ] && [ -z "${SEGREG_ALLOW_NO_GPU:-}" ]; then
    echo "needs 2 GPUs, found ${ngpu:-0}: run it with a two-GPU kind of the device tool (nvidia-h200-x2)" >&2
    exit 1
fi
[ -x "$exe" ] || { echo "missing $exe: build it with cuda-glue/gpu/build-device-bin.sh" >&2; exit 1; }

# step NAME ARGS...: both ranks, one visible GPU each, ARGS to both.
step() {
    local name=$1 dir rc0 rc1 r start=$SECONDS
    shift
    dir=$(mktemp -d "${TMPDIR:-/tmp}/never-hang-$name.XXXXXX")
    local pids=()
    for r in 0 1; do
        CUDA_VISIBLE_DEVICES=$r timeout -k 10 $((timeout_s + 30)) "$exe" \
            --rank $r --world-size 2 --device 0 --dir "$dir" --timeout "$timeout_s" \
            --call-deadline "$call_deadline" --scenario "$name" "$@" >"$dir/out.rank$r" 2>&1 &
        pids+=($!)
    done
    wait "${pids[0]}"; rc0=$?
    wait "${pids[1]}"; rc1=$?
    {
        echo "=== $name ($((SECONDS - start)) s)"
        for r in 0 1; do sed "s/^/  [rank $r] /" "$dir/out.rank$r"; done
        echo "  exit status: rank 0 $rc0, rank 1 $rc1 (124: the process's own timeout)"
    } | tee ${OUT:+"$OUT/never-hang-$name.log"}
    [ "$rc0" -eq 0 ] && [ "$rc1" -eq 0 ]
}

status=0
for s in diverge deadline costs; do
    [ "$only" = all ] || [ "$only" = "$s" ] || continue
    if [ "$s" = costs ]; then
        step costs --cycles "$iterations" || status=1
    else
        step "$s" || status=1
    fi
done
exit $status
