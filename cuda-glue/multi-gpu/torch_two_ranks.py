#!/usr/bin/env python3
"""Two ranks, two NCCL process groups, one MemPool on our allocator (issue 8).

Run with torchrun, one process per GPU (device machine, see README.md):

    NCCL_NVLS_ENABLE=0 /opt/torch/.venv/bin/python3 -m torch.distributed.run \\
        --standalone --nproc_per_node=2 cuda-glue/multi-gpu/torch_two_ranks.py \\
        --lib cuda-glue/device-bin/libsegment_registry_nccl.so

Every rank loads libsegment_registry_nccl.so as a CUDAPluggableAllocator,
makes two NCCL process groups A and B over all ranks (besides WORLD) and
attaches their raw ncclComm_t in that order. Then, for several cycles, with
one MemPool shared by both groups:

  region 1 (inside use_mem_pool): tensors of 16 MiB, 12 MiB and a small one
  end of region: segreg_register(A), then segreg_register(B)   (collective)
  all-reduce on A and on B, sums checked
  free two tensors (their blocks stay cached in the pool), region 2: a
  tensor of the same size (served from the cache: nothing new to register)
  and a 24 MiB one (a new segment)
  end of region: segreg_register(A), then segreg_register(B)
  all-reduce on the new tensors, sums checked
  delete the pool: PyTorch hands every segment to segreg_free, which
  deregisters its windows before ncclMemFree; the next cycle's pool gets
  the freed addresses back and registers them anew

Each pass is logged as (cycle, pass, comm, segments registered, live
segments, live bytes, windows registered so far); the logs of all ranks are
gathered and must be identical (rank 0 compares them), and every rank writes
its log to --log-dir. Free device memory (cudaMemGetInfo) after each cycle
must not fall by more than --tolerance-mib after the warm-up cycles. A
watchdog ends the process with status 124 after --timeout seconds.

Exits 0 on success ("torch_two_ranks: PASS" on rank 0), 1 on a failed check.
"""

import argparse
import ctypes
import gc
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
# The C ABI's signatures and the stats layout live in one place: the
# one-rank script (tests/header.rs checks its field list against the header).
sys.path.insert(0, os.path.join(HERE, "..", "gpu"))
import torch_mempool as tm  # noqa: E402

MIB = 1 << 20
SEGREG_OK = 0
SEGREG_ERR_NO_WINDOW = -6


class Check(Exception):
    pass


RANK = int(os.environ.get("RANK", "0"))


def say(msg):
    print(f"[rank {RANK}] {msg}", flush=True)


def check(cond, what):
    if not cond:
        raise Check(what)
    say(f"ok: {what}")


def start_watchdog(seconds, where):
    def expire():
        print(f"[rank {RANK}] TIMEOUT after {seconds:.0f} s, in step: {where[0]}",
              file=sys.stderr, flush=True)
        os._exit(124)

    t = threading.Timer(seconds, expire)
    t.daemon = True
    t.start()


def comm_ptr(group):
    backend = group._get_backend(torch.device("cuda"))
    return backend._comm_ptr()


def setup_window_get(lib):
    """segreg_window_get, where the library has it (newer builds)."""
    f = getattr(lib, "segreg_window_get", None)
    if f is None:
        return None
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    f.restype = ctypes.c_int
    return f


def has_window(window_get, comm, t):
    """SEGREG_OK or SEGREG_ERR_NO_WINDOW: the tensor's segment is registered."""
    win, off = ctypes.c_void_p(), ctypes.c_size_t()
    rc = window_get(ctypes.c_void_p(comm), ctypes.c_void_p(t.data_ptr()),
                    t.numel() * t.element_size(), ctypes.byref(win), ctypes.byref(off))
    return rc


def wait_until(done, what, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise Check(f"timed out waiting for {what}")
        gc.collect()
        torch.cuda.synchronize()
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=os.path.join(HERE, "..", "device-bin",
                                                  "libsegment_registry_nccl.so"))
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tolerance-mib", type=float, default=16.0)
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--log-dir", default=None)
    args = ap.parse_args()
    where = ["starting"]
    start_watchdog(args.timeout, where)

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    path = os.path.abspath(args.lib)
    say(f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, "
        f"{torch.cuda.get_device_name(dev)} (cuda:{local}), world {world}")

    where[0] = "loading the library"
    lib = tm.load(path)
    if lib.segreg_init() != 0:
        raise Check(f"segreg_init: {tm.last_error(lib)}")
    check(lib.segreg_backend() == b"nccl", "library initialized on real NCCL")
    window_get = setup_window_get(lib)
    allocator = torch.cuda.memory.CUDAPluggableAllocator(path, "segreg_alloc", "segreg_free")

    where[0] = "init_process_group and the groups"
    dist.init_process_group("nccl", device_id=dev)
    ranks = list(range(world))
    group_a = dist.new_group(ranks, backend="nccl")
    group_b = dist.new_group(ranks, backend="nccl")
    for g in (dist.group.WORLD, group_a, group_b):
        warm = torch.ones(1, device=dev)
        dist.all_reduce(warm, group=g)  # creates the group's NCCL comm
    torch.cuda.synchronize()
    libs = tm.nccl_libraries()
    check(len(libs) == 1, f"one NCCL library in the process (torch's and ours): {sorted(libs)}")
    ca, cb = comm_ptr(group_a), comm_ptr(group_b)
    check(bool(ca) and bool(cb) and ca != cb, f"two raw comms A {ca:#x}, B {cb:#x}")
    comms = {"A": ca, "B": cb}
    for name in ("A", "B"):  # attach order: the same on every rank
        cid = lib.segreg_attach(ctypes.c_void_p(comms[name]))
        check(cid > 0, f"comm {name} attached as id {cid} ({tm.last_error(lib)})")

    tri = world * (world + 1) / 2  # sum of (rank + 1) over the ranks
    log, free_after, ptrs = [], [], []

    def agree(cycle, p):
        """Before a (collective) pass: every rank must hold the same
        segments, else the registrations would differ and hang; fail
        loudly instead. Compared over WORLD, not over A or B."""
        s = tm.stats(lib)
        mine = (s.live_segments, s.live_bytes)
        every = [None] * world
        dist.all_gather_object(every, mine)
        if any(x != mine for x in every):
            raise Check(f"cycle {cycle} pass {p}: ranks hold different segments "
                        f"(live_segments, live_bytes) per rank: {every}")

    def passes(cycle, p):
        agree(cycle, p)
        counts = {}
        for name in ("A", "B"):
            where[0] = f"cycle {cycle} pass {p} comm {name}"
            n = lib.segreg_register(ctypes.c_void_p(comms[name]))
            if n < 0:
                raise Check(f"cycle {cycle} pass {p} on {name}: {tm.last_error(lib)}")
            s = tm.stats(lib)
            log.append({"cycle": cycle, "pass": p, "comm": name, "registered": n,
                        "live_segments": s.live_segments, "live_bytes": s.live_bytes,
                        "windows_registered": s.windows_registered,
                        "null_windows": s.null_windows})
            counts[name] = n
        return counts

    def windows_cover(tensors):
        if window_get is None:
            return
        for name in ("A", "B"):
            codes = [has_window(window_get, comms[name], t) for t in tensors]
            check(all(c in (SEGREG_OK, SEGREG_ERR_NO_WINDOW) for c in codes),
                  f"every tensor's segment registered with {name} (window_get {codes})")

    for cycle in range(1, args.cycles + 1):
        pool = torch.cuda.MemPool(allocator.allocator())
        before = tm.stats(lib)
        where[0] = f"cycle {cycle} region 1"
        with torch.cuda.use_mem_pool(pool):
            a = torch.full((4 * MIB,), float(rank + 1), device=dev)        # 16 MiB
            b = torch.arange(3 * MIB, device=dev, dtype=torch.float32)     # 12 MiB
            c = torch.full((1000,), float(rank + 1), device=dev)           # small block
        n1 = passes(cycle, 1)
        check(n1["A"] == n1["B"] and n1["A"] >= 3, f"cycle {cycle}: each pass registered "
              f"{n1['A']} new segments (A) / {n1['B']} (B)")
        check(tm.stats(lib).live_segments - before.live_segments == n1["A"],
              "the passes registered exactly the segments the region allocated")
        windows_cover([a, b, c])
        ptrs.append([a.data_ptr(), b.data_ptr()])
        where[0] = f"cycle {cycle} all-reduce 1"
        dist.all_reduce(a, group=group_a)
        dist.all_reduce(b, group=group_b)
        dist.all_reduce(c, group=group_a)
        torch.cuda.synchronize()
        check(bool(torch.all(a == tri)), f"cycle {cycle}: all-reduce on A (16 MiB)")
        check(torch.equal(b, torch.arange(3 * MIB, device=dev, dtype=torch.float32) * world),
              f"cycle {cycle}: all-reduce on B (12 MiB)")
        check(bool(torch.all(c == tri)), f"cycle {cycle}: all-reduce on A (small block)")

        # Free some: the blocks go back to the pool's cache (segments stay).
        # ProcessGroupNCCL may hold finished collectives' tensors a little
        # longer: wait until the blocks are really free, so that region 2
        # is served the same way on every rank.
        allocated = torch.cuda.memory_allocated(dev)
        del b, c
        wait_until(lambda: torch.cuda.memory_allocated(dev) <= allocated - 12 * MIB,
                   f"cycle {cycle}: the freed tensors' blocks back in the pool")
        where[0] = f"cycle {cycle} region 2"
        with torch.cuda.use_mem_pool(pool):
            b2 = torch.full((3 * MIB,), 2.0 * (rank + 1), device=dev)    # cached 12 MiB block
            d = torch.full((6 * MIB,), 3.0 * (rank + 1), device=dev)     # 24 MiB: new segment
        n2 = passes(cycle, 2)
        check(n2["A"] == n2["B"] >= 1, f"cycle {cycle}: region 2 registered {n2['A']} "
              "new segment(s) per comm (the cached block is not registered again)")
        windows_cover([a, b2, d])
        where[0] = f"cycle {cycle} all-reduce 2"
        dist.all_reduce(b2, group=group_b)
        dist.all_reduce(d, group=group_a)
        torch.cuda.synchronize()
        check(bool(torch.all(b2 == 2 * tri)) and bool(torch.all(d == 3 * tri)),
              f"cycle {cycle}: all-reduces on the region-2 tensors")

        # Free everything: deleting the pool hands each segment to
        # segreg_free (deregister first, then ncclMemFree).
        where[0] = f"cycle {cycle} freeing the pool"
        del a, b2, d
        del pool
        s = tm.wait_for(lib, lambda s: s.live_segments == 0 and s.pending_frees == 0)
        check(s.live_segments == 0 and s.frees == s.allocs and s.mem_frees == s.allocs,
              f"cycle {cycle}: every segment freed ({s.allocs} so far)")
        check(s.windows_deregistered == s.windows_registered and s.windows_live == 0,
              f"cycle {cycle}: every window deregistered before its memory was freed")
        free_after.append(torch.cuda.mem_get_info(dev)[0])

    reused = sum(1 for i in range(1, len(ptrs)) if set(ptrs[i]) & set(ptrs[i - 1]))
    say(f"cycles whose tensors got the previous cycle's addresses back: {reused} of "
        f"{len(ptrs) - 1} (informational)")
    say("free device MiB after each cycle: " + " ".join(f"{f / MIB:.0f}" for f in free_after))
    if len(free_after) > args.warmup >= 1:
        loss = (free_after[args.warmup - 1] - free_after[-1]) / MIB
        check(loss <= args.tolerance_mib,
              f"free device memory after warm-up: {loss:+.1f} MiB lost (allowed "
              f"{args.tolerance_mib})")

    # Compare the registration logs of all ranks.
    where[0] = "comparing logs"
    final = tm.stats(lib).as_dict()
    mine = {"log": log, "final": {k: final[k] for k in (
        "allocs", "frees", "passes", "windows_registered", "null_windows",
        "windows_deregistered", "register_failures", "deregister_failures",
        "mem_frees", "mem_free_failures", "bad_frees")}}
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        with open(os.path.join(args.log_dir, f"torch.rank{rank}.log"), "w") as f:
            for entry in log:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        for r in range(1, world):
            check(len(every[r]["log"]) == len(log),
                  f"rank {r} ran {len(every[r]['log'])} passes, rank 0 ran {len(log)}")
            diff = [i for i, (x, y) in enumerate(zip(log, every[r]["log"])) if x != y]
            check(not diff, f"registration logs of ranks 0 and {r} identical "
                  f"({len(log)} passes" + (f"; first difference at {diff[0]}: "
                                           f"{log[diff[0]]} vs {every[r]['log'][diff[0]]}"
                                           if diff else "") + ")")
            check(every[r]["final"] == mine["final"], f"rank {r}'s final figures equal rank 0's")

    where[0] = "detach and destroy"
    for name in ("A", "B"):
        rc = lib.segreg_detach(ctypes.c_void_p(comms[name]))
        check(rc == 0, f"detach {name}: no window left to deregister ({rc}, "
              f"{tm.last_error(lib)})")
    dist.barrier()
    dist.destroy_process_group()
    s = tm.stats(lib)
    check(s.register_failures + s.deregister_failures + s.mem_free_failures == 0,
          "no NCCL call failed")
    check(s.windows_registered + s.null_windows > 0, f"{s.windows_registered} windows, "
          f"{s.null_windows} null windows registered in all")
    if rank == 0:
        print("torch_two_ranks: PASS", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Check as e:
        print(f"[rank {RANK}] torch_two_ranks: FAIL: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
