"""Where a CPU training step or generation spends its time: torch.profiler over the bench's own
model cases (ptuning_fast/benchmarks/models.py), top operators by self CPU time.

    PYTHONPATH=$PWD python bench/profile_cpu_step.py train_step prefix_tuning ptuning_fast
    PYTHONPATH=$PWD python bench/profile_cpu_step.py generate prompt_tuning peft_algorithm

Arguments: op (train_step | generate), method (prefix_tuning | p_tuning | prompt_tuning),
provider (ptuning_fast | peft | peft_algorithm), then optionally B L P (default: the bench's CPU
shape). One intra-op thread, as the bench.
"""
from __future__ import annotations

import sys
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from ptuning_fast.benchmarks import command


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def main(argv: list[str]) -> None:
    op, method, provider = argv[:3]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    device = torch.device("cpu")
    case = next(c for c in command.build_cases([op], [], device, quick=True)
                if c.method == method and c.provider == provider)
    if len(argv) > 3:
        B, L, P = (int(a) for a in argv[3:6])
        new = (case.Lk - case.Lq) if case.Lk else 0
        case.B, case.Lq, case.P = B, L, P
        case.Lk = L + new if op == "generate" else None
    prepared = case.prepare(case, device)
    prepared.step()
    prepared.step()
    steps = 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            prepared.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    # The profiler clocks operators by wall time: on a loaded machine the total is inflated,
    # the shares are what to read.
    print(f"{case.label()}: {total / steps / 1e3:.1f} ms of operator self time per step")
    # The linear layers' products: the frozen model's work, the same in every provider.
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(f"matrix products ({', '.join(MATMULS)}): {matmul / steps / 1e3:.1f} ms per step, "
          f"{100 * matmul / total:.1f}%")
    print("| operator | share of self time | calls per step |")
    print("|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% | {e.count / steps:g} |")


if __name__ == "__main__":
    main(sys.argv[1:])
