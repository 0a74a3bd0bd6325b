"""Mutation checks under loom, by hand.

Each survivor of the plain suites that lies in loom-only code (the model
reclaimer of ``registry/src/sync.rs``), behind a fault switch
(``registry/src/faults.rs``, taken only by the loom controls and races) or
in a seqlock only a race can tear (the glue's raw-handle index) is applied
to the tree, the loom model that should catch it runs, and the file is
restored (also on failure). cargo-mutants cannot judge these: its builds
have no ``loom`` feature.

Usage: ``python3 mutants/loom_check.py`` (from anywhere). Prints one line per
mutant: ``CAUGHT`` or ``MISSED``, the model, the time.
"""

from __future__ import annotations

import pathlib
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: The registry's models, and the glue's own (its library's loom tests).
REGISTRY = ["-p", "segment-registry-loom", "--test", "models"]
GLUE = ["-p", "segment-registry-nccl", "--lib"]
RAW_INDEX = "cuda-glue/src/allocator/raw_index.rs"
SEQLOCK_MODEL = "raw_index::loom_model::a_reader_never_sees_a_torn_handle_and_id"

#: (mutant as cargo-mutants names it, file, text, its mutation, loom model)
#: for the registry's models; the glue's cases follow.
CASES: list[tuple[str, str, str, str, str]] = [
    ("registry/src/faults.rs: replace Switches::free_without_defer -> bool with false",
     "registry/src/faults.rs", "        return self.0.free_without_defer;", "        return false;",
     "reclamation::negative_free_without_defer"),
    ("registry/src/faults.rs: replace Switches::digest_from_second_walk -> bool with false",
     "registry/src/faults.rs", "        return self.0.digest_from_second_walk;", "        return false;",
     "agreement::negative_digest_from_a_second_walk"),
    ("registry/src/faults.rs: replace Switches::skip_lookup_live_recheck -> bool with true",
     "registry/src/faults.rs", "        return self.0.skip_lookup_live_recheck;", "        return true;",
     "window_lookup::never_returns_a_window_recorded_after_untrack"),
    ("registry/src/sync.rs: replace reclaim::PoisonFlag::check with ()",
     "registry/src/sync.rs", '''            assert!(
                !self.0.load(Ordering::Relaxed),
                "access to a reclaimed node (model reclaimer)"
            );''', "", "reclamation::negative_free_without_defer"),
    ("registry/src/sync.rs: replace += with *= in reclaim::Reclaimer::guard",
     "registry/src/sync.rs", "            st.next_guard += 1;", "            st.next_guard *= 1;",
     "reclamation::readers_race_an_untrack_and_its_sweep"),
    ("registry/src/sync.rs: replace += with -= in reclaim::Reclaimer::guard",
     "registry/src/sync.rs", "            st.next_guard += 1;", "            st.next_guard -= 1;",
     "reclamation::readers_race_an_untrack_and_its_sweep"),
    ("registry/src/sync.rs: replace reclaim::<impl Drop for Guard>::drop with ()",
     "registry/src/sync.rs", '''            let mut st = self.state.lock().unwrap();
            st.active.remove(&self.id);''', '''            if true {
                return;
            }
            let mut st = self.state.lock().unwrap();
            st.active.remove(&self.id);''',
     "page_map::negative_skip_page_withdraw"),
]


#: (mutant, file, text, its mutation, loom model) judged by the glue's models.
GLUE_CASES: list[tuple[str, str, str, str, str]] = [
    ("cuda-glue/src/allocator/raw_index.rs: replace + with * in RawIndex::write (s + 1)",
     RAW_INDEX, "slot.seq.store(s + 1, Ordering::Relaxed);",
     "slot.seq.store(s * 1, Ordering::Relaxed);", SEQLOCK_MODEL),
    ("cuda-glue/src/allocator/raw_index.rs: replace + with * in RawIndex::write (s + 2)",
     RAW_INDEX, "slot.seq.store(s + 2, Ordering::Release);",
     "slot.seq.store(s * 2, Ordering::Release);", SEQLOCK_MODEL),
    ("cuda-glue/src/allocator/raw_index.rs: replace & with | in RawIndex::find",
     RAW_INDEX, "if s1 & 1 == 1 {", "if s1 | 1 == 1 {", SEQLOCK_MODEL),
    ("cuda-glue/src/allocator/raw_index.rs: replace & with ^ in RawIndex::find",
     RAW_INDEX, "if s1 & 1 == 1 {", "if s1 ^ 1 == 1 {", SEQLOCK_MODEL),
]


def check(name: str, path: str, old: str, new: str, model: str,
          suite: list[str] | None = None) -> bool:
    """Applies one mutation, runs ``model`` of ``suite`` under loom, restores; ``True`` if caught."""
    p = ROOT / path
    orig = p.read_text()
    if orig.count(old) != 1:
        raise SystemExit(f"{name}: the text to mutate is not in {path} exactly once")
    start = time.time()
    try:
        p.write_text(orig.replace(old, new))
        r = subprocess.run(
            ["cargo", "test", "-q", "--features", "loom", *(suite or REGISTRY), "--", model],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )
    finally:
        p.write_text(orig)
    caught = r.returncode != 0
    print(f"{'CAUGHT' if caught else 'MISSED'}  {name}  (loom {model}, {time.time() - start:.0f} s)",
          flush=True)
    return caught


def main() -> int:
    """Checks every case; the exit status is the number missed."""
    missed = sum(not check(*case) for case in CASES)
    return missed + sum(not check(*case, suite=GLUE) for case in GLUE_CASES)


if __name__ == "__main__":
    raise SystemExit(main())
