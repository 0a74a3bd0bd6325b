#!/usr/bin/env python3
"""Our cdylib as PyTorch's allocator for a torch.cuda.MemPool, on real NCCL.

Loads libsegment_registry_nccl.so as a CUDAPluggableAllocator inside a
torch.cuda.MemPool, allocates tensors in the pool, registers their segments
with the raw ncclComm_t of a one-rank NCCL process group (the backend's
_comm_ptr()), runs all-reduces on them, frees everything (deleting the pool
hands each segment back to segreg_free, which deregisters its window before
ncclMemFree), detaches, and checks results and the library's stats.

Usage (device machine, see cuda-glue/gpu/README.md):
    NCCL_NVLS_ENABLE=0 python3 cuda-glue/gpu/torch_mempool.py \
        --lib cuda-glue/device-bin/libsegment_registry_nccl.so

Exits 0 on success, 1 with a message on the first failed check.
"""

import argparse
import ctypes
import gc
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

# Field order of `segreg_stats` (include/segment_registry.h); tests/header.rs
# checks this list against the header.
STATS_FIELDS = [
    "live_segments",
    "live_bytes",
    "allocs",
    "alloc_failures",
    "frees",
    "bad_frees",
    "passes",
    "windows_registered",
    "null_windows",
    "register_failures",
    "windows_deregistered",
    "windows_live",
    "deregisters_deferred",
    "handed_back",
    "deregister_failures",
    "windows_stuck",
    "pending_frees",
    "mem_frees",
    "mem_free_failures",
    "comms_attached",
    "comms_failed",
    "sim_violations",
    "orphans",
    "agreements",
    "diverged",
    "agreement_failures",
    "timeouts",
    "stalls",
    "comms_aborted",
    "windows_dropped",
]


class SegregStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in STATS_FIELDS]

    def as_dict(self):
        return {name: getattr(self, name) for name in STATS_FIELDS}


class Check(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Check(what)
    print(f"  ok: {what}")


def load(path):
    lib = ctypes.CDLL(path)
    vp, i, i64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
    sigs = {
        "segreg_init": ([], i),
        "segreg_backend": ([], ctypes.c_char_p),
        "segreg_alloc": ([sz, i, vp], vp),
        "segreg_free": ([vp, sz, i, vp], None),
        "segreg_attach": ([vp], i64),
        "segreg_register": ([vp], i),
        "segreg_register_all": ([], i),
        "segreg_detach": ([vp], i),
        "segreg_stats": ([ctypes.POINTER(SegregStats), sz], i),
        "segreg_last_error": ([], ctypes.c_char_p),
    }
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res
    return lib


def last_error(lib):
    e = lib.segreg_last_error()
    return e.decode() if e else None


def stats(lib):
    s = SegregStats()
    rc = lib.segreg_stats(ctypes.byref(s), ctypes.sizeof(s))
    if rc != 0:
        raise Check(f"segreg_stats failed: {last_error(lib)}")
    return s


def wait_for(lib, done, seconds=10.0):
    """Collects garbage and empties caches until `done(stats)` or timeout."""
    deadline = time.monotonic() + seconds
    while True:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        s = stats(lib)
        if done(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def nccl_libraries():
    """Distinct NCCL files mapped into this process."""
    seen = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and "libnccl" in parts[5]:
                seen.add(os.path.realpath(parts[5]))
    return seen


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--lib",
        default=os.path.join(here, "..", "device-bin", "libsegment_registry_nccl.so"),
    )
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args()
    path = os.path.abspath(args.lib)
    dev = torch.device("cuda", args.device)
    torch.cuda.set_device(dev)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {torch.cuda.get_device_name(dev)}")

    lib = load(path)
    if lib.segreg_init() != 0:
        raise Check(f"segreg_init: {last_error(lib)}")
    check(lib.segreg_backend() == b"nccl", "library initialized on real NCCL")
    libs = nccl_libraries()
    check(len(libs) == 1, f"one NCCL library in the process (torch's and ours): {sorted(libs)}")

    allocator = torch.cuda.memory.CUDAPluggableAllocator(path, "segreg_alloc", "segreg_free")
    pool = torch.cuda.MemPool(allocator.allocator())

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    warm = torch.ones(1, device=dev)
    dist.all_reduce(warm)  # creates the NCCL comm
    torch.cuda.synchronize()
    backend = dist.group.WORLD._get_backend(torch.device("cuda"))
    comm = ctypes.c_void_p(backend._comm_ptr())
    check(bool(comm.value), f"raw ncclComm_t {comm.value:#x}")
    cid = lib.segreg_attach(comm)
    check(cid > 0, f"attached as comm id {cid} ({last_error(lib)})")
    check(lib.segreg_attach(comm) == -1 and "already attached" in (last_error(lib) or ""),
          "a second attach of the same comm is refused")

    n = 4 << 20
    with torch.cuda.use_mem_pool(pool):
        a = torch.full((n,), 1.5, device=dev)              # 16 MiB
        b = torch.arange(n // 4, device=dev, dtype=torch.float32)  # 4 MiB
        c = torch.zeros(1000, device=dev)                  # small-block segment
    s = stats(lib)
    print(f"  after allocation: {s.as_dict()}")
    check(s.allocs >= 2 and s.live_segments == s.allocs, f"{s.allocs} segments tracked, none registered yet")

    registered = lib.segreg_register(comm)
    check(registered == s.live_segments, f"pass registered {registered} segments ({last_error(lib)})")
    s = stats(lib)
    check(s.windows_registered + s.null_windows == registered,
          f"{s.windows_registered} windows, {s.null_windows} null windows")
    check(lib.segreg_register(comm) == 0, "a second pass registers nothing")
    check(lib.segreg_register_all() == 0, "a pass over all comms registers nothing")

    dist.all_reduce(a)
    dist.all_reduce(b)
    c += 2.0
    dist.all_reduce(c)
    torch.cuda.synchronize()
    check(bool(torch.all(a == 1.5)), "all-reduce on a registered 16 MiB buffer")
    check(torch.equal(b, torch.arange(n // 4, device=dev, dtype=torch.float32)),
          "all-reduce on a registered 4 MiB buffer")
    check(bool(torch.all(c == 2.0)), "all-reduce on a small-block buffer")

    # Bad input through the C ABI: refused, nothing changes.
    lib.segreg_free(ctypes.c_void_p(0xDEAD0000), 0, args.device, None)
    check("not a live allocation" in (last_error(lib) or ""), "free of an unknown pointer is refused")
    check(lib.segreg_register(ctypes.c_void_p(0x1234000)) == -1, "register on an unknown comm is refused")

    # Free: tensors first, then the pool (its destructor releases the
    # cached segments through segreg_free). ProcessGroupNCCL may keep
    # finished collectives' tensors stashed a little longer: poll.
    del a, b, c
    del pool
    s = wait_for(lib, lambda s: s.live_segments == 0)
    print(f"  after freeing the pool: {s.as_dict()}")
    freed_before_detach = s.live_segments == 0
    check(s.windows_deregistered + s.windows_live == s.windows_registered,
          "windows: every one deregistered or still live, none lost")

    # Detach before destroying the group: deregisters what is still held.
    rc = lib.segreg_detach(comm)
    check(rc >= 0, f"detach deregistered {rc} window(s) still held ({last_error(lib)})")
    dist.destroy_process_group()
    s = wait_for(lib, lambda s: s.live_segments == 0)
    print(f"  final: {s.as_dict()}")
    if not freed_before_detach:
        print("  note: some segments were freed only after the group was destroyed")
    check(s.live_segments == 0 and s.frees == s.allocs, f"all {s.allocs} segments freed")
    check(s.mem_frees == s.allocs and s.pending_frees == 0, "every segment went back to ncclMemFree")
    check(s.windows_deregistered == s.windows_registered and s.windows_live == 0,
          "every window deregistered before its memory was freed")
    check(s.deregister_failures == 0 and s.mem_free_failures == 0 and s.register_failures == 0,
          "no NCCL call failed")
    check(s.bad_frees == 1, "exactly the one deliberate bad free")
    print("torch_mempool: PASS")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Check as e:
        print(f"torch_mempool: FAIL: {e}", file=sys.stderr)
        sys.exit(1)
