"""A simulated two-rank world driven from Python threads: checked passes
agree across ranks, a divergence is a typed error on every rank, and the
accounting stays exact."""

from __future__ import annotations

import pytest

import segment_registry as sr
from conftest import on_ranks

MIB = 1 << 20


def two_checked_ranks() -> tuple[sr.SimWorld, list[sr.Allocator], list[int]]:
    """A world of two ranks with one comm attached checked on both (the
    attach is collective, so both ranks attach on threads of their own)."""
    world = sr.SimWorld(2)
    ranks = [world.rank(0), world.rank(1)]
    comm = world.comm_create([0, 1])
    results = on_ranks(
        lambda: ranks[0].attach(comm[0], checked=True, deadline=10.0),
        lambda: ranks[1].attach(comm[1], checked=True, deadline=10.0),
    )
    assert results == [None, None]
    return world, ranks, comm


def test_matching_checked_passes_register_on_both_ranks() -> None:
    world, ranks, comm = two_checked_ranks()
    ptrs = [[a.alloc(2 * MIB), a.alloc(4 * MIB)] for a in ranks]
    results = on_ranks(lambda: ranks[0].register(comm[0]), lambda: ranks[1].register(comm[1]))
    for r, p in zip(results, ptrs):
        assert isinstance(r, sr.PassSummary), r
        assert r.registered == [(p[0], 2 * MIB), (p[1], 4 * MIB)]
        assert r.windows == 2
    assert world.violations() == []


def test_a_divergent_pass_raises_on_both_ranks_and_the_next_matching_one_registers() -> None:
    world, ranks, comm = two_checked_ranks()
    for a in ranks:
        a.alloc(2 * MIB)
    extra = ranks[1].alloc(2 * MIB)
    results = on_ranks(lambda: ranks[0].register(comm[0]), lambda: ranks[1].register(comm[1]))
    assert all(isinstance(r, sr.DivergedError) for r in results), results
    assert "pending segments" in str(results[1]) and "free or allocate" in str(results[1])
    for a in ranks:
        s = sr.Stats.of(a)
        assert (s.windows_registered, s.diverged) == (0, 1)
        assert a.comms()[0].state == "active" and a.comms()[0].pending >= 1
    ranks[1].free(extra)
    results = on_ranks(lambda: ranks[0].register(comm[0]), lambda: ranks[1].register(comm[1]))
    assert [r.windows for r in results if isinstance(r, sr.PassSummary)] == [1, 1], results
    assert world.violations() == []


def test_an_abstaining_rank_makes_every_rank_fail_fast() -> None:
    world, ranks, comm = two_checked_ranks()
    for a in ranks:
        a.alloc(2 * MIB)
    results = on_ranks(lambda: ranks[0].register(comm[0]), lambda: ranks[1].abstain(comm[1]))
    assert isinstance(results[0], sr.DivergedError), results[0]
    assert isinstance(results[1], sr.DivergedError), "abstain returns the DivergedError"
    assert "abstained" in str(results[0])
    assert all(sr.Stats.of(a).windows_registered == 0 for a in ranks)
    assert world.violations() == []


def test_detach_on_both_ranks_leaves_no_window() -> None:
    world, ranks, comm = two_checked_ranks()
    ptrs = [a.alloc(2 * MIB) for a in ranks]
    on_ranks(lambda: ranks[0].register(comm[0]), lambda: ranks[1].register(comm[1]))
    results = on_ranks(lambda: ranks[0].detach(comm[0]), lambda: ranks[1].detach(comm[1]))
    assert results == [1, 1], "each detach deregistered its one window"
    for a, p in zip(ranks, ptrs):
        a.free(p)
        s = sr.Stats.of(a)
        assert s.windows_registered == s.windows_deregistered == 1
        assert s.mem_frees == 1 and s.live_segments == 0
    with pytest.raises(sr.NotAttachedError):
        ranks[0].register(comm[0])
    assert world.violations() == []
