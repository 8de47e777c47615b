"""torch.compile on CPU: the bench's training step (its 8-layer Llama, B = 4, L = 128), ours and
PEFT's, each eager and compiled (`torch.compile(model)`, default settings), timed in alternating
rounds by process CPU time in one process, one intra-op thread.

    PYTHONPATH=$PWD python bench/cpu_compile_ab.py [method] [P]

method: prefix_tuning (default) | p_tuning | prompt_tuning; P default 16. Compiling takes ~30 s
per model on one core; each compiled model's first step (which compiles) is not timed.
"""
from __future__ import annotations

import sys
import time
import warnings

import torch

from ptuning_fast.benchmarks import command, models
from ptuning_fast.benchmarks.timing import interleaved_cpu_medians_ms


def main(argv: list[str]) -> None:
    method = argv[0] if argv else "prefix_tuning"
    P = int(argv[1]) if len(argv) > 1 else 16
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cpu = torch.device("cpu")
    labels, steps = [], []
    for case in command.build_cases(["train_step"], [], cpu, quick=True):   # B = 4, L = 128
        if case.method != method:
            continue
        case.P = P
        for compiled in (False, True):
            prepared = models.prepare_train_step(case, cpu, compile_model=compiled)
            began = time.perf_counter()
            prepared.step()
            print(f"{case.provider} {'compiled' if compiled else 'eager'}: first step "
                  f"{time.perf_counter() - began:.1f} s", file=sys.stderr)
            labels.append(f"{case.provider}, {'compiled' if compiled else 'eager'}")
            steps.append(prepared.step)
    medians = interleaved_cpu_medians_ms(steps, quick=False)
    print(f"train step, {method}, B = 4, L = 128, P = {P}, fp32, CPU time medians")
    print("| candidate | ms | vs PEFT eager | vs PEFT compiled |")
    print("|---|---|---|---|")
    peft_eager, peft_compiled = medians[labels.index("peft, eager")], \
        medians[labels.index("peft, compiled")]
    for label, ms in zip(labels, medians):
        print(f"| {label} | {ms:.1f} | {peft_eager / ms:.2f}x | {peft_compiled / ms:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
