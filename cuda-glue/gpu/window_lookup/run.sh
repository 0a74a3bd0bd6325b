#!/usr/bin/env bash
# Builds and runs the window lookup check (check.cu) on the device machine,
# from the repository root, with cuda-glue/device-bin carried (built here by
# cuda-glue/gpu/build-device-bin.sh). Exit status: 0 pass; 1 a check failed;
# 2 it could not be built or set up. See README.md beside this file.
#
# Environment (all optional): PY (PyTorch's python, to find NCCL), NVCC,
# NCCL_INC (a folder with nccl.h and nccl_device.h), CUDA_ARCH (e.g. 90),
# NVCC_FLAGS (more nvcc arguments), SEGREG_BIN (folder of
# libsegment_registry_nccl.so).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
glue=$(cd "$here/../.." && pwd)
bin=${SEGREG_BIN:-$glue/device-bin}
PY=${PY:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=python3
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
export NCCL_NVLS_ENABLE=0

die() { echo "window_lookup: FAIL (setup: $*)"; exit 2; }

echo "=== window lookup check: setup"
[ -x "$NVCC" ] || NVCC=$(command -v nvcc) || die "no nvcc at /usr/local/cuda/bin/nvcc nor on PATH"
"$NVCC" --version | tail -n 2
lib=$bin/libsegment_registry_nccl.so
[ -f "$lib" ] || die "$lib is missing: run 'bash cuda-glue/gpu/build-device-bin.sh' on the CPU machine and carry cuda-glue/device-bin"

# NCCL: the library PyTorch loads (pip wheel nvidia-nccl-cu13).
NCCL_LIB=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0] + "/lib")' 2>&1) ||
    die "cannot find NCCL through $PY: $NCCL_LIB"
[ -f "$NCCL_LIB/libnccl.so.2" ] || die "no libnccl.so.2 in $NCCL_LIB"
echo "NCCL library: $NCCL_LIB/libnccl.so.2"

# NCCL headers with the device API: the wheel's own (same version as the
# library) first, then the system's.
version_of() {
    sed -n 's/^#define NCCL_VERSION_CODE \([0-9]*\).*/\1/p' "$1/nccl.h" | head -n 1
}
if [ -z "${NCCL_INC:-}" ]; then
    for d in "$NCCL_LIB/../include" /usr/include /usr/local/include /usr/local/cuda/include; do
        if [ -f "$d/nccl.h" ] && [ -f "$d/nccl_device.h" ]; then
            NCCL_INC=$(cd "$d" && pwd)
            break
        fi
        [ -f "$d/nccl.h" ] && echo "($d has nccl.h $(version_of "$d") but no nccl_device.h)"
    done
fi
[ -n "${NCCL_INC:-}" ] || die "no folder with nccl.h and nccl_device.h (looked in $NCCL_LIB/../include, /usr/include, /usr/local/include, /usr/local/cuda/include; set NCCL_INC)"
echo "NCCL headers: $NCCL_INC (NCCL_VERSION_CODE $(version_of "$NCCL_INC"))"

if [ -z "${CUDA_ARCH:-}" ]; then
    CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
                head -n 1 | tr -d ' .')
    [ -n "$CUDA_ARCH" ] || CUDA_ARCH=90
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

work=$(mktemp -d)
# cudarc (inside our library) looks for libnccl.so; the wheel ships
# libnccl.so.2 only. The link points at the very file PyTorch loads, so one
# NCCL is mapped whatever name it is opened by. It also serves -lnccl.
ln -sf "$NCCL_LIB/libnccl.so.2" "$work/libnccl.so"

build() {
    # shellcheck disable=SC2086 # NVCC_FLAGS: several words
    "$NVCC" -std=c++17 -O2 -arch="sm_$CUDA_ARCH" ${NVCC_FLAGS:-} "$@" \
        -I"$NCCL_INC" -I"$glue/include" "$here/check.cu" -o "$work/check" \
        -L"$work" -lnccl -L"$bin" -lsegment_registry_nccl \
        -Xlinker -rpath -Xlinker "$NCCL_LIB" -Xlinker -rpath -Xlinker "$bin"
}

echo "=== window lookup check: build (sm_$CUDA_ARCH)"
if ! build >"$work/build.log" 2>&1; then
    echo "--- nvcc output (full device API header nccl_device.h):"
    cat "$work/build.log"
    echo "--- retrying with the core device API headers only (-DCHECK_CORE_ONLY)"
    if ! build -DCHECK_CORE_ONLY >"$work/build-core.log" 2>&1; then
        echo "--- nvcc output (core headers):"
        cat "$work/build-core.log"
        die "check.cu did not compile (nvcc output above)"
    fi
    echo "built with the core headers only"
fi
grep -i "warning" "$work/build.log" 2>/dev/null | grep -v "nccl_device" | head -n 20

echo "=== window lookup check: run"
export LD_LIBRARY_PATH="$work:$NCCL_LIB:$bin:${LD_LIBRARY_PATH:-}"
"$work/check"
status=$?
case $status in
    0) ;;
    1) echo "=== window lookup check: FAILED (a check failed; see FAIL lines)" ;;
    2) echo "=== window lookup check: FAILED (setup)" ;;
    *) echo "=== window lookup check: FAILED (the program died with status $status)"
       status=1 ;;
esac
exit $status
