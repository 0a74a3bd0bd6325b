"""Tests of ``segment_registry.region`` against the real registry on its simulated NCCL.

Two simulated ranks (``SimWorld(2)``), one allocator each, driven from one
Python thread each: the collective calls (attach's split, the checked
passes' agreement) block until both ranks arrive, as on real NCCL. The
framework's side is :class:`FakeHooks`, a test double of the small
:class:`~segment_registry.region.RegionHooks` protocol (no PyTorch, no fake
torch): it maps test groups to each rank's raw comm, records every pool
entry and exit, and has a settable "capturing" flag.

Every multi-rank test joins its threads with a timeout and fails if one is
still running: a hang is a failure, never a stuck CI job. Each test ends by
asking the simulator whether any NCCL rule was broken (ranks registering
different segments, calls after an abort, ...).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar, cast

import pytest

from segment_registry._native import (
    AbortedError,
    Allocator,
    CommInfo,
    DivergedError,
    NotRegisteredError,
    SimWorld,
)
from segment_registry._native import TimeoutError as RegistryTimeoutError
from segment_registry.region import (
    DeferredRegistrationWarning,
    RegionHooks,
    StallWarning,
    SymmetricMemory,
)

MiB = 1 << 20
#: One segment: the 2 MiB allocation granule.
SEG = 2 * MiB
#: The deadline of every collective call in these tests: a bug ends in an
#: error within it, not a hang.
DEADLINE = 5.0
#: How long a test waits for its rank threads.
JOIN = 20.0

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """A test group: its name picks the comm (two objects, one name: one comm)."""

    name: str


TP = Group("tp")
DP = Group("dp")


class FakeHooks:
    """The :class:`RegionHooks` of one simulated rank.

    ``comms`` maps a group's name to this rank's raw comm; groups named in
    ``nonblocking`` get an abort hook that aborts this rank's member of the
    comm through the simulator (as an owner's abort would).
    """

    def __init__(self, world: SimWorld, comms: dict[str, int], nonblocking: set[str]) -> None:
        self.world = world
        self.comms = comms
        self.nonblocking = nonblocking
        self.capturing = False
        self._lock = threading.Lock()
        #: ("enter" | "leave", capturing) of every pool call, in order.
        self.events: list[tuple[str, bool]] = []
        self.depth = 0
        #: Raw comms the abort hook was called with.
        self.aborted: list[int] = []

    def comm_of(self, group: object) -> int:
        """This rank's raw comm of a test group."""
        assert isinstance(group, Group)
        return self.comms[group.name]

    def abort_for(self, group: object) -> Callable[[int], None] | None:
        """An abort through the simulator for a non-blocking group, else ``None``."""
        assert isinstance(group, Group)
        if group.name not in self.nonblocking:
            return None

        def abort(raw: int) -> None:
            self.aborted.append(raw)
            self.world.abort(raw)

        return abort

    def is_capturing(self) -> bool:
        """The test's capturing flag."""
        return self.capturing

    def enter_pool(self, capturing: bool) -> None:
        """Records the entry."""
        with self._lock:
            self.events.append(("enter", capturing))
            self.depth += 1

    def leave_pool(self, capturing: bool) -> None:
        """Records the exit; never more exits than entries."""
        with self._lock:
            self.events.append(("leave", capturing))
            self.depth -= 1
            assert self.depth >= 0, "leave_pool without enter_pool"


@dataclass
class Rank:
    """One simulated rank: its allocator, hooks and regions."""

    rank: int
    alloc: Allocator
    hooks: FakeHooks
    sm: SymmetricMemory
    live: list[int] = field(default_factory=list)

    def segment(self, size: int = SEG) -> int:
        """Allocates a segment (as the pool would inside a region)."""
        ptr = self.alloc.alloc(size)
        self.live.append(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        """Frees a segment."""
        self.live.remove(ptr)
        self.alloc.free(ptr)

    def stat(self, name: str) -> int:
        """One statistic."""
        return self.alloc.stats_dict()[name]

    def comm(self, group: Group) -> int:
        """This rank's raw comm of ``group``."""
        return self.hooks.comms[group.name]

    def info(self, group: Group) -> CommInfo:
        """The allocator's report on ``group``'s comm."""
        raw = self.comm(group)
        for info in self.alloc.comms():
            if info.comm == raw:
                return info
        raise AssertionError(f"comm {raw:#x} of {group} is not attached")

    def windows(self, group: Group) -> int:
        """Windows ``group``'s comm holds for live segments."""
        return self.info(group).windows

    def pending(self, group: Group) -> int:
        """Segments ``group``'s next pass would register."""
        return self.info(group).pending


@dataclass
class World:
    """Two simulated ranks sharing comms."""

    sim: SimWorld
    ranks: list[Rank]
    #: Every comm's raw handles, rank by rank.
    comms: dict[str, list[int]]

    def check_rules(self) -> None:
        """No NCCL rule was broken (same registrations on every rank, no call after abort)."""
        assert self.sim.violations() == []


def make_world(
    groups: tuple[str, ...] = ("tp",),
    *,
    nonblocking: set[str] | None = None,
    nranks: int = 2,
    checked: bool = True,
    deadline: float = DEADLINE,
    exit_time_limit: float = 10.0,
) -> World:
    """A world of ``nranks`` ranks with a comm over all of them per group name."""
    nb = nonblocking or set()
    sim = SimWorld(nranks)
    everyone = list(range(nranks))
    comms = {g: sim.comm_create(everyone, nonblocking=g in nb) for g in groups}
    ranks = []
    for r in everyone:
        alloc = sim.rank(r)
        hooks = FakeHooks(sim, {g: raws[r] for g, raws in comms.items()}, nb)
        sm = SymmetricMemory(
            alloc, hooks, checked=checked, deadline=deadline, exit_time_limit=exit_time_limit
        )
        ranks.append(Rank(r, alloc, hooks, sm))
    return World(sim, ranks, comms)


@dataclass
class Outcome(Generic[T]):
    """What one rank's program returned or raised."""

    value: T | None = None
    error: BaseException | None = None

    def get(self) -> T:
        """The value; re-raises the rank's exception."""
        if self.error is not None:
            raise self.error
        return cast(T, self.value)

    def raised(self, kind: type[BaseException]) -> BaseException:
        """The rank's exception, asserted to be a ``kind``."""
        assert isinstance(self.error, kind), f"expected {kind.__name__}, got {self.error!r}"
        return self.error


def on_ranks(*programs: Callable[[], T], timeout: float = JOIN) -> list[Outcome[T]]:
    """Runs each program on a thread of its own; fails if one is still running."""
    outcomes: list[Outcome[T]] = [Outcome() for _ in programs]
    start = threading.Barrier(len(programs))

    def run(i: int) -> None:
        start.wait()
        try:
            outcomes[i].value = programs[i]()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcomes[i].error = e

    threads = [
        threading.Thread(target=run, args=(i,), name=f"rank{i}", daemon=True)
        for i in range(len(programs))
    ]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        pytest.fail(f"{stuck} still running after {timeout} s: a hang")
    return outcomes


def each(world: World, program: Callable[[Rank], T]) -> list[T]:
    """Runs ``program`` on every rank; returns the values (re-raising a rank's error)."""
    outs = on_ranks(*[partial(program, r) for r in world.ranks])
    return [o.get() for o in outs]


@pytest.fixture
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning issued while the test runs, by any thread."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        yield got


def of_kind(got: list[warnings.WarningMessage], kind: type[Warning]) -> list[str]:
    """The messages of the warnings of ``kind``."""
    return [str(w.message) for w in got if issubclass(w.category, kind)]


# -- the protocol ----------------------------------------------------------------


def test_fake_hooks_implement_the_protocol() -> None:
    world = make_world()
    assert isinstance(world.ranks[0].hooks, RegionHooks)


# -- registration at region exit --------------------------------------------------


def test_matching_region_cycles_register_on_both_ranks() -> None:
    world = make_world()

    def program(r: Rank) -> list[tuple[int, int]]:
        seen = []
        for _ in range(3):
            with r.sm.region(TP):
                r.segment()
                inside = r.pending(TP)
            seen.append((inside, r.stat("windows_registered")))
        return seen

    for r, seen in zip(world.ranks, each(world, program), strict=True):
        # One new segment pending inside each region, registered at its exit.
        assert seen == [(1, 1), (1, 2), (1, 3)]
        info = r.info(TP)
        assert (info.windows, info.pending, info.checked) == (3, 0, True)
        # The first region attached the comm: the pool was entered and left once a region.
        assert r.hooks.events == [("enter", False), ("leave", False)] * 3
    world.check_rules()


def test_a_rewrapped_group_is_the_same_group() -> None:
    world = make_world()

    def program(r: Rank) -> int:
        with r.sm.region(TP):
            r.segment()
        with r.sm.region(Group("tp")):  # another object, the same comm: no second attach
            r.segment()
        return r.windows(TP)

    assert each(world, program) == [2, 2]
    world.check_rules()


def test_window_of_after_registration() -> None:
    world = make_world()

    def program(r: Rank) -> tuple[int, int]:
        with r.sm.region(TP):
            ptr = r.segment()
            with pytest.raises(NotRegisteredError):
                r.sm.window_of(ptr, 1024, TP)  # not before the exit
        window, offset = r.sm.window_of(ptr + 4096, 1024, TP)
        assert window == r.alloc.window_of(ptr + 4096, 1024, r.comm(TP))[0]
        return window, offset

    for window, offset in each(world, program):
        assert window != 0
        assert offset == 4096
    world.check_rules()


def test_a_divergent_region_raises_on_every_rank_then_registers_once_they_match() -> None:
    world = make_world()
    extra: dict[int, int] = {}

    def diverge(r: Rank) -> None:
        with r.sm.region(TP):
            r.segment()
            if r.rank == 1:
                extra[r.rank] = r.segment()  # one segment rank 0 does not have

    outs = on_ranks(*[partial(diverge, r) for r in world.ranks])
    for r, o in zip(world.ranks, outs, strict=True):
        o.raised(DivergedError)
        assert r.stat("windows_registered") == 0  # nothing registered anywhere
        assert r.info(TP).state != "aborted"

    def recover(r: Rank) -> int:
        if r.rank == 1:
            r.free(extra[1])
        with r.sm.region(TP):
            pass
        return r.windows(TP)

    assert each(world, recover) == [1, 1]
    world.check_rules()


# -- an exception inside a region -------------------------------------------------


class Boom(Exception):
    """The test's own error."""


def test_an_exception_makes_the_rank_abstain_so_its_peer_fails_fast() -> None:
    world = make_world()

    def program(r: Rank) -> None:
        with r.sm.region(TP):
            r.segment()
            if r.rank == 0:
                raise Boom("the model raised")

    started = time.monotonic()
    outs = on_ranks(*[partial(program, r) for r in world.ranks])
    # The peer ends at once with the typed error, not at the deadline.
    assert time.monotonic() - started < DEADLINE
    boom = outs[0].raised(Boom)
    assert str(boom) == "the model raised"  # the original exception, unchanged
    assert any("abstained" in n for n in getattr(boom, "__notes__", []))
    outs[1].raised(DivergedError)
    for r in world.ranks:
        assert r.stat("windows_registered") == 0
        assert r.pending(TP) == 1

    def again(r: Rank) -> int:
        with r.sm.region(TP):
            pass
        return r.windows(TP)

    assert each(world, again) == [1, 1]
    world.check_rules()


def test_an_exception_in_an_unchecked_region_makes_no_collective_call() -> None:
    world = make_world(checked=False)

    def program(r: Rank) -> None:
        with r.sm.region(TP):
            r.segment()
            raise Boom(f"rank {r.rank}")

    outs = on_ranks(*[partial(program, r) for r in world.ranks])
    for r, o in zip(world.ranks, outs, strict=True):
        e = o.raised(Boom)
        assert str(e) == f"rank {r.rank}"
        assert getattr(e, "__notes__", []) == []
        assert r.stat("passes") == 0 and r.stat("agreements") == 0
        assert r.info(TP).checked is False
        assert r.pending(TP) == 1
        assert r.hooks.depth == 0
    world.check_rules()


# -- nesting ------------------------------------------------------------------------


def test_a_region_nested_in_itself_registers_at_each_exit() -> None:
    world = make_world()

    def program(r: Rank) -> tuple[int, int]:
        with r.sm.region(TP):
            r.segment()
            with r.sm.region(TP):
                r.segment()
            after_inner = r.windows(TP)
            r.segment()
        return after_inner, r.windows(TP)

    assert each(world, program) == [(2, 3), (2, 3)]
    for r in world.ranks:
        assert r.hooks.events == [
            ("enter", False),
            ("enter", False),
            ("leave", False),
            ("leave", False),
        ]
        assert r.hooks.depth == 0
    world.check_rules()


def test_two_groups_nested_share_the_pool_and_each_exit_registers_its_group() -> None:
    world = make_world(("tp", "dp"))

    def program(r: Rank) -> tuple[int, int, int, int]:
        with r.sm.region(TP):
            r.segment()
            with r.sm.region(DP):  # the first region of dp attaches it here
                r.segment()
            # dp registered both live segments; tp has not passed yet.
            dp_windows, tp_pending = r.windows(DP), r.pending(TP)
        return dp_windows, tp_pending, r.windows(TP), r.pending(DP)

    assert each(world, program) == [(2, 2, 2, 0), (2, 2, 2, 0)]
    for r in world.ranks:
        assert r.hooks.depth == 0 and len(r.hooks.events) == 4
    world.check_rules()


def test_regions_of_two_groups_on_two_threads_of_one_rank() -> None:
    """Each group's collectives on a thread of their own (NEVER_HANG rule 1)."""
    world = make_world(("tp", "dp"))

    def group_loop(r: Rank, g: Group) -> int:
        for _ in range(5):
            with r.sm.region(g):
                pass
        return r.windows(g)

    programs: list[Callable[[], int]] = [
        partial(group_loop, r, g) for r in world.ranks for g in (TP, DP)
    ]
    for r in world.ranks:
        r.segment()
    assert [o.get() for o in on_ranks(*programs)] == [1, 1, 1, 1]
    world.check_rules()


# -- CUDA graph capture ------------------------------------------------------------


def test_a_capture_defers_registration_and_warns_once(
    recorded: list[warnings.WarningMessage],
) -> None:
    world = make_world()

    def capture(r: Rank) -> tuple[int, int]:
        with r.sm.region(TP):  # the warm-up region: its segment serves the graph
            warm = r.segment()
        passes = r.stat("passes")
        r.hooks.capturing = True
        for _ in range(2):  # two regions inside one capture
            with r.sm.region(TP):
                r.segment()
        r.hooks.capturing = False
        assert r.stat("passes") == passes  # no pass inside the capture
        assert r.sm.window_of(warm, SEG, TP)[0] != 0
        return r.pending(TP), r.windows(TP)

    assert each(world, capture) == [(2, 1), (2, 1)]
    for r in world.ranks:
        assert r.sm.deferred() == {r.comm(TP): 2}
        assert ("enter", True) in r.hooks.events and ("leave", True) in r.hooks.events
        assert r.hooks.depth == 0
    # Once per rank and capture, not once per region (at the first one).
    msgs = of_kind(recorded, DeferredRegistrationWarning)
    assert len(msgs) == 2
    assert all("1 segment(s)" in m and "register_deferred" in m for m in msgs)

    def register(r: Rank) -> int:
        summaries = r.sm.register_deferred()
        assert [len(s.registered) for s in summaries] == [2]
        return r.windows(TP)

    assert each(world, register) == [3, 3]
    for r in world.ranks:
        assert r.sm.deferred() == {}
        assert r.pending(TP) == 0
    world.check_rules()


def test_the_next_eager_exit_registers_what_a_capture_left(
    recorded: list[warnings.WarningMessage],
) -> None:
    world = make_world()

    def program(r: Rank) -> tuple[int, int, int]:
        with r.sm.region(TP):
            r.segment()
        r.hooks.capturing = True
        with r.sm.region(TP):
            r.segment()
        r.hooks.capturing = False
        deferred = r.sm.deferred()[r.comm(TP)]
        with r.sm.region(TP):  # eager: registers the captured segment too
            pass
        return deferred, r.windows(TP), len(r.sm.deferred())

    assert each(world, program) == [(1, 2, 0), (1, 2, 0)]
    assert len(of_kind(recorded, DeferredRegistrationWarning)) == 2
    world.check_rules()


def test_a_capture_that_allocates_nothing_new_does_not_warn(
    recorded: list[warnings.WarningMessage],
) -> None:
    world = make_world()

    def program(r: Rank) -> dict[int, int]:
        with r.sm.region(TP):
            r.segment()
        r.hooks.capturing = True
        with r.sm.region(TP):
            pass  # the graph reuses what the warm-up allocated
        r.hooks.capturing = False
        return r.sm.deferred()

    assert each(world, program) == [{}, {}]
    assert of_kind(recorded, DeferredRegistrationWarning) == []


def test_a_group_first_used_inside_a_capture_is_refused() -> None:
    world = make_world()
    r = world.ranks[0]
    r.hooks.capturing = True
    with pytest.raises(RuntimeError, match="warm-up region"):
        with r.sm.region(TP):
            pass
    assert not r.alloc.is_attached(r.comm(TP))
    assert r.hooks.events == [] and r.hooks.depth == 0


# -- a stalled registration ------------------------------------------------------


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unchecked"])
def test_a_stalled_registration_on_a_nonblocking_group_times_out_and_loses_the_group(
    checked: bool,
) -> None:
    deadline = 0.5
    world = make_world(nonblocking={"tp"}, checked=checked, deadline=deadline)

    def attach_then_stall(r: Rank) -> None:
        with r.sm.region(TP):  # attaches (a split, when checked) well within the deadline
            pass
        world.sim.stall_next_register(r.comm(TP))
        with r.sm.region(TP):
            r.segment()

    started = time.monotonic()
    outs = on_ranks(*[partial(attach_then_stall, r) for r in world.ranks])
    assert time.monotonic() - started < deadline + 4.0  # ended by the deadline
    for r, o in zip(world.ranks, outs, strict=True):
        e = o.raised(RegistryTimeoutError)
        assert any("recreate" in n and "every rank" in n for n in getattr(e, "__notes__", []))
        assert r.hooks.aborted == [r.comm(TP)]  # the owner's hook aborted this rank's member
        assert r.sm.is_lost(TP)
        assert r.stat("timeouts") == 1
        # Its windows left the accounting without NCCL calls; the handle is detached.
        assert not r.alloc.is_attached(r.comm(TP))
        with pytest.raises(AbortedError, match="recreate"):
            with r.sm.region(TP):
                pass
        with pytest.raises(AbortedError):
            r.sm.window_of(r.live[0], SEG, TP)
        assert r.sm.deferred() == {}
        r.sm.release(TP)  # no NCCL call on the aborted comm
        assert not r.sm.is_lost(TP)  # forgotten
        r.sm.close()
        assert r.hooks.depth == 0
    world.check_rules()  # no call after abort, same registrations on both ranks


def test_a_lost_group_does_not_disturb_another() -> None:
    world = make_world(("tp", "dp"), nonblocking={"tp"}, deadline=0.5)

    def program(r: Rank) -> int:
        with r.sm.region(TP):
            pass
        with r.sm.region(DP):
            pass
        world.sim.stall_next_register(r.comm(TP))
        with pytest.raises(RegistryTimeoutError):
            with r.sm.region(TP):
                r.segment()
        with r.sm.region(DP):
            r.segment()
        return r.windows(DP)

    assert each(world, program) == [2, 2]
    world.check_rules()


# -- release and close -------------------------------------------------------------


def test_release_detaches_and_a_later_region_attaches_again() -> None:
    world = make_world()

    def program(r: Rank) -> tuple[bool, int, bool, int]:
        with r.sm.region(TP):
            r.segment()
        r.sm.release(TP)
        detached = not r.alloc.is_attached(r.comm(TP))
        deregistered = r.stat("windows_deregistered")
        r.sm.release(TP)  # again: nothing left to do
        with r.sm.region(TP):
            pass
        return detached, deregistered, r.alloc.is_attached(r.comm(TP)), r.windows(TP)

    assert each(world, program) == [(True, 1, True, 1), (True, 1, True, 1)]
    world.check_rules()


def test_release_inside_a_region_of_the_group_is_refused() -> None:
    world = make_world(checked=False)
    r = world.ranks[0]
    with r.sm.region(TP):
        with pytest.raises(RuntimeError, match="inside one of its regions"):
            r.sm.release(TP)
    assert r.alloc.is_attached(r.comm(TP))


def test_close_detaches_every_group_and_is_idempotent(
    recorded: list[warnings.WarningMessage],
) -> None:
    world = make_world(("tp", "dp"))

    def program(r: Rank) -> tuple[bool, bool]:
        with r.sm.region(TP):
            r.segment()
        with r.sm.region(DP):
            pass
        r.sm.close()
        gone = not r.alloc.is_attached(r.comm(TP)) and not r.alloc.is_attached(r.comm(DP))
        r.sm.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            with r.sm.region(TP):
                pass
        return gone, r.alloc.comms() == []

    assert each(world, program) == [(True, True), (True, True)]
    assert of_kind(recorded, StallWarning) == []
    assert of_kind(recorded, RuntimeWarning) == []
    world.check_rules()


class SlowDetach:
    """The real allocator, except that ``detach`` waits for :attr:`go`.

    Stands in for a detach that never ends (a peer that never detaches, a
    stalled NCCL call): the only way to make one in the simulator that does
    not also stall the thread that makes it.
    """

    def __init__(self, alloc: Allocator) -> None:
        self._alloc = alloc
        self.go = threading.Event()
        self.detached: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._alloc, name)

    def detach(self, comm: int) -> int:
        """Waits for :attr:`go`, then detaches."""
        self.go.wait(JOIN)
        n = self._alloc.detach(comm)
        self.detached.append(comm)
        return n


def test_close_keeps_to_its_time_limit(recorded: list[warnings.WarningMessage]) -> None:
    sim = SimWorld(1)
    (raw,) = sim.comm_create([0])
    slow = SlowDetach(sim.rank(0))
    hooks = FakeHooks(sim, {"tp": raw}, set())
    sm = SymmetricMemory(cast(Allocator, slow), hooks, checked=False, exit_time_limit=0.3)
    with sm.region(TP):
        pass
    started = time.monotonic()
    sm.close()
    assert time.monotonic() - started < 2.0
    assert slow.detached == []
    assert len(of_kind(recorded, StallWarning)) == 1
    slow.go.set()  # the daemon thread finishes the detach
    end = time.monotonic() + 5.0
    while not slow.detached and time.monotonic() < end:
        time.sleep(0.01)
    assert slow.detached == [raw]


# -- disabled --------------------------------------------------------------------------


def test_a_disabled_region_does_nothing() -> None:
    world = make_world()
    r = world.ranks[0]  # alone: a disabled region makes no collective call
    with r.sm.region(TP, disabled=True):
        r.segment()
    assert r.hooks.events == []
    assert not r.alloc.is_attached(r.comm(TP))
    assert r.stat("passes") == 0
    with pytest.raises(Boom):
        with r.sm.region(TP, disabled=True):
            raise Boom("passes through")
    assert r.hooks.events == []
    world.check_rules()


def test_bad_arguments_are_refused() -> None:
    world = make_world()
    r = world.ranks[0]
    with pytest.raises(ValueError):
        SymmetricMemory(r.alloc, r.hooks, deadline=0)
    with pytest.raises(ValueError):
        SymmetricMemory(r.alloc, r.hooks, exit_time_limit=-1)
    r.hooks.comms["zero"] = 0
    with pytest.raises(ValueError, match="raw ncclComm_t"):
        with r.sm.region(Group("zero")):
            pass
    assert r.hooks.events == []
