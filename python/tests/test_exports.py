"""The installed extension is the C library PyTorch loads: it exports every
function of the C header, a segment allocated through ``segreg_alloc`` by
``ctypes`` is the one the Python API sees, and a second copy of the
library in the process refuses to initialize."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import segment_registry as sr

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / "cuda-glue" / "include" / "segment_registry.h"
MIB = 1 << 20


def header_functions() -> set[str]:
    """The functions the C header declares."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    return set(re.findall(r"\b(segreg_\w+)\s*\(", text))


def exported_functions(path: str) -> set[str]:
    """The functions ``nm -D`` lists as defined in the shared object."""
    out = subprocess.run(
        ["nm", "-D", "--defined-only", path], check=True, capture_output=True, text=True
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if " T " in line}


def test_the_installed_module_exports_every_header_function() -> None:
    if shutil.which("nm") is None:
        pytest.fail("nm (binutils) is needed for this test")
    declared = header_functions()
    assert len(declared) >= 20, declared
    exported = exported_functions(sr.library_path())
    assert declared <= exported, f"missing: {sorted(declared - exported)}"
    assert set(sr.C_ENTRY_POINTS) == declared
    assert "segment_registry_state_probe" in exported


def test_a_segment_allocated_through_ctypes_is_the_one_python_sees(
    global_alloc: sr.Allocator, sim_comm: int
) -> None:
    lib = ctypes.CDLL(sr.library_path())
    lib.segreg_alloc.restype = ctypes.c_void_p
    lib.segreg_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.segreg_free.restype = None
    lib.segreg_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    before = sr.stats()
    ptr = lib.segreg_alloc(2 * MIB, 0, None)
    assert ptr, "segreg_alloc answered null"
    assert sr.stats().live_segments == before.live_segments + 1
    summary = global_alloc.register(sim_comm)
    assert summary.registered == [(ptr, 2 * MIB)]
    window, offset = global_alloc.window_of(ptr, 4096, sim_comm)
    assert window != 0 and offset == 0
    lib.segreg_free(ctypes.c_void_p(ptr), 2 * MIB, 0, None)
    after = sr.stats()
    assert after.live_segments == before.live_segments
    assert after.mem_frees == before.mem_frees + 1


def standalone_cdylib() -> Path:
    """The standalone C library (``cargo build -p segment-registry-nccl``),
    or ``SEGREG_CDYLIB``."""
    given = os.environ.get("SEGREG_CDYLIB")
    path = Path(given) if given else REPO / "target" / "debug" / "libsegment_registry_nccl.so"
    if not path.exists():
        pytest.fail(f"{path} not found: build it with `cargo build -p segment-registry-nccl`")
    return path


ONE_STATE = """
import ctypes, sys
import segment_registry as sr
lib = ctypes.CDLL(sys.argv[1])
lib.segreg_last_error.restype = ctypes.c_char_p
if sys.argv[2] == "module-first":
    sr.init("sim")
    rc = lib.segreg_init_sim()
    print(rc, lib.segreg_last_error().decode())
else:
    assert lib.segreg_init_sim() == 0
    try:
        sr.init("sim")
        print("initialized")
    except sr.DuplicateStateError as e:
        print("refused", e)
"""


@pytest.mark.parametrize("order", ["module-first", "cdylib-first"])
def test_two_copies_of_the_allocator_in_one_process_are_refused(order: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", ONE_STATE, str(standalone_cdylib()), order],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    if order == "module-first":
        assert out.startswith("-1 "), out
        assert "another copy" in out and "_native" in out, out
    else:
        assert out.startswith("refused "), out
        assert "libsegment_registry_nccl.so" in out, out
