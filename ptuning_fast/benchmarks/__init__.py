"""Benchmarks behind `ptuning-fast bench` and `pytest bench/`: prefix attention (fwd, fwd+bwd),
decode, prompt embedding, and end-to-end train step and generation against PEFT.

Layout: `case` (what a case is), `flops` (work counts), `timing` (do_bench / CPU timer, peak
memory), `providers` (the attention implementations compared), `attention`, `embedding`,
`models` (the cases), `results` (JSON), `report` (markdown and plots), `command` (the CLI).
"""
from .command import build_cases, main, run_case

__all__ = ["main", "build_cases", "run_case"]
