"""Type stubs of the compiled extension ``segment_registry._native``.

The extension is also the C library PyTorch loads: its file exports the C
entry points of ``include/segment_registry.h`` (``segreg_alloc``,
``segreg_free``, ...), which act on the same process-wide allocator as
:func:`init` and :func:`global_allocator`.
"""

from typing import Callable, Final

#: Every function of the C header this module exports (the export test
#: checks them with ``nm -D``).
C_ENTRY_POINTS: Final[tuple[str, ...]]
#: The names of the allocator's statistics, in the C struct's order.
STATS_FIELDS: Final[tuple[str, ...]]
#: The environment variable giving the default deadline, in milliseconds.
DEADLINE_ENV: Final[str]

class SegmentRegistryError(Exception):
    """Base class of every error of the segment registry."""

class NotInitializedError(SegmentRegistryError):
    """The process-wide allocator is not initialised: call ``init`` first."""

class BackendUnavailableError(SegmentRegistryError):
    """CUDA or NCCL is missing or too old, or another backend was chosen."""

class DuplicateStateError(SegmentRegistryError):
    """Another copy of the allocator is initialised in this process."""

class AllocError(SegmentRegistryError):
    """An allocation failed (zero size, out of memory, NCCL refused)."""

class BadPointerError(SegmentRegistryError):
    """A free or lookup of a pointer the allocator does not know."""

class AttachError(SegmentRegistryError):
    """A comm could not be attached (null, already attached, split failed)."""

class NotAttachedError(SegmentRegistryError):
    """The comm is not attached (never, or detached)."""

class BusyError(SegmentRegistryError):
    """A pass already runs on this comm, on another thread."""

class CommFailedError(SegmentRegistryError):
    """A registration failed, now or before: only detach is allowed."""

class DivergedError(SegmentRegistryError):
    """A checked pass found that the ranks disagree, or one abstained.

    Nothing was registered on any rank and the comm is healthy: make every
    rank hold the same segments, then register again.
    """

class AgreementError(SegmentRegistryError):
    """A checked pass's agreement failed: the comm is failed now."""

class TimeoutError(SegmentRegistryError):
    """A call reached the comm's deadline; the comm was aborted (gone)."""

class AbortedError(SegmentRegistryError):
    """The comm was aborted earlier: detach it, recreate it on every rank."""

class NotCheckedError(SegmentRegistryError):
    """The operation needs a comm attached with ``checked=True``."""

class NotRegisteredError(SegmentRegistryError):
    """The allocation is not registered with this comm (yet)."""

class NoWindowError(SegmentRegistryError):
    """Registered without a window: the comm has no symmetric memory."""

class DetachError(SegmentRegistryError):
    """A detach could not deregister every window."""

class PassSummary:
    """What one registration pass did."""

    @property
    def comm(self) -> int:
        """The raw ``ncclComm_t`` of the pass."""
    @property
    def registered(self) -> list[tuple[int, int]]:
        """``(address, length)`` of each segment registered, in call order."""
    @property
    def windows(self) -> int:
        """Registrations that returned a window."""
    @property
    def null_windows(self) -> int:
        """Registrations that returned no window (no symmetric support)."""
    @property
    def handed_back(self) -> int:
        """Windows of segments freed during the pass, deregistered by it."""

class CommInfo:
    """One attached comm, as :meth:`Allocator.comms` reports it."""

    @property
    def comm(self) -> int:
        """Its raw ``ncclComm_t``."""
    @property
    def state(self) -> str:
        """``"active"``, ``"failed"``, ``"detaching"`` or ``"aborted"``."""
    @property
    def windows(self) -> int:
        """Windows registered for live segments."""
    @property
    def pending(self) -> int:
        """Live segments its next pass would register."""
    @property
    def checked(self) -> bool:
        """Whether its passes agree before they register."""
    @property
    def deadline(self) -> float:
        """The deadline of each collective call on it, in seconds."""
    @property
    def failure(self) -> str | None:
        """Why it failed, if it did."""

class Allocator:
    """An allocator of NCCL memory whose segments register with comms.

    Get the process-wide one with :func:`init` or :func:`global_allocator`
    (the one behind the C entry points and PyTorch's pool), or one per
    simulated rank with :meth:`SimWorld.rank`. Every method that can wait
    (allocation, free, passes, detach) releases the GIL.
    """

    @property
    def backend(self) -> str:
        """``"nccl"`` or ``"sim"``."""
    @property
    def is_global(self) -> bool:
        """Whether this is the process-wide allocator."""
    def alloc(self, size: int, device: int = 0) -> int:
        """Allocates ``size`` bytes with ``ncclMemAlloc``; returns the address."""
    def free(self, ptr: int) -> None:
        """Deregisters the segment's windows, then ``ncclMemFree``."""
    def attach(
        self,
        comm: int,
        *,
        checked: bool = False,
        deadline: float | None = None,
        owned: bool = False,
        abort: Callable[[int], None] | None = None,
    ) -> None:
        """Attaches a raw ``ncclComm_t``; collective when ``checked``."""
    def detach(self, comm: int) -> int:
        """Detaches; returns the windows it deregistered."""
    def register(self, comm: int) -> PassSummary:
        """Registers what ``comm`` lacks (collective: every rank calls it)."""
    def register_all(self) -> list[PassSummary | SegmentRegistryError]:
        """One pass per attached comm, in attach order."""
    def abstain(self, comm: int) -> DivergedError:
        """Takes part in a checked pass without registering."""
    def window_of(self, ptr: int, size: int, comm: int) -> tuple[int, int]:
        """``(window, offset)`` of ``[ptr, ptr + size)`` for NCCL's device API."""
    def is_attached(self, comm: int) -> bool:
        """Whether ``comm`` is attached (an aborted one not yet detached counts)."""
    def comms(self) -> list[CommInfo]:
        """The attached comms, in attach order."""
    def stats_dict(self) -> dict[str, int]:
        """Every statistic of :data:`STATS_FIELDS`, by name."""
    def last_async_error(self) -> str | None:
        """The last error met off the caller's path (a deferred deregistration)."""

class SimWorld:
    """A simulated multi-rank NCCL, for tests on machines without GPUs."""

    def __init__(self, nranks: int) -> None: ...
    @property
    def nranks(self) -> int:
        """The number of ranks."""
    def rank(self, rank: int) -> Allocator:
        """A new allocator over simulated rank ``rank``."""
    def comm_create(
        self, ranks: list[int], *, nonblocking: bool = False, symmetric: bool = True
    ) -> list[int]:
        """A comm over ``ranks``; its raw handle on each of them, in order.

        ``nonblocking``: its calls honour deadlines and may be aborted;
        ``symmetric=False``: registrations succeed without a window.
        """
    def stall_next_register(self, comm: int) -> None:
        """The comm's next registration never completes until it is aborted."""
    def abort(self, comm: int) -> None:
        """``ncclCommAbort`` on one member of a comm (an owner's abort hook)."""
    def violations(self) -> list[str]:
        """NCCL rules broken so far (empty when every call was legal)."""

def init(backend: str = "nccl") -> Allocator:
    """Initialises the process-wide allocator (``"nccl"`` or ``"sim"``)."""

def global_allocator() -> Allocator:
    """The process-wide allocator; raises if :func:`init` was not called."""

def sim_comm_create(*, nonblocking: bool = False, symmetric: bool = True) -> int:
    """A one-rank comm of the process-wide simulated backend."""

def sim_comm_destroy(comm: int) -> None:
    """Destroys a comm made by :func:`sim_comm_create`."""
