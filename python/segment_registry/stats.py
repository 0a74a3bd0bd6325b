"""The allocator's statistics as a typed, immutable object."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import _native


@dataclass(frozen=True)
class Stats:
    """A snapshot of an allocator's figures (``Allocator.stats_dict`` typed).

    The fields are those of the C struct ``segreg_stats_t``, in its order;
    :data:`segment_registry._native.STATS_FIELDS` lists them, and a test
    checks that this class names exactly those.
    """

    live_segments: int
    live_bytes: int
    allocs: int
    alloc_failures: int
    frees: int
    bad_frees: int
    passes: int
    windows_registered: int
    null_windows: int
    register_failures: int
    windows_deregistered: int
    windows_live: int
    deregisters_deferred: int
    handed_back: int
    deregister_failures: int
    windows_stuck: int
    pending_frees: int
    mem_frees: int
    mem_free_failures: int
    comms_attached: int
    comms_failed: int
    sim_violations: int
    orphans: int
    agreements: int
    diverged: int
    agreement_failures: int
    timeouts: int
    stalls: int
    comms_aborted: int
    windows_dropped: int

    @classmethod
    def of(cls, allocator: _native.Allocator) -> Stats:
        """The statistics of ``allocator`` now."""
        return cls(**allocator.stats_dict())

    def as_dict(self) -> dict[str, int]:
        """Every field by name, in the C struct's order."""
        return dataclasses.asdict(self)


def stats(allocator: _native.Allocator | None = None) -> Stats:
    """The statistics of ``allocator`` (default: the process-wide one).

    >>> import segment_registry as sr
    >>> a = sr.init("sim")
    >>> sr.stats(a).live_segments >= 0
    True
    """
    return Stats.of(allocator if allocator is not None else _native.global_allocator())
