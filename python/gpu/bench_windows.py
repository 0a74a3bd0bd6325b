#!/usr/bin/env python3
"""What symmetric windows buy: all-reduce on registered against ordinary buffers.

One process per GPU (``torchrun --nproc_per_node=N``; one process alone is a
world of one, where NCCL takes its one-rank path and nothing differs). For
each size from 1 KiB to 256 MiB (float32 sum, in place):

* *ordinary*: a tensor from PyTorch's default allocator;
* *registered*: a tensor allocated in a ``use_symmetric_memory(group)``
  region of ``segment_registry.torch``, whose exit registered its segment
  as a window (``NCCL_WIN_COLL_SYMMETRIC``) with the group's comm.

Each is warmed up, then timed with CUDA events over ``--iters`` calls
(fewer for the large sizes); the result of one call is checked. Latency
is the mean per call; bus bandwidth is ``2 (n - 1) / n * bytes / time``.
NCCL's own log (``NCCL_DEBUG=INFO``, subsystem ``TUNING``, a file per
process) is read back around each size's first call, so the table says
which algorithm and protocol (or symmetric kernel) NCCL chose for it.

Then the registration costs at this rank count: a pass over 1, 10 and 100
new segments (each its own 2 MiB ``ncclMemAlloc`` segment from the
allocator, then one ``register`` call timed), on the group's comm
(unchecked) and on a second group's comm attached checked.

Rank 0 prints markdown tables. NVLink multicast stays off
(``NCCL_NVLS_ENABLE=0`` and friends, set before torch is imported); nothing
here creates a multicast object.

Usage (GPU host, repository root, the wheel installed)::

    torchrun --nproc_per_node=2 python/gpu/bench_windows.py [--iters 200]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import tempfile
import time

for _k, _v in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(_k, _v)

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--iters", type=int, default=200, help="timed calls per size (at most)")
ARGS.add_argument("--max-mib", type=int, default=256, help="the largest size, MiB")
OPTS = ARGS.parse_args()

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
LOCAL = int(os.environ.get("LOCAL_RANK", "0"))
WORKDIR = tempfile.mkdtemp(prefix=f"segreg-bench-windows.r{RANK}.")
os.environ.setdefault("NCCL_DEBUG", "INFO")
os.environ.setdefault("NCCL_DEBUG_SUBSYS", "INIT,TUNING")
os.environ.setdefault("NCCL_DEBUG_FILE", os.path.join(WORKDIR, "nccl.%p.log"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import segment_registry.torch as st  # noqa: E402

MIB = 1 << 20


def say(line: str) -> None:
    """Prints on rank 0 only."""
    if RANK == 0:
        print(line, flush=True)


def nccl_log_size() -> int:
    """The size of this process's NCCL log now (a phase boundary)."""
    found = glob.glob(os.environ["NCCL_DEBUG_FILE"].replace("%p", str(os.getpid())))
    return os.path.getsize(found[0]) if found else 0


def nccl_choice(start: int) -> str:
    """What NCCL's TUNING lines since ``start`` say it chose (short)."""
    found = glob.glob(os.environ["NCCL_DEBUG_FILE"].replace("%p", str(os.getpid())))
    if not found:
        return "no log"
    with open(found[0], "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    picks = []
    for line in text.splitlines():
        m = re.search(r"-> Algo (\w+) proto (\w+)", line)
        if m:
            picks.append(f"{m.group(1)}/{m.group(2)}")
        m = re.search(r"Kernel (\w+)", line)
        if m and "Symmetric" in line:
            picks.append(f"symmetric {m.group(1)}")
    return ", ".join(dict.fromkeys(picks)) or ("one-rank path" if WORLD == 1 else "not logged")


def time_all_reduce(x: torch.Tensor, group: object, iters: int) -> tuple[float, str]:
    """Mean µs per in-place all-reduce of ``x``, and NCCL's choice for it."""
    log_at = nccl_log_size()
    for _ in range(5):  # warm-up (the first call is where NCCL logs its choice)
        dist.all_reduce(x, group=group)
    torch.cuda.synchronize()
    choice = nccl_choice(log_at)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dist.barrier(group=group)
    start.record()
    for _ in range(iters):
        dist.all_reduce(x, group=group)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters, choice


def checked(x: torch.Tensor, group: object) -> None:
    """One all-reduce of rank-dependent values, checked."""
    x.fill_(float(RANK + 1))
    dist.all_reduce(x, group=group)
    torch.cuda.synchronize()
    want = float(WORLD * (WORLD + 1) // 2)
    if not bool((x == want).all()):
        raise SystemExit(f"rank {RANK}: all-reduce gave {x[:4].tolist()}, want {want}")


def busbw(nbytes: int, us: float) -> float:
    """Bus bandwidth in GB/s of an all-reduce of ``nbytes`` taking ``us``."""
    factor = 2 * (WORLD - 1) / WORLD if WORLD > 1 else 1.0
    return factor * nbytes / (us * 1e-6) / 1e9


def registration_costs(comms: dict[str, int]) -> list[tuple[int, dict[str, float]]]:
    """µs of one pass over ``k`` new segments, for k = 1, 10, 100, per comm.

    The segments come straight from the allocator (``ncclMemAlloc`` of
    2 MiB each), so each is one new segment; every comm's pass then
    registers the same ``k``.
    """
    alloc = st.allocator()
    out = []
    for k in (1, 10, 100):
        ptrs = [alloc.alloc(2 * MIB, LOCAL) for _ in range(k)]
        took: dict[str, float] = {}
        for name, comm in comms.items():
            dist.barrier()
            t = time.perf_counter()
            summary = alloc.register(comm)
            took[name] = (time.perf_counter() - t) * 1e6
            if len(summary.registered) != k:
                raise SystemExit(f"rank {RANK}: a pass over {k} new segments registered "
                                 f"{len(summary.registered)}")
        out.append((k, took))
        for p in ptrs:
            alloc.free(p)
    return out


def main() -> None:
    torch.cuda.set_device(LOCAL)
    dev = torch.device("cuda", LOCAL)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group(
            "nccl", init_method=f"file://{WORKDIR}/store", rank=0, world_size=1, device_id=dev
        )
    group = dist.group.WORLD
    dist.all_reduce(torch.ones(1, device=dev), group=group)
    torch.cuda.synchronize()
    say(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, "
        f"{WORLD} x {torch.cuda.get_device_name(dev)}"
    )
    st.configure(checked=False)  # the pass alone; checked costs are below
    sizes = []
    s = 1 << 10
    while s <= OPTS.max_mib * MIB:
        sizes.append(s)
        s *= 4
    rows = []
    for nbytes in sizes:
        n = nbytes // 4
        iters = max(10, min(OPTS.iters, OPTS.iters * MIB // nbytes))
        ordinary = torch.empty(n, device=dev)
        with st.use_symmetric_memory(group):
            registered = torch.empty(n, device=dev)
        window, _ = st.window_of(registered, group)
        checked(ordinary, group)
        checked(registered, group)
        us_o, how_o = time_all_reduce(ordinary, group, iters)
        us_r, how_r = time_all_reduce(registered, group, iters)
        rows.append((nbytes, us_o, us_r, how_o, how_r, window != 0, iters))
        del ordinary, registered
    say("\n| size | ordinary µs | registered µs | ordinary / registered | busbw ordinary GB/s "
        "| busbw registered GB/s | NCCL's choice, ordinary | NCCL's choice, registered | calls |")
    say("|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for nbytes, us_o, us_r, how_o, how_r, has_window, iters in rows:
        size = f"{nbytes >> 10} KiB" if nbytes < MIB else f"{nbytes >> 20} MiB"
        say(f"| {size} | {us_o:.1f} | {us_r:.1f} | {us_o / us_r:.2f} | {busbw(nbytes, us_o):.1f} "
            f"| {busbw(nbytes, us_r):.1f} | {how_o} | {how_r}{'' if has_window else ' (no window)'} "
            f"| {iters} |")
    hooks = st.TorchHooks(None)
    second = dist.new_group(list(range(WORLD)))  # a second comm, attached checked
    dist.all_reduce(torch.ones(1, device=dev), group=second)
    torch.cuda.synchronize()
    comms = {"unchecked": hooks.comm_of(group), "checked": hooks.comm_of(second)}
    st.allocator().attach(comms["checked"], checked=True)
    st.allocator().register(comms["checked"])  # what the regions above left pending
    costs = registration_costs(comms)
    say(f"\nRegistration at {WORLD} rank(s): one pass over k new 2 MiB segments (rank 0)")
    say("| k | unchecked µs | per segment | checked µs | per segment |")
    say("|---:|---:|---:|---:|---:|")
    for k, t in costs:
        say(f"| {k} | {t['unchecked']:.0f} | {t['unchecked'] / k:.0f} | {t['checked']:.0f} "
            f"| {t['checked'] / k:.0f} |")
    st.allocator().detach(comms["checked"])
    st.close()
    dist.destroy_process_group()
    say("bench_windows: done")


if __name__ == "__main__":
    main()
