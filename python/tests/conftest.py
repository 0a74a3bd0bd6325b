"""Shared fixtures: the process-wide allocator on the simulated backend,
and two-rank simulated worlds driven from Python threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

import segment_registry as sr

T = TypeVar("T")

#: How long a test waits for a rank's thread before calling it a hang.
JOIN_TIMEOUT = 20.0


@pytest.fixture(scope="session")
def global_alloc() -> sr.Allocator:
    """The process-wide allocator, on the simulated backend."""
    return sr.init("sim")


@pytest.fixture
def sim_comm(global_alloc: sr.Allocator) -> Iterator[int]:
    """A one-rank simulated comm of the process-wide allocator, attached
    unchecked; detached and destroyed afterwards."""
    comm = sr.sim_comm_create()
    global_alloc.attach(comm)
    yield comm
    if global_alloc.is_attached(comm):
        global_alloc.detach(comm)
    sr.sim_comm_destroy(comm)


def on_ranks(*work: Callable[[], T]) -> list[T | BaseException | None]:
    """Runs each callable on a thread of its own (one per simulated rank)
    and returns what each returned or raised, in order. Fails the test if
    a thread is still running after :data:`JOIN_TIMEOUT` (a hang)."""
    results: list[T | BaseException | None] = [None] * len(work)

    def run(i: int, f: Callable[[], T]) -> None:
        try:
            results[i] = f()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[i] = e

    threads = [
        threading.Thread(target=run, args=(i, f), daemon=True) for i, f in enumerate(work)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    alive = [i for i, t in enumerate(threads) if t.is_alive()]
    if alive:
        pytest.fail(f"ranks {alive} still running after {JOIN_TIMEOUT} s: a hang")
    return results
