"""The performance targets of docs/design.md as data, checked against a run's records:
for each, the worst case among those it covers, and whether that meets it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Row = dict  # provider -> record, for one shape (see report.rows)


def _ratio(num: str, den: str, key: str) -> Callable[[Row], float | None]:
    def measure(row: Row) -> float | None:
        if num in row and den in row and row[num][key] and row[den][key]:
            return row[num][key] / row[den][key]
        return None
    return measure


def _value(provider: str, key: str) -> Callable[[Row], float | None]:
    return lambda row: row[provider][key] if provider in row else None


def _bf16_d128(rec: dict) -> bool:
    return rec["dtype"] == "bf16" and rec["D"] == 128


def _prefix_bf16_b32(rec: dict) -> bool:
    return rec["method"] == "prefix_tuning" and rec["dtype"] == "bf16" and rec["B"] >= 32


@dataclass(frozen=True)
class Target:
    text: str
    op: str
    where: Callable[[dict], bool]
    measure: Callable[[Row], float | None]
    threshold: float
    at_least: bool = True
    unit: str = "x"


TARGETS = (
    Target("prefix attention fwd vs cat_sdpa, Lk <= 1024", "prefix_attention",
           lambda r: r["mode"] == "fwd" and _bf16_d128(r) and r["Lk"] <= 1024,
           _ratio("cat_sdpa", "fused", "median_ms"), 1.3),
    Target("prefix attention fwd vs cat_sdpa, Lk = 8192", "prefix_attention",
           lambda r: r["mode"] == "fwd" and _bf16_d128(r) and r["Lk"] == 8192,
           _ratio("cat_sdpa", "fused", "median_ms"), 1.0),
    Target("prefix attention fwd TFLOP/s, Lk = 8192", "prefix_attention",
           lambda r: r["mode"] == "fwd" and _bf16_d128(r) and r["Lk"] == 8192,
           _value("fused", "tflops"), 450, unit=" TF/s"),
    Target("prefix attention fwd+bwd vs cat_sdpa", "prefix_attention",
           lambda r: r["mode"] == "fwd_bwd" and _bf16_d128(r),
           _ratio("cat_sdpa", "fused", "median_ms"), 1.2),
    Target("prefix attention fwd+bwd vs naive", "prefix_attention",
           lambda r: r["mode"] == "fwd_bwd" and _bf16_d128(r),
           _ratio("naive", "fused", "median_ms"), 2.0),
    Target("train step (prefix tuning) tokens/s vs PEFT, L = 4096", "train_step",
           lambda r: r["method"] == "prefix_tuning" and r["dtype"] == "bf16" and r["Lq"] >= 4096,
           _ratio("ptuning_fast", "peft", "tokens_per_s"), 1.3),
    Target("train step (prefix tuning) tokens/s vs PEFT, L = 512", "train_step",
           lambda r: r["method"] == "prefix_tuning" and r["dtype"] == "bf16" and r["Lq"] <= 512,
           _ratio("ptuning_fast", "peft", "tokens_per_s"), 1.0),
    Target("train step (prefix tuning) peak memory vs PEFT", "train_step",
           lambda r: r["method"] == "prefix_tuning" and r["dtype"] == "bf16",
           _ratio("ptuning_fast", "peft", "peak_mem_mb"), 0.7, at_least=False),
    Target("prompt embedding, share of copy bandwidth", "prompt_embedding",
           lambda r: r["dtype"] == "bf16" and r["B"] * r["Lq"] >= 65536,
           _ratio("fused", "copy", "gbps"), 0.8, unit=" of copy"),
    Target("decode step, share of copy bandwidth, Lk >= 4096", "decode",
           lambda r: _bf16_d128(r) and r["Lk"] >= 4096,
           _ratio("fused", "copy", "gbps"), 0.7, unit=" of copy"),
    Target("decode step vs naive", "decode", _bf16_d128,
           _ratio("naive", "fused", "median_ms"), 2.0),
    Target("generate (prefix tuning, B >= 32) tokens/s vs PEFT's algorithm", "generate",
           _prefix_bf16_b32, _ratio("ptuning_fast", "peft_algorithm", "tokens_per_s"), 1.3),
    Target("generate (prefix tuning, B >= 32), static cache + compiled step, vs PEFT's "
           "algorithm", "generate", _prefix_bf16_b32,
           _ratio("ptuning_fast_static", "peft_algorithm", "tokens_per_s"), 1.3),
)


# Without Triton (CPU): "auto" runs the torch backend; every method, training and generation.
# Generation is judged against PEFT's algorithm (benchmarks/models.py: PEFT's own generate() is
# broken with transformers >= 5.24, so its speed is that of a different computation).
CPU_TARGETS = tuple(
    Target(f"{op} ({method}) tokens/s vs {baseline}", op,
           lambda r, method=method: r["method"] == method,
           _ratio("ptuning_fast", baseline, "tokens_per_s"), 1.2)
    for op, baseline in (("train_step", "peft"), ("generate", "peft_algorithm"))
    for method in ("prefix_tuning", "p_tuning", "prompt_tuning")) + (
    Target("generate (prefix_tuning), static cache + compiled step, tokens/s vs peft_algorithm",
           "generate", lambda r: r["method"] == "prefix_tuning",
           _ratio("ptuning_fast_static", "peft_algorithm", "tokens_per_s"), 1.2),)


def evaluate(rows_by_op: dict[str, dict[tuple, Row]],
             targets=TARGETS) -> list[tuple[Target, int, float | None]]:
    """(target, cases measured, worst value) for every target; worst is None without data."""
    out = []
    for target in targets:
        values = []
        for row in rows_by_op.get(target.op, {}).values():
            if target.where(next(iter(row.values()))):
                value = target.measure(row)
                if value is not None:
                    values.append(value)
        worst = (min(values) if target.at_least else max(values)) if values else None
        out.append((target, len(values), worst))
    return out


def table(rows_by_op: dict[str, dict[tuple, Row]], targets=TARGETS,
          title="target (H100, bf16, D = 128 where it applies)") -> str:
    lines = [f"| {title} | cases | worst | goal | met |", "|---|---|---|---|---|"]
    for target, count, worst in evaluate(rows_by_op, targets):
        goal = f"{'>=' if target.at_least else '<='} {_show(target, target.threshold)}"
        if worst is None:
            lines.append(f"| {target.text} | 0 | – | {goal} | no data |")
            continue
        met = worst >= target.threshold if target.at_least else worst <= target.threshold
        lines.append(f"| {target.text} | {count} | {_show(target, worst)} | {goal} | "
                     f"{'yes' if met else 'no'} |")
    return "\n".join(lines)


def _show(target: Target, value: float) -> str:
    if target.unit == " of copy":
        return f"{100 * value:.0f}%"
    return f"{value:.0f}{target.unit}" if target.unit == " TF/s" else f"{value:.2f}{target.unit}"
