"""Symmetric memory for PyTorch, shaped like SGLang's ``pynccl_allocator``.

::

    import torch.distributed as dist
    from segment_registry.torch import use_symmetric_memory, window_of

    with use_symmetric_memory(tp_group):        # tensors come from the shared pool
        out = torch.empty(n, device="cuda")
    dist.all_reduce(out, group=tp_group)         # registered at the exit above
    window, offset = window_of(out, tp_group)    # for NCCL's device API

One ``torch.cuda.MemPool`` serves every group: its allocator is this
package's extension (``segreg_alloc`` / ``segreg_free``: ``ncclMemAlloc``
and ``ncclMemFree``, every segment tracked by the registry). Each region
exit registers with the group's comm the segments it lacks (checked by
default: the ranks agree first, so a rank that allocated differently gets
``DivergedError`` instead of a hang). The rules, the outcomes and the CUDA
graph behaviour are those of :mod:`segment_registry.region`; this module
only supplies the PyTorch side (:class:`TorchHooks`).

A group is a ``torch.distributed`` process group (``None``: the default
group), a raw ``ncclComm_t`` (an ``int`` or a ``ctypes.c_void_p``), or an
object with SGLang's ``.comm.value`` (``PyNcclCommunicator``) or
``.pynccl_comm`` (``GroupCoordinator``). Its first region is collective
(every rank at the same point): it attaches the comm. Call
:func:`release` before a group is destroyed; an exit hook
(:mod:`atexit`) detaches what is left before PyTorch tears its comms down,
within :func:`configure`'s ``exit_time_limit``.

**Non-blocking comms are recommended**: set
``TORCH_NCCL_USE_COMM_NONBLOCKING=1`` (or ``ncclConfig.blocking = 0`` in
the group's options). A non-blocking group is attached with an abort hook
(``ProcessGroupNCCL.abort()``), so a registration stalled past the deadline
ends in :class:`~segment_registry._native.TimeoutError`: the group is gone
and must be recreated on every rank. A blocking group (PyTorch's default)
cannot be released from a stalled call: the native watchdog only reports it
(one log line, the ``stalls`` statistic).

**CUDA graphs.** Tell this module the capture's pool
(:func:`set_graph_pool_id`, as SGLang does) before a region runs inside a
capture: the region pauses the capture's private pool so its tensors come
from the shared pool. Run each group's first region (a warm-up) before the
capture: its segments then serve the graph with windows. Segments first
allocated during a capture are registered after it (the group's next
eager region exit, or :func:`register_deferred`, both collective) and
reported with :class:`~segment_registry.region.DeferredRegistrationWarning`,
since NCCL chose the captured collectives' algorithm without their windows.

**Memory lifetime.** The pool is never freed while the process runs (not
even at exit: the driver reclaims it), so no segment a graph was captured
on goes back to NCCL. Blocks *within* it are reused like any pool's: keep
the tensors a captured graph reads and writes alive as long as the graph
(SGLang's graph runner holds its buffers), or later allocations may get
their blocks.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch  # type: ignore[import-not-found, unused-ignore]
import torch.distributed as dist  # type: ignore[import-not-found, unused-ignore]

from . import _native
from ._native import Allocator, PassSummary
from .region import (
    DeferredRegistrationWarning,
    RegionHooks,
    StallWarning,
    SymmetricMemory,
)

__all__ = [
    "DeferredRegistrationWarning",
    "StallWarning",
    "TorchHooks",
    "allocator",
    "close",
    "configure",
    "deferred",
    "is_nonblocking",
    "pool",
    "register_deferred",
    "release",
    "set_graph_pool_id",
    "symmetric_memory",
    "use_symmetric_memory",
    "window_of",
]

#: ``NCCL_CONFIG_UNDEF_INT``: a field of ``ncclConfig_t`` left unset.
_NCCL_CONFIG_UNDEF_INT = -(2**31)
#: PyTorch's switch for non-blocking NCCL comms.
NONBLOCKING_ENV = "TORCH_NCCL_USE_COMM_NONBLOCKING"


def _truthy(value: str | None) -> bool:
    """Whether an environment variable's value means "on"."""
    return value is not None and value.strip().lower() in ("1", "true", "yes", "y", "on")


def _process_group(group: object) -> Any | None:
    """``group`` as a ``torch.distributed.ProcessGroup``, if it is one (``None``: WORLD)."""
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    return None


def _nccl_backend(pg: Any) -> Any:
    """The NCCL backend of a process group, on the current CUDA device."""
    return pg._get_backend(torch.device("cuda", torch.cuda.current_device()))


def is_nonblocking(group: object) -> bool:
    """Whether PyTorch made ``group``'s NCCL comm non-blocking.

    As ``ProcessGroupNCCL`` decides: the group's ``ncclConfig.blocking`` if
    its options set it, else ``TORCH_NCCL_USE_COMM_NONBLOCKING``. Anything
    but a process group counts as blocking.
    """
    pg = _process_group(group)
    if pg is None:
        return False
    blocking = _NCCL_CONFIG_UNDEF_INT
    try:
        blocking = int(_nccl_backend(pg).options.config.blocking)
    except (AttributeError, RuntimeError, TypeError):
        pass
    if blocking != _NCCL_CONFIG_UNDEF_INT:
        return blocking == 0
    return _truthy(os.environ.get(NONBLOCKING_ENV))


@dataclass
class _PoolEntry:
    """One :meth:`TorchHooks.enter_pool` of a thread, to undo."""

    ctx: AbstractContextManager[Any]
    device: int
    #: The capture's pool this entry paused (resumed at its leave), if any.
    paused: Any | None


class TorchHooks(RegionHooks):
    """The PyTorch side of :class:`~segment_registry.region.SymmetricMemory`.

    Args:
        mem_pool: the shared ``torch.cuda.MemPool``.
    """

    def __init__(self, mem_pool: Any) -> None:
        self.mem_pool = mem_pool
        #: The pool of the CUDA graph being captured (:func:`set_graph_pool_id`).
        self.graph_pool: Any | None = None
        self._local = threading.local()
        # (id(group), device) -> (group, raw comm) of process groups: asking
        # PyTorch costs a few µs a region. The group is held, so its id is
        # not reused while the entry lives; forget() drops it.
        self._comms: dict[tuple[int, int], tuple[object, int]] = {}

    def comm_of(self, group: object) -> int:
        """The raw ``ncclComm_t`` of a process group, a raw pointer or an SGLang object."""
        if isinstance(group, bool):
            raise TypeError("a group, not a bool")
        if isinstance(group, int):
            return group
        if isinstance(group, ctypes.c_void_p):
            return int(group.value or 0)
        pg = _process_group(group)
        if pg is not None:
            key = (id(pg), int(torch.cuda.current_device()))
            known = self._comms.get(key)
            if known is not None and known[0] is pg:
                return known[1]
            # 0 when the group has no comm on the current device yet.
            raw = int(_nccl_backend(pg)._comm_ptr())
            if raw == 0:
                raise RuntimeError(
                    f"{group!r} has no NCCL comm on CUDA device {key[1]} "
                    "yet: run one collective on it first (or pass device_id= to "
                    "init_process_group), with this device current"
                )
            self._comms[key] = (pg, raw)
            return raw
        inner = getattr(group, "comm", None)  # SGLang's / vLLM's PyNcclCommunicator
        if inner is not None and hasattr(inner, "value"):
            return int(inner.value or 0)
        pynccl = getattr(group, "pynccl_comm", None)  # SGLang's GroupCoordinator
        if pynccl is not None:
            return self.comm_of(pynccl)
        raise TypeError(
            f"cannot find the ncclComm_t of {group!r}: give a torch.distributed process group, "
            "a raw pointer (int or ctypes.c_void_p), or an object with .comm.value"
        )

    def forget(self, group: object) -> None:
        """Drops what :meth:`comm_of` remembers of a process group (it is released)."""
        pg = _process_group(group)
        if pg is not None:
            self._comms = {k: v for k, v in self._comms.items() if v[0] is not pg}

    def abort_for(self, group: object) -> Callable[[int], None] | None:
        """For a non-blocking process group, its abort through PyTorch; else ``None``.

        The hook calls ``ProcessGroupNCCL.abort()``, which aborts every NCCL
        comm of the group (the group is then gone: destroy it and create it
        again on every rank).
        """
        pg = _process_group(group)
        if pg is None or not is_nonblocking(pg):
            return None
        backend = _nccl_backend(pg)

        def abort(raw: int) -> None:
            backend.abort()

        return abort

    def is_capturing(self) -> bool:
        """Whether the current stream captures a CUDA graph."""
        return bool(torch.cuda.is_current_stream_capturing())

    def _stack(self) -> list[_PoolEntry]:
        """This thread's open pool entries."""
        stack: list[_PoolEntry] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = []
            self._local.stack = stack
        return stack

    def enter_pool(self, capturing: bool) -> None:
        """Routes this thread's allocations to the shared pool.

        Inside a capture, the outermost region first pauses the capture's
        private pool (``torch._C._cuda_endAllocateToPool``), as SGLang does,
        since a capture's pool takes every allocation of its stream.
        """
        stack = self._stack()
        device = int(torch.cuda.current_device())
        paused = None
        if capturing and not any(e.paused is not None for e in stack):
            if self.graph_pool is None:
                raise RuntimeError(
                    "a symmetric-memory region inside a CUDA graph capture needs the capture's "
                    "pool: call segment_registry.torch.set_graph_pool_id(pool) first (the pool "
                    "given to torch.cuda.graph, or graph.pool())"
                )
            paused = self.graph_pool
            torch._C._cuda_endAllocateToPool(device, paused)
        ctx = torch.cuda.use_mem_pool(self.mem_pool, device)
        try:
            ctx.__enter__()
        except BaseException:
            if paused is not None:
                torch._C._cuda_beginAllocateCurrentThreadToPool(device, paused)
            raise
        stack.append(_PoolEntry(ctx, device, paused))

    def leave_pool(self, capturing: bool) -> None:
        """Undoes the matching :meth:`enter_pool` (resumes a paused capture pool)."""
        entry = self._stack().pop()
        try:
            entry.ctx.__exit__(None, None, None)
        finally:
            if entry.paused is not None:
                torch._C._cuda_beginAllocateCurrentThreadToPool(entry.device, entry.paused)


# -- the process-wide state ---------------------------------------------------------

_lock = threading.Lock()
_sm: SymmetricMemory | None = None
_hooks: TorchHooks | None = None
_options: dict[str, Any] = {"checked": True, "deadline": None, "exit_time_limit": 30.0}


def configure(
    *,
    checked: bool | None = None,
    deadline: float | None = None,
    exit_time_limit: float | None = None,
) -> None:
    """Sets the options of every group's attach; before the first region only.

    ``checked`` (default ``True``): passes agree before they register.
    ``deadline``: seconds by which each collective call ends (default: the
    environment's ``SEGREG_DEADLINE_MS``, else 10 minutes). ``exit_time_limit``
    (default 30): seconds the exit hook waits for its detaches.
    """
    with _lock:
        if _sm is not None:
            raise RuntimeError("configure() after the first region: call it before")
        if checked is not None:
            _options["checked"] = checked
        if deadline is not None:
            _options["deadline"] = deadline
        if exit_time_limit is not None:
            _options["exit_time_limit"] = exit_time_limit


def symmetric_memory() -> SymmetricMemory:
    """The process-wide :class:`SymmetricMemory`, made at first use.

    Initialises the extension on real NCCL (``_native.init("nccl")``), makes
    the shared pool and registers the exit hook.
    """
    global _sm, _hooks
    with _lock:
        if _sm is None:
            try:
                alloc = _native.global_allocator()
            except _native.NotInitializedError:
                alloc = _native.init("nccl")
            plug = torch.cuda.memory.CUDAPluggableAllocator(
                _native.__file__, "segreg_alloc", "segreg_free"
            )
            mem_pool = torch.cuda.MemPool(plug.allocator())
            # Never freed, not even at interpreter teardown (see the module's
            # docs): freeing NCCL memory then would race PyTorch's and NCCL's
            # own teardown, and a captured graph may still use it.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(mem_pool))
            _hooks = TorchHooks(mem_pool)
            _sm = SymmetricMemory(
                alloc,
                _hooks,
                checked=bool(_options["checked"]),
                deadline=_options["deadline"],
                exit_time_limit=float(_options["exit_time_limit"]),
            )
            # atexit runs its hooks last-registered first: this one runs
            # before the hooks PyTorch registered at import.
            atexit.register(close)
        return _sm


def _hooks_made() -> TorchHooks:
    """The hooks of the process-wide state, made at first use."""
    symmetric_memory()
    assert _hooks is not None
    return _hooks


def pool() -> Any:
    """The shared ``torch.cuda.MemPool`` every group's regions allocate from."""
    return _hooks_made().mem_pool


def allocator() -> Allocator:
    """The process-wide allocator behind the pool."""
    return symmetric_memory().allocator


def use_symmetric_memory(group: object, disabled: bool = False) -> AbstractContextManager[Any]:
    """A region of ``group``: tensors from the shared pool, registered at its exit.

    The exit registers with the group's comm what it lacks (collective:
    every rank leaves at the same point; checked unless :func:`configure`
    said otherwise). Regions nest and re-enter. An exception inside makes
    this rank abstain (checked), so its peers get ``DivergedError`` instead
    of a hang. ``disabled=True``: does nothing.
    """
    if disabled:
        return nullcontext()
    return symmetric_memory().region(group)


def _span_bytes(tensor: Any) -> int:
    """The bytes from a tensor's first element to the end of its last."""
    if tensor.numel() == 0:
        raise ValueError("an empty tensor has no window")
    if tensor.is_contiguous():
        return int(tensor.numel() * tensor.element_size())
    if any(s < 0 for s in tensor.stride()):
        raise ValueError("a tensor with negative strides has no single window range")
    last = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    return int((last + 1) * tensor.element_size())


def window_of(tensor: Any, group: object) -> tuple[int, int]:
    """``(window, offset)`` of a tensor in ``group``'s windows, for NCCL's device API.

    ``ncclGetLocalPointer(window, offset)`` then addresses the tensor's
    first element. The tensor must lie in one segment registered with the
    group (allocated in a region whose exit registered it).
    """
    return symmetric_memory().window_of(int(tensor.data_ptr()), _span_bytes(tensor), group)


def release(group: object) -> None:
    """Detaches ``group``'s comm; call it (on every rank) before destroying the group."""
    if _sm is not None:
        _sm.release(group)
    if _hooks is not None:
        _hooks.forget(group)


def register_deferred(group: object | None = None) -> list[PassSummary]:
    """Registers what CUDA graph captures left pending (every group, or ``group``).

    Collective: every rank calls it at the same point, after the capture.
    """
    if _sm is None:
        return []
    return _sm.register_deferred(group)


def deferred() -> dict[int, int]:
    """Groups (by raw comm) with segments a capture left pending, and how many."""
    return {} if _sm is None else _sm.deferred()


def set_graph_pool_id(graph_pool_id: Any) -> None:
    """The pool of the CUDA graph about to be captured (SGLang's ``set_graph_pool_id``).

    Give the ``pool`` passed to ``torch.cuda.graph`` (for example
    ``torch.cuda.graph_pool_handle()``), or ``graph.pool()`` once the
    capture began. A region inside the capture pauses that pool while it
    allocates from the shared one.
    """
    _hooks_made().graph_pool = graph_pool_id


def close() -> None:
    """Detaches every group left (the exit hook; also callable by hand; idempotent)."""
    if _sm is not None:
        _sm.close()
