"""Symmetric-memory regions: the torch-free core of ``segment_registry.torch``.

A *region* is a ``with`` block inside which a group's tensors are allocated
from one shared pool of NCCL memory (``ncclMemAlloc``); when the block ends,
the group's comm registers every segment it lacks as a window
(``ncclCommWindowRegister``), so NCCL can run the group's collectives on
them with its symmetric kernels. The logic lives here, behind a small typed
protocol of hooks (:class:`RegionHooks`: enter and leave the pool, "am I
capturing a CUDA graph", "which comm is this group"), so it runs and is
tested without PyTorch, against the real registry on its simulated NCCL;
``segment_registry.torch`` only supplies the hooks.

Rules every rank must follow (registration is a collective call):

* **A group's first region is collective.** It attaches the group's comm
  (:meth:`segment_registry._native.Allocator.attach`); a checked attach
  splits a private agreement comm from it, so every rank enters its first
  region of a group at the same point of the program.
* **Every region exit is collective** (outside a CUDA graph capture): every
  rank leaves its regions of a group in the same order, from the thread
  that issues that group's collectives. A checked exit runs an agreement
  (one small all-reduce on the private comm) even when nothing is new.
* **Every rank allocates the same segments.** A checked exit finds ranks
  that differ and raises :class:`~segment_registry._native.DivergedError`
  on every rank, registering nothing; the segments stay pending for the
  next exit.

What each outcome does:

* an exception escapes the region body: in checked mode this rank
  *abstains* (takes part in the pass without registering), so every peer's
  pass ends with ``DivergedError`` at once instead of waiting; the original
  exception is re-raised unchanged (a note says what happened). Unchecked,
  nothing is done: the peers' next pass may then disagree, or wait.
* a registration reaches the group's deadline on a non-blocking comm whose
  owner gave an abort hook: the comm is aborted, its windows leave the
  accounting without NCCL calls, and the native
  :class:`~segment_registry._native.TimeoutError` propagates with a note:
  the group is gone and must be recreated on every rank. A lost group's
  later regions raise :class:`~segment_registry._native.AbortedError`;
  :meth:`SymmetricMemory.release` and :meth:`SymmetricMemory.close` make
  no NCCL call for it. A blocking comm cannot be released from a stalled
  call: the native watchdog reports the stall (a log line and the
  ``stalls`` statistic) and the call goes on.
* inside a CUDA graph capture: no pass (a registration inside a capture
  fails, and NCCL chose the captured collectives' algorithms at capture
  time anyway). Segments registered before the capture (a warm-up region)
  serve the graph with windows; segments first allocated during the
  capture serve it without, and a :class:`DeferredRegistrationWarning`
  says so once per capture. They register at the group's next eager region
  exit, or at :meth:`SymmetricMemory.register_deferred`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable

from ._native import (
    AbortedError,
    Allocator,
    CommInfo,
    PassSummary,
    SegmentRegistryError,
)
from ._native import TimeoutError as RegistryTimeoutError

__all__ = [
    "DeferredRegistrationWarning",
    "RegionHooks",
    "StallWarning",
    "SymmetricMemory",
]

#: The errors after which a group's comm is gone (aborted by its owner's
#: hook, or earlier).
_LOST_ERRORS: tuple[type[SegmentRegistryError], ...] = (RegistryTimeoutError, AbortedError)


class DeferredRegistrationWarning(UserWarning):
    """Segments allocated during a CUDA graph capture are not registered yet.

    The graph's collectives on them run without windows (NCCL chose their
    algorithm at capture time). They register at the group's next eager
    region exit or at :meth:`SymmetricMemory.register_deferred`.

    Issued once per capture and group: at the first region exit of the
    capture that leaves segments pending; the group is reported again only
    after it registered (an eager exit, or ``register_deferred``), which a
    warm-up before each capture does.
    """


class StallWarning(UserWarning):
    """Detaching the groups left at exit passed :attr:`SymmetricMemory.exit_time_limit`.

    The detaches go on in a daemon thread, which the interpreter does not
    wait for; the process exits without them.
    """


@runtime_checkable
class RegionHooks(Protocol):
    """What :class:`SymmetricMemory` needs from a framework (PyTorch, a test).

    Every method is called on the thread that enters or leaves the region.
    """

    def comm_of(self, group: object) -> int:
        """The group's raw ``ncclComm_t``, as an integer (nonzero).

        Groups are told apart by this value: two objects wrapping the same
        comm are the same group.
        """
        ...

    def abort_for(self, group: object) -> Callable[[int], None] | None:
        """The owner's abort of a non-blocking group's comm, or ``None``.

        The callable is called with the raw comm, on the thread whose call
        reached the deadline; it must abort the comm (``ncclCommAbort``,
        through its owner) before it returns. ``None``: the comm is blocking
        and is never aborted (a stalled call is only reported).
        """
        ...

    def is_capturing(self) -> bool:
        """Whether the current stream is capturing a CUDA graph."""
        ...

    def enter_pool(self, capturing: bool) -> None:
        """Start allocating from the shared pool on this thread.

        ``capturing``: inside a graph capture, whose private pool must be
        paused first so the region's tensors come from the shared pool.
        """
        ...

    def leave_pool(self, capturing: bool) -> None:
        """Undo the matching :meth:`enter_pool` (resume the capture's pool)."""
        ...


@dataclass
class _Group:
    """What :class:`SymmetricMemory` knows of one group's comm."""

    #: The raw ``ncclComm_t``.
    comm: int
    #: Whether its passes agree before they register.
    checked: bool
    #: Whether this object attached it (else it was attached already).
    attached_here: bool
    #: Regions open on it, on every thread.
    open_regions: int = 0
    #: Why it is gone (a timeout or an abort), if it is.
    lost: str | None = None
    #: Segments a capture left pending on it (at the last capture's exit).
    deferred: int = 0
    #: Whether the capture under way was reported already.
    capture_warned: bool = False


def _lost_message(comm: int, why: str) -> str:
    """The words every error about a lost group carries."""
    return (
        f"the group of comm {comm:#x} is gone ({why}): its comm was aborted and its windows "
        "left the accounting without NCCL calls; the group must be recreated on every rank "
        "(call release() on the old group, then destroy it)"
    )


class _Region(AbstractContextManager[None]):
    """One ``with`` block of :meth:`SymmetricMemory.region`."""

    __slots__ = ("_sm", "_group", "_state", "_capturing")

    def __init__(self, sm: SymmetricMemory, group: object) -> None:
        self._sm = sm
        self._group = group
        self._state: _Group | None = None
        self._capturing = False

    def __enter__(self) -> None:
        if self._state is not None:
            raise RuntimeError("a region object is entered once; call region() again")
        capturing = self._sm.hooks.is_capturing()
        state = self._sm._enter(self._group, capturing)
        try:
            self._sm.hooks.enter_pool(capturing)
        except BaseException:
            self._sm._close_region(state)
            raise
        self._state, self._capturing = state, capturing

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        if state is None:
            return None
        try:
            self._sm.hooks.leave_pool(self._capturing)
        finally:
            try:
                self._sm._exit(state, self._capturing, exc)
            finally:
                self._sm._close_region(state)
        return None


class _Disabled(AbstractContextManager[None]):
    """The region of ``disabled=True``: no pool, no pass."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class SymmetricMemory:
    """Regions of symmetric memory over one allocator, for any number of groups.

    Every group shares the allocator's segments (PyTorch: one ``MemPool``):
    a segment allocated in one group's region is pending for every other
    group too, and registers with each at its next region exit.

    Args:
        allocator: the registry's allocator (the process-wide one behind
            PyTorch's pool, or a simulated rank's).
        hooks: the framework's side (:class:`RegionHooks`).
        checked: attach each group checked: its passes agree before they
            register, so ranks that differ get ``DivergedError`` instead of
            a hang, and a rank whose region raised can abstain. Costs one
            small all-reduce on a private comm per region exit.
        deadline: seconds by which every collective call on a group's comm
            ends (``None``: the environment's ``SEGREG_DEADLINE_MS``, else
            10 minutes). Only a non-blocking comm with an abort hook can be
            ended at it; a blocking one is only reported.
        exit_time_limit: seconds :meth:`close` waits for its detaches.
    """

    def __init__(
        self,
        allocator: Allocator,
        hooks: RegionHooks,
        *,
        checked: bool = True,
        deadline: float | None = None,
        exit_time_limit: float = 30.0,
    ) -> None:
        if deadline is not None and not deadline > 0:
            raise ValueError(f"deadline must be positive seconds or None, not {deadline!r}")
        if not exit_time_limit > 0:
            raise ValueError(f"exit_time_limit must be positive seconds, not {exit_time_limit!r}")
        self.allocator = allocator
        self.hooks = hooks
        self.checked = checked
        self.deadline = deadline
        self.exit_time_limit = exit_time_limit
        self._lock = threading.Lock()
        self._groups: dict[int, _Group] = {}
        # One lock a comm, held while it is attached: attaches of different
        # groups may wait for their peers at the same time.
        self._attach_locks: dict[int, threading.Lock] = {}
        self._closed = False

    # -- the public API ---------------------------------------------------------

    def region(self, group: object, disabled: bool = False) -> AbstractContextManager[None]:
        """A region of ``group``: allocate from the shared pool, register at exit.

        The first region of a group attaches its comm (collective). The
        exit registers what the group's comm lacks (collective; checked by
        default), except inside a CUDA graph capture. Regions nest and
        re-enter: each exit registers its own group's pending segments.
        ``disabled=True`` gives a region that does nothing.
        """
        if disabled:
            return _Disabled()
        return _Region(self, group)

    def register_deferred(self, group: object | None = None) -> list[PassSummary]:
        """Registers what captures left pending: on every such group, or on ``group``.

        Collective: every rank calls it at the same point, after the capture
        ended (each group's pass is checked if the group is). Returns one
        summary per pass, in the order the groups were first used. A
        ``DivergedError`` propagates and leaves the group deferred; a
        timeout makes the group lost, as at a region exit.
        """
        if self.hooks.is_capturing():
            raise RuntimeError("register_deferred() inside a CUDA graph capture: call it after")
        with self._lock:
            if group is None:
                todo = [g for g in self._groups.values() if g.deferred and g.lost is None]
            else:
                g = self._groups.get(self._comm(group))
                if g is not None and g.lost is not None:
                    raise AbortedError(_lost_message(g.comm, g.lost))
                todo = [g] if g is not None and g.deferred else []
        return [self._register(g) for g in todo]

    def deferred(self) -> dict[int, int]:
        """Groups whose segments a capture left pending, by raw comm: how many.

        The count is the comm's pending segments at the last capture's
        region exit; it clears when the group registers again.
        """
        with self._lock:
            return {c: g.deferred for c, g in self._groups.items() if g.deferred and g.lost is None}

    def is_lost(self, group: object) -> bool:
        """Whether ``group``'s comm is gone (a call reached its deadline, or aborted)."""
        with self._lock:
            g = self._groups.get(self._comm(group))
            return g is not None and g.lost is not None

    def release(self, group: object) -> None:
        """Detaches ``group``'s comm; call it before the group is destroyed.

        Collective for a checked group (its private comm is destroyed). A
        lost group is only forgotten: no NCCL call. A group never used, or
        released already, is left alone. A comm you attached yourself
        before its first region was adopted as it was (its own ``checked``):
        ``release`` detaches it too, :meth:`close` leaves it to you. Raises
        ``RuntimeError`` while a region of the group is open.
        """
        comm = self._comm(group)
        with self._lock:
            g = self._groups.get(comm)
            if g is None:
                return
            if g.open_regions:
                raise RuntimeError(
                    f"release() of comm {comm:#x} inside one of its regions: leave it first"
                )
            del self._groups[comm]
        if g.lost is None:
            try:
                self.allocator.detach(comm)
            except _LOST_ERRORS:
                # Its finalize reached the deadline: gone, as a lost group.
                pass

    def window_of(self, ptr: int, size: int, group: object) -> tuple[int, int]:
        """``(window, offset)`` of ``[ptr, ptr + size)`` in ``group``'s windows.

        For NCCL's device API (``ncclGetLocalPointer(window, offset)``).
        Raises ``NotRegisteredError`` before the segment's region exit (on
        every rank), ``AbortedError`` for a lost group.
        """
        comm = self._comm(group)
        with self._lock:
            g = self._groups.get(comm)
            if g is not None and g.lost is not None:
                raise AbortedError(_lost_message(comm, g.lost))
        return self.allocator.window_of(ptr, size, comm)

    def close(self) -> None:
        """Detaches every group left (the exit hook); idempotent.

        Groups are detached in the order they were first used, so checked
        detaches (collective) meet on every rank; lost groups are skipped.
        The detaches run in a daemon thread; past :attr:`exit_time_limit`
        seconds a :class:`StallWarning` is issued and ``close`` returns
        without them. Failures are reported as warnings, not raised. After
        ``close``, :meth:`region` raises ``RuntimeError``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = [g.comm for g in self._groups.values() if g.open_regions]
            todo = [
                g.comm
                for g in self._groups.values()
                if g.lost is None and g.attached_here and not g.open_regions
            ]
            self._groups = {c: g for c, g in self._groups.items() if g.open_regions}
        failures: list[str] = []

        def detach_all() -> None:
            for comm in todo:
                try:
                    self.allocator.detach(comm)
                except SegmentRegistryError as e:
                    failures.append(f"comm {comm:#x}: {type(e).__name__}: {e}")

        worker = threading.Thread(target=detach_all, name="segment-registry-close", daemon=True)
        worker.start()
        worker.join(self.exit_time_limit)
        if worker.is_alive():
            warnings.warn(
                f"segment_registry: detaching {len(todo)} group(s) at exit took longer than "
                f"{self.exit_time_limit:g} s (a peer that never detaches, or a stalled NCCL "
                "call); exiting without waiting for them",
                StallWarning,
                stacklevel=2,
            )
        for f in failures:
            warnings.warn(f"segment_registry: detach at exit failed: {f}", RuntimeWarning, 2)
        for comm in busy:
            warnings.warn(
                f"segment_registry: comm {comm:#x} still has a region open at close(); "
                "left attached",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- the region's steps -----------------------------------------------------

    def _comm(self, group: object) -> int:
        """The raw comm of ``group``, checked."""
        comm = self.hooks.comm_of(group)
        if not isinstance(comm, int) or comm <= 0:
            raise ValueError(f"comm_of({group!r}) gave {comm!r}, not a raw ncclComm_t")
        return comm

    def _enter(self, group: object, capturing: bool) -> _Group:
        """Finds or attaches the group's comm and counts the region open."""
        comm = self._comm(group)
        with self._lock:
            if self._closed:
                raise RuntimeError("this SymmetricMemory is closed (the exit hook ran)")
            g = self._groups.get(comm)
            if g is None:
                attach_lock = self._attach_locks.setdefault(comm, threading.Lock())
        if g is None:
            if capturing:
                raise RuntimeError(
                    f"the first region of the group of comm {comm:#x} is inside a CUDA graph "
                    "capture: attaching is collective and cannot be captured; run a warm-up "
                    "region of the group before the capture"
                )
            g = self._attach(group, comm, attach_lock)
        with self._lock:
            if g.lost is not None:
                raise AbortedError(_lost_message(comm, g.lost))
            g.open_regions += 1
        return g

    def _attach(self, group: object, comm: int, attach_lock: threading.Lock) -> _Group:
        """Attaches ``comm`` (collective when checked), once."""
        with attach_lock:
            with self._lock:
                found = self._groups.get(comm)
            if found is not None:
                return found
            if self.allocator.is_attached(comm):
                # Attached by the caller: adopt it as it is.
                info = self._info(comm)
                g = _Group(comm, info.checked if info else False, attached_here=False)
            else:
                self.allocator.attach(
                    comm,
                    checked=self.checked,
                    deadline=self.deadline,
                    abort=self.hooks.abort_for(group),
                )
                g = _Group(comm, self.checked, attached_here=True)
            with self._lock:
                self._groups[comm] = g
            return g

    def _close_region(self, g: _Group) -> None:
        """Counts a region of ``g`` closed."""
        with self._lock:
            g.open_regions -= 1

    def _exit(self, g: _Group, capturing: bool, exc: BaseException | None) -> None:
        """The pass (or abstention, or deferral) at a region's exit."""
        if g.lost is not None:
            return
        if capturing:
            # No rank passes inside a capture, so an exception has nobody
            # to abstain towards either.
            self._defer(g)
            return
        if exc is not None:
            if g.checked:
                self._abstain(g, exc)
            return
        self._register(g)

    def _abstain(self, g: _Group, exc: BaseException) -> None:
        """Takes part in the pass without registering; notes the outcome on ``exc``."""
        try:
            self.allocator.abstain(g.comm)
        except _LOST_ERRORS as e:
            self._mark_lost(g, e)
            exc.add_note(f"segment_registry: could not abstain: {_lost_message(g.comm, str(e))}")
        except SegmentRegistryError as e:
            exc.add_note(
                f"segment_registry: this rank could not abstain from comm {g.comm:#x}'s "
                f"pass ({type(e).__name__}: {e}); its peers end at their deadline"
            )
        else:
            exc.add_note(
                f"segment_registry: this rank abstained from comm {g.comm:#x}'s registration "
                "pass, so every peer's pass ended with DivergedError; nothing was registered"
            )

    def _register(self, g: _Group) -> PassSummary:
        """One pass on ``g``'s comm; a timeout or abort makes ``g`` lost."""
        try:
            summary = self.allocator.register(g.comm)
        except _LOST_ERRORS as e:
            self._mark_lost(g, e)
            e.add_note(_lost_message(g.comm, type(e).__name__))
            raise
        with self._lock:
            g.deferred = 0
            g.capture_warned = False
        return summary

    def _defer(self, g: _Group) -> None:
        """Records what a capture's region left pending; warns once a capture."""
        info = self._info(g.comm)
        pending = info.pending if info is not None else 0
        with self._lock:
            if pending == 0:
                return
            g.deferred = pending
            warn = not g.capture_warned
            g.capture_warned = True
        if warn:
            warnings.warn(
                f"segment_registry: {pending} segment(s) allocated during a CUDA graph capture "
                f"are not registered with comm {g.comm:#x}: the graph's collectives on them "
                "run without windows (NCCL chose their algorithm at capture time). They "
                "register at this group's next eager region exit, or at register_deferred().",
                DeferredRegistrationWarning,
                stacklevel=4,
            )

    def _mark_lost(self, g: _Group, e: SegmentRegistryError) -> None:
        """Records ``g`` as gone and detaches it now (no NCCL call: it is aborted).

        Detaching at once drops the aborted handle, so a new comm NCCL
        makes at the same address is never mistaken for it.
        """
        with self._lock:
            if g.lost is not None:
                return
            g.lost = f"{type(e).__name__}: {e}"
            g.deferred = 0
        try:
            self.allocator.detach(g.comm)
        except SegmentRegistryError:
            pass

    def _info(self, comm: int) -> CommInfo | None:
        """The allocator's report on ``comm``."""
        for info in self.allocator.comms():
            if info.comm == comm:
                return info
        return None
