#!/usr/bin/env bash
# Runs on the device machine from the repository root, with
# cuda-glue/device-bin carried (see README.md). Every step runs; the exit
# status is non-zero if any failed.
set -uo pipefail
bin=cuda-glue/device-bin
PY=${PY:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=python3
# NVLink multicast stays off in every process (it can take the shared
# host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# cudarc looks for libnccl.so; the wheel ships libnccl.so.2 only.
NCCL_LIB=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0] + "/lib")')
shim=$(mktemp -d)
ln -sf "$NCCL_LIB/libnccl.so.2" "$shim/libnccl.so"
export LD_LIBRARY_PATH="$shim:$NCCL_LIB:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
step() { echo; echo "=== $*"; "$@" || { echo "=== FAILED ($?): $*"; status=1; }; }
step "$bin/gpu_real" --ignored --test-threads=1 --nocapture
step "$bin/segment-registry-demo" --real --iters 200
step "$bin/checked_costs" "${CHECKED_COSTS_ITERS:-2000}"
step "$PY" cuda-glue/gpu/torch_mempool.py --lib "$bin/libsegment_registry_nccl.so"
exit $status
