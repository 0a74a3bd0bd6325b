#!/usr/bin/env bash
# Runs the Python package's GPU checks on a GPU host (PyTorch, CUDA and
# NCCL installed; no Rust), from the repository root, on every GPU it has
# (the SGLang-shaped script alone, then under torchrun with one process per
# GPU, the registration benchmark, and the windows benchmark under torchrun;
# ONLY=step1,step2 picks steps), with the wheel that
# `bash python/gpu/build-wheel.sh` left in .whl/ carried. Every step runs;
# the exit status is non-zero if any failed. Output goes to stdout and, per
# step, to $OUT (when set).
set -uo pipefail
PY=${PY:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=python3
# NVLink multicast stays off in every process (it can take the shared
# host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
site=$(mktemp -d)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" .whl/segment_registry-*.whl || exit 1
export PYTHONPATH=$site
# cudarc looks for libnccl.so; the NCCL wheel ships libnccl.so.2 only.
NCCL_LIB=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0] + "/lib")')
shim=$(mktemp -d)
ln -sf "$NCCL_LIB/libnccl.so.2" "$shim/libnccl.so"
export LD_LIBRARY_PATH="$shim:$NCCL_LIB:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "NCCL", torch.cuda.nccl.version())'
[ -n "${OUT:-}" ] && export OUT  # the scripts keep extra files there
status=0
step() {
  local name=$1; shift
  # ONLY=name1,name2 runs those steps alone.
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
  echo; echo "=== $name: $*"
  if [ -n "${OUT:-}" ]; then
    "$@" 2>&1 | tee "$OUT/$name.log"; local rc=${PIPESTATUS[0]}
  else
    "$@"; local rc=$?
  fi
  [ "$rc" = 0 ] || { echo "=== FAILED ($rc): $name"; status=1; }
}
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
step sglang-shape "$PY" python/gpu/sglang_shape.py
# One process per GPU (on one GPU: the torchrun path with a world of one).
step sglang-shape-torchrun "$PY" -m torch.distributed.run --standalone \
  --nproc_per_node="${ngpu:-1}" python/gpu/sglang_shape.py
step bench-register "$PY" python/gpu/bench_register.py
# All-reduce on registered against ordinary buffers, 1 KiB to 256 MiB, and
# the registration costs at this rank count.
step bench-windows "$PY" -m torch.distributed.run --standalone \
  --nproc_per_node="${ngpu:-1}" python/gpu/bench_windows.py
exit $status
