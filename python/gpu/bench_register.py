#!/usr/bin/env python3
"""Registration with nothing pending, side by side, on one GPU; and the allocation path.

Each row times one call alone (``timeit`` with a statement string, no
wrapper; the loop count is calibrated so a repeat lasts about
``--target`` seconds, at most ``--loops``), repeated ``--repeats`` times;
the table gives the median and the minimum per call, in microseconds.

Registration with nothing pending (every segment already registered):

* ``Allocator.register(comm)`` through PyO3, on a comm attached unchecked
  (the registry's O(1) return) and on one attached checked (the ranks'
  agreement: one small all-reduce on the glue's private comm, every call);
* ``segreg_register`` of the C ABI through ctypes, on the unchecked comm;
* vLLM's way: ``MemPool.snapshot()`` and a Python set of registered
  segment addresses (registering nothing new);
* an SGLang-shaped C baseline (``sglang_baseline.c``, built here with
  ``gcc -O2 -shared -fPIC``): a mutex-guarded vector of segments and a
  per-comm index; its register locks, compares the index with the size,
  returns.

Then the whole region (enter and exit with nothing new:
``SymmetricMemory.region`` unchecked and checked,
``segment_registry.torch.use_symmetric_memory``, and the floor:
``torch.cuda.use_mem_pool`` alone, which is all SGLang's region does at
exit), and the allocation path: our ``alloc`` + ``free`` (PyO3, and the C
ABI's ``segreg_alloc`` / ``segreg_free`` through ctypes) against
``ncclMemAlloc`` + ``ncclMemFree`` through ctypes on the ``libnccl.so.2``
of the ``nvidia.nccl`` wheel.

Prints a markdown table at the end. Usage (GPU host, repository root)::

    python3 python/gpu/bench_register.py [--nonblocking] [--repeats 7] [--loops 100000]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
from dataclasses import dataclass
from typing import Any

for _k, _v in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(_k, _v)

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--nonblocking", action="store_true", help="TORCH_NCCL_USE_COMM_NONBLOCKING=1")
ARGS.add_argument("--repeats", type=int, default=7)
ARGS.add_argument("--loops", type=int, default=100_000, help="at most this many calls a repeat")
ARGS.add_argument("--target", type=float, default=0.2, help="seconds a repeat should last")
ARGS.add_argument("--device", type=int, default=0)
OPTS = ARGS.parse_args()
if OPTS.nonblocking:
    os.environ.setdefault("TORCH_NCCL_USE_COMM_NONBLOCKING", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))  # this checkout's python/, unless installed

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import segment_registry.torch as st  # noqa: E402
from segment_registry import _native  # noqa: E402
from segment_registry.region import SymmetricMemory  # noqa: E402


@dataclass
class Row:
    """One measured path."""

    group: str
    what: str
    median_us: float
    min_us: float
    loops: int
    note: str = ""


ROWS: list[Row] = []


def bench(group: str, what: str, stmt: str, env: dict[str, Any], note: str = "") -> Row:
    """Times ``stmt`` (a statement string over ``env``) as the module's docs say."""
    timer = timeit.Timer(stmt, globals=env)
    loops, took = 1, 0.0
    while loops < OPTS.loops:  # calibrate: about OPTS.target seconds a repeat
        took = timer.timeit(loops)
        if took >= OPTS.target / 4:
            break
        loops *= 4
    if took > 0:
        loops = max(1, min(OPTS.loops, int(loops * OPTS.target / took)))
    per_call = [t / loops * 1e6 for t in timer.repeat(repeat=OPTS.repeats, number=loops)]
    row = Row(group, what, statistics.median(per_call), min(per_call), loops, note)
    ROWS.append(row)
    print(f"{what:<58} {row.median_us:10.3f} µs (min {row.min_us:.3f}, {loops} loops)", flush=True)
    return row


def build_baseline(workdir: str) -> ctypes.CDLL:
    """Compiles sglang_baseline.c and loads it."""
    out = os.path.join(workdir, "libsglang_baseline.so")
    cmd = ["gcc", "-O2", "-shared", "-fPIC", "-o", out, os.path.join(HERE, "sglang_baseline.c")]
    subprocess.run(cmd + ["-lpthread"], check=True)
    lib = ctypes.CDLL(out)
    lib.sgl_track.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.sgl_track.restype = ctypes.c_int
    lib.sgl_attach.argtypes = [ctypes.c_void_p]
    lib.sgl_attach.restype = ctypes.c_int
    lib.sgl_register.argtypes = [ctypes.c_void_p]
    lib.sgl_register.restype = ctypes.c_long
    return lib


def load_nccl() -> ctypes.CDLL:
    """The libnccl.so.2 of the nvidia.nccl wheel (the one PyTorch loaded)."""
    try:
        import nvidia.nccl as wheel  # type: ignore[import-not-found]

        path = os.path.join(list(wheel.__path__)[0], "lib", "libnccl.so.2")
    except ImportError:
        path = "libnccl.so.2"
    nccl = ctypes.CDLL(path)
    nccl.ncclMemAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    nccl.ncclMemAlloc.restype = ctypes.c_int
    nccl.ncclMemFree.argtypes = [ctypes.c_void_p]
    nccl.ncclMemFree.restype = ctypes.c_int
    print(f"NCCL for the bare calls: {path}")
    return nccl


def load_capi() -> ctypes.CDLL:
    """Our C ABI: the extension's own file (the same process-wide allocator)."""
    lib = ctypes.CDLL(_native.__file__)
    lib.segreg_register.argtypes = [ctypes.c_void_p]
    lib.segreg_register.restype = ctypes.c_int
    lib.segreg_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.segreg_alloc.restype = ctypes.c_void_p
    lib.segreg_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.segreg_free.restype = None
    return lib


def main() -> None:
    dev = torch.device("cuda", OPTS.device)
    torch.cuda.set_device(dev)
    workdir = tempfile.mkdtemp(prefix="segreg-bench.")
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {torch.cuda.get_device_name(dev)}, "
        f"non-blocking comms: {bool(OPTS.nonblocking)}"
    )
    dist.init_process_group(
        "nccl", init_method=f"file://{workdir}/store", rank=0, world_size=1, device_id=dev
    )
    world, other = dist.group.WORLD, dist.new_group([0])
    for g in (world, other):
        dist.all_reduce(torch.ones(1, device=dev), group=g)
    torch.cuda.synchronize()

    st.configure(checked=True)
    sm_checked = st.symmetric_memory()  # the module's, checked
    alloc = sm_checked.allocator
    hooks = sm_checked.hooks
    pool = st.pool()
    sm_unchecked = SymmetricMemory(alloc, hooks, checked=False)
    comm_u, comm_c = hooks.comm_of(world), hooks.comm_of(other)

    # A few segments, every one registered with both comms: nothing pending.
    keep = []
    with sm_unchecked.region(world):  # attaches world unchecked
        keep += [torch.empty(1 << 18, device=dev), torch.empty(3 << 20, device=dev)]
    with sm_checked.region(other):  # attaches other checked
        keep += [torch.empty(16 << 20, device=dev)]
    with sm_unchecked.region(world):
        pass
    torch.cuda.synchronize()
    infos = {c.comm: c for c in alloc.comms()}
    assert not infos[comm_u].checked and infos[comm_c].checked
    assert infos[comm_u].pending == 0 and infos[comm_c].pending == 0
    segments = [(s["address"], s["total_size"]) for s in pool.snapshot()]
    print(f"{len(segments)} segments in the pool, all registered with both comms")

    capi = load_capi()
    base = build_baseline(workdir)
    assert base.sgl_attach(ctypes.c_void_p(comm_u)) == 0
    for addr, size in segments:
        assert base.sgl_track(ctypes.c_void_p(addr), size) == 0
    assert base.sgl_register(ctypes.c_void_p(comm_u)) == len(segments)
    registered = {addr for addr, _ in segments}  # vLLM's _registered_base_addrs

    def vllm_register() -> int:
        """vLLM's region exit: snapshot the pool, register what the set lacks."""
        new = 0
        for seg in pool.snapshot():
            if seg["address"] not in registered:
                registered.add(seg["address"])  # (ncclCommWindowRegister here)
                new += 1
        return new

    # Sanity: each path registers nothing.
    assert alloc.register(comm_u).registered == []
    assert alloc.register(comm_c).registered == []
    assert capi.segreg_register(ctypes.c_void_p(comm_u)) == 0
    assert vllm_register() == 0
    assert base.sgl_register(ctypes.c_void_p(comm_u)) == 0

    print("\n# registration with nothing pending")
    reg = "registration, nothing pending"
    env: dict[str, Any] = {
        "reg": alloc.register,
        "cu": comm_u,
        "cc": comm_c,
        "capi_reg": capi.segreg_register,
        "cu_p": ctypes.c_void_p(comm_u),
        "vllm": vllm_register,
        "sgl_reg": base.sgl_register,
    }
    env["is_attached"] = alloc.is_attached
    env["py_fn"] = lambda comm: comm
    bench(reg, "floor: a Python function of one argument", "py_fn(cu)", env)
    bench(reg, "floor: Allocator.is_attached(comm), PyO3, no pass", "is_attached(cu)", env)
    bench(reg, "ours: Allocator.register(comm), PyO3, unchecked", "reg(cu)", env)
    bench(reg, "ours: Allocator.register(comm), PyO3, checked", "reg(cc)", env, "one all-reduce")
    bench(reg, "ours: segreg_register(comm), C ABI via ctypes, unchecked", "capi_reg(cu_p)", env)
    bench(reg, "vLLM: MemPool.snapshot() + set of registered addresses", "vllm()", env)
    bench(reg, "SGLang-shaped C: mutex + vector + per-comm index, ctypes", "sgl_reg(cu_p)", env)

    print("\n# the whole region, nothing new")
    region = "region enter + exit, nothing new"
    env = {
        "ru": sm_unchecked.region,
        "rc": sm_checked.region,
        "use": st.use_symmetric_memory,
        "use_mem_pool": torch.cuda.use_mem_pool,
        "pool": pool,
        "w": world,
        "o": other,
    }
    bench(region, "ours: SymmetricMemory.region, unchecked", "with ru(w):\n    pass", env)
    bench(region, "ours: SymmetricMemory.region, checked", "with rc(o):\n    pass", env)
    bench(region, "ours: use_symmetric_memory(group), checked", "with use(o):\n    pass", env)
    bench(
        region,
        "floor: torch.cuda.use_mem_pool(pool) alone (SGLang's exit)",
        "with use_mem_pool(pool):\n    pass",
        env,
    )
    print("\n# the region's parts (the torch hooks)")
    part = "region parts"
    env.update(
        hooks=hooks,
        backend_of=lambda g: g._get_backend(torch.device("cuda", torch.cuda.current_device())),
    )
    bench(part, "hooks.comm_of(group), remembered", "hooks.comm_of(w)", env)
    bench(part, "PyTorch: _get_backend(device)._comm_ptr()", "backend_of(w)._comm_ptr()", env)
    bench(part, "hooks.is_capturing()", "hooks.is_capturing()", env)
    bench(
        part,
        "hooks.enter_pool + leave_pool",
        "hooks.enter_pool(False); hooks.leave_pool(False)",
        env,
    )

    print("\n# the allocation path: alloc + free")
    nccl = load_nccl()
    for size in (2 << 20, 32 << 20):
        label = f"alloc + free, {size >> 20} MiB"
        env = {
            "a": alloc.alloc,
            "f": alloc.free,
            "ca": capi.segreg_alloc,
            "cf": capi.segreg_free,
            "ma": nccl.ncclMemAlloc,
            "mf": nccl.ncclMemFree,
            "byref": ctypes.byref,
            "p": ctypes.c_void_p(),
            "sz": size,
            "dev": OPTS.device,
        }
        bare = bench(
            label, "bare: ncclMemAlloc + ncclMemFree via ctypes", "ma(byref(p), sz); mf(p)", env
        )
        ours = bench(label, "ours: Allocator.alloc + free, PyO3", "f(a(sz, dev))", env)
        ours_c = bench(
            label,
            "ours: segreg_alloc + segreg_free, C ABI via ctypes",
            "cf(ca(sz, dev, None), sz, dev, None)",
            env,
        )
        for r in (ours, ours_c):
            r.note = (
                f"{r.median_us - bare.median_us:+.2f} µs over bare (median), "
                f"{r.min_us - bare.min_us:+.2f} (min)"
            )
    s = alloc.stats_dict()
    assert s["alloc_failures"] == 0 and s["bad_frees"] == 0, s

    print(f"\n## Results ({torch.cuda.get_device_name(dev)}, median of {OPTS.repeats} repeats)\n")
    print("| measured | path | µs per call (median) | min | loops | note |")
    print("|---|---|---:|---:|---:|---|")
    for r in ROWS:
        print(
            f"| {r.group} | {r.what} | {r.median_us:.3f} | {r.min_us:.3f} | {r.loops} | {r.note} |"
        )
    del keep
    sm_unchecked.close()
    st.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
