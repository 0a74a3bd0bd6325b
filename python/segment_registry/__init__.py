"""A lock-free registry of NCCL symmetric-memory segments, for Python.

An allocator gets every segment from ``ncclMemAlloc`` and only tracks it;
at a point the application chooses (the end of a symmetric-memory region),
each NCCL communicator registers the segments it has not seen yet as
windows (``ncclCommWindowRegister``, a collective call), in the same order
on every rank. A *checked* comm's ranks first agree on what they are about
to register, so a rank that allocated differently gets a typed error
(:class:`DivergedError`) instead of a hang, and every collective call ends
by a deadline.

Core API (no PyTorch needed)::

    import segment_registry as sr

    alloc = sr.init("sim")            # "nccl" on a GPU host
    comm = sr.sim_comm_create()       # a raw ncclComm_t on a GPU host
    alloc.attach(comm, checked=True)
    ptr = alloc.alloc(2 << 20)
    summary = alloc.register(comm)    # every rank, same point
    window, offset = alloc.window_of(ptr, 4096, comm)
    alloc.free(ptr)
    alloc.detach(comm)

Regions (:class:`SymmetricMemory`, torch-free, behind :class:`RegionHooks`)
register at their exit what a group's comm lacks. With PyTorch,
:mod:`segment_registry.torch` gives a shared ``MemPool`` and
``use_symmetric_memory(group)``, shaped like SGLang's allocator.
"""

from ._native import (
    C_ENTRY_POINTS,
    DEADLINE_ENV,
    STATS_FIELDS,
    AbortedError,
    AgreementError,
    AllocError,
    Allocator,
    AttachError,
    BackendUnavailableError,
    BadPointerError,
    BusyError,
    CommFailedError,
    CommInfo,
    DetachError,
    DivergedError,
    DuplicateStateError,
    NoWindowError,
    NotAttachedError,
    NotCheckedError,
    NotInitializedError,
    NotRegisteredError,
    PassSummary,
    SegmentRegistryError,
    SimWorld,
    TimeoutError,
    global_allocator,
    init,
    sim_comm_create,
    sim_comm_destroy,
)
from .region import DeferredRegistrationWarning, RegionHooks, StallWarning, SymmetricMemory
from .stats import Stats, stats


def library_path() -> str:
    """The file of the shared library holding the C entry points.

    Give it to ``torch.cuda.memory.CUDAPluggableAllocator`` (with
    ``"segreg_alloc"`` and ``"segreg_free"``): it is this package's own
    extension, so PyTorch's pool and this API share one allocator.
    """
    from . import _native

    return _native.__file__


__all__ = [
    "C_ENTRY_POINTS",
    "DEADLINE_ENV",
    "STATS_FIELDS",
    "AbortedError",
    "AgreementError",
    "AllocError",
    "Allocator",
    "AttachError",
    "BackendUnavailableError",
    "BadPointerError",
    "BusyError",
    "CommFailedError",
    "CommInfo",
    "DeferredRegistrationWarning",
    "DetachError",
    "DivergedError",
    "DuplicateStateError",
    "NoWindowError",
    "NotAttachedError",
    "NotCheckedError",
    "NotInitializedError",
    "NotRegisteredError",
    "PassSummary",
    "RegionHooks",
    "SegmentRegistryError",
    "SimWorld",
    "StallWarning",
    "Stats",
    "SymmetricMemory",
    "TimeoutError",
    "global_allocator",
    "init",
    "library_path",
    "sim_comm_create",
    "sim_comm_destroy",
    "stats",
]
