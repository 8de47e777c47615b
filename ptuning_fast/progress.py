"""Progress of the long commands (`ptuning-fast verify`, `ptuning-fast bench`): one line on
stderr when a case starts and one when it ends, with its time and the time since the start, so
that a log shows where a slow or stuck run is (stdout keeps only the results)."""
from __future__ import annotations

import sys
import time


class Progress:
    """`start(label)` then `done(outcome)` for each of `total` cases, in order."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream
        self.index = 0
        self.label = ""
        self.began = time.perf_counter()
        self.case_began = self.began

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def start(self, label: str) -> None:
        self.index += 1
        self.label = label
        self.case_began = time.perf_counter()
        self._print(f"[{self.index}/{self.total}] {label} ...")

    def done(self, outcome: str) -> None:
        now = time.perf_counter()
        self._print(f"[{self.index}/{self.total}] {self.label}: {outcome} in "
                    f"{now - self.case_began:.1f} s (elapsed {now - self.began:.1f} s)")
