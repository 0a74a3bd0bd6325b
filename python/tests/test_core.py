"""The core API on the simulated backend: allocation, attach, passes,
lookups, statistics, and every error path with its exception class."""

from __future__ import annotations

import threading
import time

import pytest

import segment_registry as sr
from segment_registry import _native

MIB = 1 << 20


def test_init_returns_the_process_wide_allocator(global_alloc: sr.Allocator) -> None:
    assert global_alloc.is_global
    assert global_alloc.backend == "sim"
    again = sr.init("sim")
    assert again.is_global and sr.global_allocator().backend == "sim"


def test_init_refuses_another_backend_and_bad_names(global_alloc: sr.Allocator) -> None:
    with pytest.raises(sr.BackendUnavailableError, match="already initialized with the sim"):
        sr.init("nccl")
    with pytest.raises(ValueError, match='"nccl" or "sim"'):
        sr.init("cuda")


def test_a_pass_registers_what_the_comm_lacks_once(
    global_alloc: sr.Allocator, sim_comm: int
) -> None:
    ptr = global_alloc.alloc(2 * MIB)
    first = global_alloc.register(sim_comm)
    assert first.comm == sim_comm
    assert first.registered == [(ptr, 2 * MIB)]
    assert (first.windows, first.null_windows, first.handed_back) == (1, 0, 0)
    assert global_alloc.register(sim_comm).registered == []
    window, offset = global_alloc.window_of(ptr + 4096, 100, sim_comm)
    assert window != 0 and offset == 4096
    global_alloc.free(ptr)
    with pytest.raises(sr.BadPointerError, match="no tracked segment"):
        global_alloc.window_of(ptr, 1, sim_comm)


def test_stats_name_every_field_of_the_c_struct(global_alloc: sr.Allocator) -> None:
    import dataclasses

    names = tuple(f.name for f in dataclasses.fields(sr.Stats))
    assert names == sr.STATS_FIELDS
    before = sr.stats()
    ptr = global_alloc.alloc(MIB)
    during = sr.stats(global_alloc)
    assert during.allocs == before.allocs + 1
    assert during.live_segments == before.live_segments + 1
    global_alloc.free(ptr)
    assert sr.stats().mem_frees == before.mem_frees + 1


def test_bad_input_raises_typed_errors(global_alloc: sr.Allocator, sim_comm: int) -> None:
    with pytest.raises(sr.AllocError, match="zero-byte"):
        global_alloc.alloc(0)
    with pytest.raises(sr.BadPointerError, match="null"):
        global_alloc.free(0)
    with pytest.raises(sr.BadPointerError, match="not a live allocation"):
        global_alloc.free(0xDEAD000)
    ptr = global_alloc.alloc(MIB)
    global_alloc.free(ptr)
    with pytest.raises(sr.BadPointerError, match="double free"):
        global_alloc.free(ptr)
    with pytest.raises(sr.AttachError, match="null"):
        global_alloc.attach(0)
    with pytest.raises(sr.AttachError, match="already attached"):
        global_alloc.attach(sim_comm)
    with pytest.raises(sr.NotAttachedError, match="attach it first"):
        global_alloc.register(0x1234)
    with pytest.raises(sr.NotAttachedError):
        global_alloc.detach(0x1234)
    with pytest.raises(sr.NotAttachedError):
        global_alloc.window_of(0x1000, 1, 0x1234)
    with pytest.raises(sr.NotCheckedError, match="not a checked comm"):
        global_alloc.abstain(sim_comm)
    with pytest.raises(ValueError, match="positive seconds"):
        global_alloc.attach(0x5678, deadline=-1.0)
    with pytest.raises(ValueError, match="exclude each other"):
        global_alloc.attach(0x5678, owned=True, abort=lambda c: None)
    with pytest.raises(TypeError):
        global_alloc.alloc("big")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        global_alloc.free(-1)


def test_lookups_tell_not_registered_and_past_the_end(
    global_alloc: sr.Allocator, sim_comm: int
) -> None:
    ptr = global_alloc.alloc(2 * MIB)
    try:
        with pytest.raises(sr.NotRegisteredError, match="not registered with .* yet: leave a symmetric-memory region"):
            global_alloc.window_of(ptr, 1, sim_comm)
        global_alloc.register(sim_comm)
        with pytest.raises(sr.BadPointerError, match="past the end"):
            global_alloc.window_of(ptr, 2 * MIB + 1, sim_comm)
    finally:
        global_alloc.free(ptr)


def test_a_comm_without_symmetric_support_gives_no_window(global_alloc: sr.Allocator) -> None:
    comm = sr.sim_comm_create(symmetric=False)
    global_alloc.attach(comm)
    ptr = global_alloc.alloc(MIB)
    try:
        s = global_alloc.register(comm)
        assert (s.windows, s.null_windows) == (0, 1)
        with pytest.raises(sr.NoWindowError, match="without a window"):
            global_alloc.window_of(ptr, 1, comm)
    finally:
        global_alloc.free(ptr)
        global_alloc.detach(comm)
        sr.sim_comm_destroy(comm)


def test_every_exception_is_a_segment_registry_error() -> None:
    classes = [
        getattr(_native, n)
        for n in dir(_native)
        if n.endswith("Error") and isinstance(getattr(_native, n), type)
    ]
    assert len(classes) >= 18
    for c in classes:
        assert issubclass(c, sr.SegmentRegistryError), c
        assert c.__doc__, c
    assert not issubclass(sr.TimeoutError, OSError), "not the builtin TimeoutError"


def test_register_all_runs_every_comm_and_returns_errors_not_raises(
    global_alloc: sr.Allocator, sim_comm: int
) -> None:
    other = sr.sim_comm_create()
    global_alloc.attach(other)
    ptr = global_alloc.alloc(MIB)
    try:
        results = global_alloc.register_all()
        mine = [r for r in results if isinstance(r, sr.PassSummary) and r.comm in (sim_comm, other)]
        assert sorted(r.comm for r in mine) == sorted([sim_comm, other])
        assert all(len(r.registered) == 1 for r in mine)
    finally:
        global_alloc.free(ptr)
        global_alloc.detach(other)
        sr.sim_comm_destroy(other)


def test_python_threads_allocate_and_free_at_once(global_alloc: sr.Allocator, sim_comm: int) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def churn() -> None:
        try:
            start.wait()
            for _ in range(200):
                p = global_alloc.alloc(MIB)
                global_alloc.window_of  # a lookup racing the frees is legal
                global_alloc.free(p)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    before = sr.stats()
    threads = [threading.Thread(target=churn) for _ in range(8)]
    for t in threads:
        t.start()
    passes = 0
    while any(t.is_alive() for t in threads):
        global_alloc.register(sim_comm)
        passes += 1
    for t in threads:
        t.join()
    assert not errors, errors
    after = sr.stats()
    assert after.allocs - before.allocs == 1600
    assert after.mem_frees - before.mem_frees == 1600
    assert after.windows_registered - before.windows_registered == (
        after.windows_deregistered - before.windows_deregistered
    )
    assert after.live_segments == before.live_segments and passes > 0


def test_a_stalled_registration_ends_at_its_deadline_and_a_second_pass_meanwhile_is_busy() -> None:
    world = sr.SimWorld(1)
    a = world.rank(0)
    (comm,) = world.comm_create([0], nonblocking=True)
    aborted: list[int] = []

    def abort(raw: int) -> None:
        aborted.append(raw)
        world.abort(raw)

    a.attach(comm, deadline=1.0, abort=abort)
    a.alloc(MIB)
    world.stall_next_register(comm)
    outcome: list[BaseException] = []

    def stalled_pass() -> None:
        try:
            a.register(comm)
        except sr.SegmentRegistryError as e:
            outcome.append(e)

    t = threading.Thread(target=stalled_pass, daemon=True)
    t.start()
    time.sleep(0.2)  # the pass is inside its stalled registration by now
    with pytest.raises(sr.BusyError, match="already running"):
        a.register(comm)
    t.join(10)
    assert not t.is_alive(), "the deadline ended the stalled registration"
    assert len(outcome) == 1 and isinstance(outcome[0], sr.TimeoutError), outcome
    assert "aborted" in str(outcome[0])
    assert aborted == [comm], "the owner's hook aborted the comm, once"
    assert a.comms()[0].state == "aborted"
    with pytest.raises(sr.AbortedError, match="detach it"):
        a.register(comm)
    assert a.detach(comm) == 0, "an aborted comm detaches without NCCL calls"
    s = sr.Stats.of(a)
    assert (s.timeouts, s.comms_aborted) == (1, 1)
    assert world.violations() == []
