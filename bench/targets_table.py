"""The targets table of one results file (docs/design.md's targets, each judged on the worst case
it covers), with the run's device and date: the last step of bench/gpu_session.sh.

    python bench/targets_table.py results.json > targets.md
"""
from __future__ import annotations

import sys
from pathlib import Path

from ptuning_fast.benchmarks import report, results


def targets_markdown(path: Path) -> str:
    head, records = results.read(path)
    measured = sum(r.get("skipped") is None for r in records)
    return (f"# Targets: {head['device']}, {head['created']}\n\n"
            f"From {path.name}: {measured} measured case(s), {len(records) - measured} not "
            f"measured.\n\n{report.targets_section(head, records)}\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/targets_table.py RESULTS.json")
    print(targets_markdown(Path(sys.argv[1])), end="")
