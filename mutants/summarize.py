"""Summarize cargo-mutants outcomes, one row per shard and stage, and list the missed mutants.

Usage: python3 mutants/summarize.py OUT_DIR   (as written by mutants/run.sh)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def shard_row(outcomes_file: Path) -> tuple[dict[str, int], list[str], bool]:
    """Counts per outcome, the missed mutants' names, and whether the shard ended."""
    data = json.loads(outcomes_file.read_text())
    counts = {"tested": 0, "caught": 0, "timeout": 0, "unviable": 0, "missed": 0}
    missed: list[str] = []
    for o in data.get("outcomes", []):
        scenario = o.get("scenario")
        if not isinstance(scenario, dict) or "Mutant" not in scenario:
            continue
        summary = o.get("summary", "")
        counts["tested"] += 1
        key = {
            "CaughtMutant": "caught",
            "Timeout": "timeout",
            "Unviable": "unviable",
            "MissedMutant": "missed",
        }.get(summary)
        if key:
            counts[key] += 1
        if summary == "MissedMutant":
            m = scenario["Mutant"]
            missed.append(str(m.get("name", m)))
    ended = data.get("end_time") is not None
    return counts, missed, ended


def main(out: str) -> int:
    rows = []
    all_missed: list[str] = []
    for d in sorted(p for p in Path(out).glob("stage*") if p.is_dir()):
        f = d / "mutants.out" / "outcomes.json"
        if not f.exists():
            rows.append(f"| {d.name} | no outcomes (did not run) | | | | | |")
            continue
        counts, missed, ended = shard_row(f)
        all_missed += missed
        rows.append(
            f"| {d.name} | {'yes' if ended else 'NO'} | {counts['tested']} | {counts['caught']} "
            f"| {counts['timeout']} | {counts['unviable']} | {counts['missed']} |"
        )
    print("| shard | ran to the end | tested | caught | timeouts | unviable | missed |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if all_missed:
        print("\nmissed:")
        print("\n".join(f"- {m}" for m in all_missed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
