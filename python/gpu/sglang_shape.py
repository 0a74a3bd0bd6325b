#!/usr/bin/env python3
"""segment_registry.torch used the way SGLang uses its pynccl allocator.

One process per GPU (``torchrun --nproc_per_node=N``), or one process alone
(world size 1). Two process groups share the one ``MemPool``: the
tensor-parallel group over every rank, and a smaller one (ranks 0 and 1 of
four or more; over every rank otherwise, as a second group):

1. 1,000 region cycles (checked), alternating the groups like layers, each
   allocating a tensor in a region and all-reducing it with its sum
   checked; device memory must stay flat (``torch.cuda.mem_get_info``:
   start, end and minimum printed); the registration log (per cycle: the
   group, its windows, its pending segments) must be the same on every
   rank of a group (gathered to rank 0);
2. a CUDA graph captured after a warm-up region, with one new segment
   allocated inside the capture (deferred, with a warning), replayed 100
   times with the right values, then ``register_deferred()``;
3. ``window_of`` on tensors (nonzero windows, offsets);
4. NCCL's own log (``NCCL_DEBUG=INFO``, subsystems ``INIT,COLL,TUNING,REG``,
   written to a file and read back by phase): what NCCL decided for the
   captured collectives at capture time (the algorithm and kernel, with 2+
   ranks), and that the replays added no decision of their own; plus the
   nodes CUDA recorded in the graph;
5. divergence (2+ ranks): rank 1 allocates an extra tensor in a region of
   the tensor-parallel group; every rank's region exit raises
   ``DivergedError`` (none hangs); the others then allocate the same, and
   the next exit registers it on every rank;
6. costs at this rank count: a checked region's enter + exit with nothing
   new, a checked pass alone, and a bare 16-byte all-reduce, medians;
7. interpreter exit with live pool memory, captured graph and groups: the
   exit hook detaches the groups, then this script destroys the process
   group; the exit must be clean (status 0).

Prints ``ok: ...`` lines (prefixed with the rank when there are several)
and a final ``PASS``; exits non-zero on failure.

Usage (GPU host, from the repository root)::

    python3 python/gpu/sglang_shape.py            # one process, non-blocking comms
    python3 python/gpu/sglang_shape.py --blocking # PyTorch's default comms
    torchrun --nproc_per_node=2 python/gpu/sglang_shape.py

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends, set below
before torch is imported); nothing here creates a multicast object.
"""

from __future__ import annotations

import argparse
import atexit
import glob
import os
import re
import sys
import tempfile
import time
import warnings

# -- environment, before torch (and NCCL) load ------------------------------------
for _k, _v in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(_k, _v)

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--blocking", action="store_true", help="leave PyTorch's comms blocking")
ARGS.add_argument("--cycles", type=int, default=1000)
ARGS.add_argument("--replays", type=int, default=100)
ARGS.add_argument("--device", type=int, default=None, help="default: LOCAL_RANK, else 0")
OPTS = ARGS.parse_args()

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
DEVICE = OPTS.device if OPTS.device is not None else int(os.environ.get("LOCAL_RANK", "0"))
WORKDIR = tempfile.mkdtemp(prefix=f"segreg-sglang-shape.r{RANK}.")
os.environ.setdefault("NCCL_DEBUG", "INFO")
os.environ.setdefault("NCCL_DEBUG_SUBSYS", "INIT,COLL,TUNING,REG")
os.environ.setdefault("NCCL_DEBUG_FILE", os.path.join(WORKDIR, "nccl.%p.log"))
if not OPTS.blocking:
    os.environ.setdefault("TORCH_NCCL_USE_COMM_NONBLOCKING", "1")

# The package from this checkout (python/), unless one is installed.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import segment_registry.torch as st  # noqa: E402
from segment_registry import _native  # noqa: E402
from segment_registry.region import DeferredRegistrationWarning  # noqa: E402

FAILED = False


class Check(Exception):
    """A failed check."""


def say(line: str) -> None:
    """Prints a line, with the rank when there are several."""
    print(f"[rank {RANK}] {line}" if WORLD > 1 else line, flush=True)


def check(cond: bool, what: str) -> None:
    """Prints ``ok: what`` or raises."""
    if not cond:
        raise Check(what)
    say(f"ok: {what}")


def nccl_log() -> str | None:
    """This process's NCCL log file (NCCL_DEBUG_FILE with %p)."""
    pattern = os.environ["NCCL_DEBUG_FILE"].replace("%p", str(os.getpid())).replace("%h", "*")
    found = glob.glob(pattern)
    return found[0] if found else None


def log_size() -> int:
    """The NCCL log's size now (a phase boundary)."""
    path = nccl_log()
    return os.path.getsize(path) if path else 0


def log_between(start: int, end: int) -> list[str]:
    """The NCCL log's lines between two boundaries."""
    path = nccl_log()
    if path is None:
        return []
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start).decode(errors="replace").splitlines()


#: NCCL's lines about collectives and their choice: COLL (each call as
#: enqueued), TUNING ("Bytes -> Algo X proto Y", "[Symmetric] ... -> Kernel
#: K"), REG (registrations).
DECISION = re.compile(
    r"AllReduce|AllGather|ReduceScatter|Broadcast|Algo |Kernel |Symmetric|[Ww]indow|register",
)


def show(title: str, lines: list[str], limit: int = 12) -> list[str]:
    """Prints the decision lines of a phase of NCCL's log; returns them."""
    picked = [ln for ln in lines if DECISION.search(ln)]
    say(f"--- NCCL log, {title}: {len(lines)} line(s), {len(picked)} about collectives")
    for ln in picked[:limit]:
        say(f"    {ln.strip()}")
    if len(picked) > limit:
        say(f"    ... {len(picked) - limit} more")
    return picked


def graph_kernels(dot_path: str) -> list[str]:
    """The nodes CUDA recorded in a graph's debug dump: kernels by name, others by type."""
    try:
        text = open(dot_path, errors="replace").read()
    except OSError as e:
        return [f"(no dump: {e})"]
    out_dir = os.environ.get("OUT")
    if out_dir:  # the device tool brings $OUT back: keep the dump
        with open(os.path.join(out_dir, "graph.dot"), "w") as f:
            f.write(text)
    seen: dict[str, int] = {}
    for label in re.findall(r'label="([^"]*)"', text):
        kind = re.match(r"\W*(\w+)", label)
        name = re.search(r"(_Z\w+|nccl\w+)", label)
        key = name.group(1)[:90] if name else (kind.group(1) if kind else label[:40])
        seen[key] = seen.get(key, 0) + 1
    if not seen:
        return [f"(none parsed from {len(text)} bytes; first: {text[:200]!r})"]
    return [f"{n} x{c}" for n, c in seen.items()]


def stats() -> dict[str, int]:
    """The allocator's statistics."""
    return st.allocator().stats_dict()


def comm_info(comm: int) -> _native.CommInfo:
    """The allocator's report on one comm."""
    for info in st.allocator().comms():
        if info.comm == comm:
            return info
    raise Check(f"comm {comm:#x} is not attached")


def at_exit() -> None:
    """Runs after segment_registry's exit hook (atexit runs last-registered first)."""
    try:
        left = _native.global_allocator().comms()
        check(left == [], f"the exit hook detached every group ({len(left)} left)")
        dist.destroy_process_group()
        check(True, "destroy_process_group after the exit hook")
    except Exception as e:  # noqa: BLE001
        say(f"FAILED at exit: {type(e).__name__}: {e}")
        os._exit(1)
    if FAILED:
        os._exit(1)
    say("PASS")


def groups_of(dev: torch.device) -> tuple[object, object, list[int]]:
    """The tensor-parallel group (WORLD), the smaller group and its ranks."""
    if "MASTER_ADDR" in os.environ:  # under torchrun
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group(
            "nccl", init_method=f"file://{WORKDIR}/store", rank=0, world_size=1, device_id=dev
        )
    members = [0, 1] if WORLD >= 4 else list(range(WORLD))
    other = dist.new_group(members)  # every rank calls new_group, members or not
    return dist.group.WORLD, other, members


def mean_all_reduce(x: torch.Tensor, group: object, size: int) -> None:
    """All-reduces ``x`` (a sum) and divides by the group's size: ranks that
    hold the same values keep them, so the checks do not depend on the
    rank count."""
    dist.all_reduce(x, group=group)
    if size > 1:
        x.div_(float(size))


def median_us(stmt: object, n: int) -> float:
    """The median time of ``n`` calls of ``stmt`` (a callable), in µs."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        stmt()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6


def main() -> None:
    dev = torch.device("cuda", DEVICE)
    torch.cuda.set_device(dev)
    say(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {torch.cuda.get_device_name(dev)}, "
        f"rank {RANK} of {WORLD}, device {DEVICE}, "
        f"TORCH_NCCL_USE_COMM_NONBLOCKING={os.environ.get('TORCH_NCCL_USE_COMM_NONBLOCKING')}"
    )
    # Registered before segment_registry's hook, so it runs after it.
    atexit.register(at_exit)

    world, other, members = groups_of(dev)
    in_other = RANK in members
    sizes_of = {"world": WORLD, "other": len(members)}
    for g in (world, other) if in_other else (world,):
        t = torch.ones(1, device=dev)
        dist.all_reduce(t, group=g)  # makes the group's NCCL comm
    torch.cuda.synchronize()
    st.configure(checked=True, deadline=120.0)
    hooks = st.TorchHooks(None)
    comms = {"world": hooks.comm_of(world)}
    if in_other:
        comms["other"] = hooks.comm_of(other)
    check(all(comms.values()) and len(set(comms.values())) == len(comms), f"NCCL comms {comms}")
    check(
        st.is_nonblocking(world) == (not OPTS.blocking),
        f"the groups are {'blocking' if OPTS.blocking else 'non-blocking'}",
    )
    check(
        (st.TorchHooks(None).abort_for(world) is None) == OPTS.blocking,
        "an abort hook exactly for non-blocking groups",
    )

    # -- 1. region cycles, like layers -----------------------------------------------
    names = ["world", "other"] if in_other else ["world"]
    groups = {"world": world, "other": other}
    sizes = [1 << 18, 1 << 20, 3 << 19]  # 1, 4 and 6 MiB of floats
    free_start = free_min = free_end = 0
    passes0 = 0
    log: list[tuple[int, str, int, int]] = []
    started = time.perf_counter()
    for i in range(OPTS.cycles):
        name = ["world", "other"][i % 2]
        if name not in names:
            continue  # not a member of the smaller group: its layer is elsewhere
        g = groups[name]
        with st.use_symmetric_memory(g):
            x = torch.full((sizes[i % 3],), float(i % 1000), device=dev)
        info = comm_info(comms[name])
        log.append((i, name, info.windows, info.pending))
        mean_all_reduce(x, g, sizes_of[name])
        if i % 100 == 99 or i == OPTS.cycles - 1:
            torch.cuda.synchronize()
            if not bool((x == float(i % 1000)).all()):
                raise Check(f"cycle {i}: all-reduce gave {x[:4].tolist()}")
        del x
        if i == 9:  # after the pool's blocks exist
            torch.cuda.synchronize()
            free_start = free_min = torch.cuda.mem_get_info(dev)[0]
            passes0 = stats()["passes"]
        elif i > 9 and i % 10 == 0:
            free_min = min(free_min, torch.cuda.mem_get_info(dev)[0])
    torch.cuda.synchronize()
    free_end = torch.cuda.mem_get_info(dev)[0]
    free_min = min(free_min, free_end)
    took = time.perf_counter() - started
    mib = 1 << 20
    say(
        f"device memory free: start {free_start / mib:.0f} MiB, end {free_end / mib:.0f} MiB, "
        f"min {free_min / mib:.0f} MiB ({OPTS.cycles} cycles in {took:.2f} s)"
    )
    s = stats()
    check(OPTS.cycles < 20 or free_start - free_min <= 64 * mib, "device memory flat (64 MiB)")
    regions = sum(1 for i in range(10, OPTS.cycles) if ["world", "other"][i % 2] in names)
    check(
        s["passes"] - passes0 >= regions,
        f"one pass a region exit ({s['passes'] - passes0} for {regions} regions after the first 10)",
    )
    check(s["windows_registered"] > 0, f"{s['windows_registered']} windows registered")
    check(s["diverged"] == 0 and s["timeouts"] == 0, "no divergence, no timeout")
    for name, comm in comms.items():
        info = comm_info(comm)
        check(
            info.checked and info.pending == 0,
            f"{name}: checked, nothing pending ({info.windows} windows)",
        )
    logs: list[list[tuple[int, str, int, int]]] = [[] for _ in range(WORLD)]
    dist.all_gather_object(logs, log)
    for name in ("world", "other"):
        ranks = range(WORLD) if name == "world" else members
        per_rank = [[e for e in logs[r] if e[1] == name] for r in ranks]
        check(
            all(p == per_rank[0] for p in per_rank),
            f"the {name} group's registration log is the same on its {len(per_rank)} rank(s) "
            f"({len(per_rank[0])} region exits)",
        )

    # -- 2. a CUDA graph -----------------------------------------------------------------
    n = 1 << 20
    with st.use_symmetric_memory(world):  # the warm-up region: registered before the capture
        a = torch.ones(n, device=dev)
    torch.cuda.synchronize()
    win_a, off_a = st.window_of(a, world)
    check(win_a != 0, f"window_of(a) = ({win_a:#x}, {off_a}) before the capture")

    graph_pool = torch.cuda.graph_pool_handle()
    st.set_graph_pool_id(graph_pool)
    try:
        # Kept after the capture (instantiated at the first replay), so that
        # debug_dump can print the nodes CUDA recorded.
        graph = torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:  # a PyTorch before keep_graph
        graph = torch.cuda.CUDAGraph()
    graph.enable_debug_mode()
    segments_before = stats()["live_segments"]
    before_capture = log_size()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.cuda.graph(graph, pool=graph_pool):
            with st.use_symmetric_memory(world):
                # 48 MiB: no cached block fits, so a segment is made inside the capture.
                b = torch.empty(12 * n, device=dev)
            a.add_(1.0)
            mean_all_reduce(a, world, WORLD)  # on a segment registered before the capture
            b[:n].copy_(a)
            b[:n].mul_(2.0)
            if in_other:
                mean_all_reduce(b, other, len(members))  # on the segment made in the capture
    after_capture = log_size()
    deferred = [w for w in caught if issubclass(w.category, DeferredRegistrationWarning)]
    check(stats()["live_segments"] > segments_before, "a new segment was made inside the capture")
    check(
        len(deferred) == 1, f"one DeferredRegistrationWarning: {[str(w.message) for w in deferred]}"
    )
    pending = st.deferred()
    check(pending.get(comms["world"], 0) >= 1, f"deferred {pending}")
    try:
        st.window_of(b, world)
        raise Check("window_of(b) answered before register_deferred")
    except _native.NotRegisteredError:
        check(True, "b has no window before register_deferred (the graph runs without)")

    # a = 1 before the capture; each replay: a += 1, b[:n] = 2 a.
    for _ in range(OPTS.replays):
        graph.replay()
    torch.cuda.synchronize()
    after_replays = log_size()
    want = 1.0 + OPTS.replays
    check(bool((a == want).all()), f"after {OPTS.replays} replays a == {want}")
    check(bool((b[:n] == 2 * want).all()), f"after {OPTS.replays} replays b == {2 * want}")

    summaries = st.register_deferred()  # collective: every rank, here
    check(
        [len(p.registered) for p in summaries] == [1] and st.deferred() == {},
        f"register_deferred registered the captured segment: {summaries}",
    )
    win_b, off_b = st.window_of(b, world)
    win_tail, off_tail = st.window_of(b[n:], world)
    check(
        win_b != 0 and win_tail == win_b and off_tail == off_b + 4 * n,
        f"window_of(b) = ({win_b:#x}, {off_b}), window_of(b[n:]) = ({win_tail:#x}, {off_tail})",
    )
    if in_other:
        with st.use_symmetric_memory(other):  # the other group's next exit registers b too
            pass
        check(comm_info(comms["other"]).pending == 0, "the other group registered b at its exit")

    # -- 3. what NCCL decided, from its own log ------------------------------------
    dot = os.path.join(WORKDIR, "graph.dot")
    graph.debug_dump(dot)
    captured = show("during the capture", log_between(before_capture, after_capture))
    replayed = show(f"during {OPTS.replays} replays", log_between(after_capture, after_replays))
    check(len(captured) >= 2, "NCCL logged the captured collectives when they were captured")
    check(replayed == [], "the replays added no NCCL decision: what ran was fixed at capture")
    if not any("Algo " in ln or "Kernel " in ln for ln in captured):
        say(
            "note: NCCL logged no algorithm for them: on a one-rank comm NCCL takes its "
            "one-rank path (ncclLaunchOneRank: a local copy/reduce, no algorithm, no symmetric "
            "kernel). With 2+ ranks its TUNING lines ('Bytes -> Algo X proto Y', or "
            "'[Symmetric]: ... -> Kernel K') appear in this phase, and never at replay."
        )
    kernels = graph_kernels(dot)
    say(f"--- the graph's nodes ({dot}):")
    for k in kernels[:20]:
        say(f"    {k}")

    # -- 4. divergence, through the package -------------------------------------------
    if WORLD >= 2:
        big = 16 << 20  # 64 MiB of floats: a new segment on whoever allocates it
        raised: bool
        keep_extra = []
        try:
            with st.use_symmetric_memory(world):
                t = torch.empty(n, device=dev)
                if RANK == 1:
                    keep_extra.append(torch.empty(big, device=dev))
            raised = False
        except _native.DivergedError as e:
            raised = True
            say(f"DivergedError, as expected: {e}")
        everyone: list[bool] = [False] * WORLD
        dist.all_gather_object(everyone, raised)
        check(all(everyone), f"every rank's region exit raised DivergedError: {everyone}")
        # Recovery: the others allocate the same, so every rank matches.
        with st.use_symmetric_memory(world):
            if RANK != 1:
                keep_extra.append(torch.empty(big, device=dev))
        check(comm_info(comms["world"]).pending == 0, "the next region exit registered on every rank")
        globals().update(keep_extra=(keep_extra, t))
    else:
        say("note: divergence needs two ranks or more: skipped")

    # -- 5. costs at this rank count ---------------------------------------------------
    region = st.use_symmetric_memory
    alloc = st.allocator()
    tiny = torch.zeros(4, dtype=torch.int32, device=dev)  # 16 bytes
    torch.cuda.synchronize()

    def enter_exit() -> None:
        with region(world):
            pass

    def all_reduce_16() -> None:
        dist.all_reduce(tiny, group=world)
        torch.cuda.synchronize()

    for f in (enter_exit, all_reduce_16):
        median_us(f, 50)  # warm-up
    costs = {
        "checked region enter + exit, nothing new": median_us(enter_exit, 500),
        "checked pass alone, nothing pending": median_us(lambda: alloc.register(comms["world"]), 500),
        "bare 16-byte all-reduce (+ synchronize)": median_us(all_reduce_16, 500),
    }
    for what, us in costs.items():
        say(f"cost at {WORLD} rank(s): {what}: {us:.1f} µs (median of 500)")

    # -- 6. exit with live memory ------------------------------------------------------
    # a, b, the graph and both groups stay alive: the exit hook detaches the
    # groups, then at_exit() destroys the process group.
    globals().update(keep=(a, b, graph, graph_pool))
    check(True, f"leaving with {stats()['live_segments']} live segments and a captured graph")


if __name__ == "__main__":
    try:
        main()
    except Check as e:
        FAILED = True
        say(f"FAILED: {e}")
        sys.exit(1)
    except Exception:
        FAILED = True
        raise
