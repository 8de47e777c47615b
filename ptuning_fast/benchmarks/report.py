"""Human-readable output of a results file: a markdown table per op and one PNG plot per op."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

OP_ORDER = ("prefix_attention", "attention_terms", "decode", "prompt_embedding", "train_step",
            "generate")
PROVIDER_ORDER = ("fused", "torch", "ptuning_fast", "ptuning_fast_static", "naive", "peft",
                  "peft_algorithm",
                  "cat_sdpa", "flex", "flash_attn", "copy")
ROW_KEYS = {
    "prefix_attention": ("mode", "dtype", "B", "Hq", "Hkv", "D", "P", "Lk"),
    "attention_terms": ("mode", "terms", "dtype", "B", "Hq", "Hkv", "D", "P", "Lk"),
    "decode": ("dtype", "B", "Hq", "Hkv", "D", "P", "Lk"),
    "prompt_embedding": ("dtype", "B", "Lq", "P", "D"),
    "train_step": ("method", "dtype", "B", "Lq", "P"),
    "generate": ("method", "dtype", "B", "Lq", "Lk", "P"),
}
COLUMN_TITLES = {"Lq": {"prompt_embedding": "L", "train_step": "L", "generate": "prompt"},
                 "D": {"prompt_embedding": "d"}, "Lk": {"generate": "total"}}
# Whose speed the ratio columns compare against the others: ours when it ran (the kernels, else
# on CPU the torch backend), else the best concatenation path.
# The provider whose speedups a table shows: ours first (fused kernels, else our torch path).
LEADS = {"prefix_attention": ("fused", "torch", "cat_sdpa"),
         "attention_terms": ("fused", "torch", "naive"),
         "decode": ("fused", "torch", "cat_sdpa"), "prompt_embedding": ("fused", "torch", "naive"),
         "train_step": ("ptuning_fast",), "generate": ("ptuning_fast",)}


def is_cpu(head: dict) -> bool:
    return str(head.get("device", "")).startswith("CPU")


def _fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def _cell(op: str, rec: dict) -> str:
    mem = f", {rec['peak_mem_mb']:,.0f} MB" if rec.get("peak_mem_mb") is not None else ""
    if op in ("prefix_attention", "attention_terms"):
        return f"{_fmt(rec['median_ms'])} ms, {_fmt(rec['tflops'])} TF/s{mem}"
    if op in ("decode", "prompt_embedding"):
        return f"{_fmt(rec['median_ms'])} ms, {_fmt(rec['gbps'])} GB/s{mem}"
    return f"{_fmt(rec['tokens_per_s'])} tok/s{mem}"


def _ordered(names) -> list[str]:
    return sorted(set(names), key=lambda n: PROVIDER_ORDER.index(n)
                  if n in PROVIDER_ORDER else len(PROVIDER_ORDER))


def _rows(op: str, records: list[dict]) -> dict[tuple, dict[str, dict]]:
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for rec in records:
        if rec["op"] == op and rec.get("skipped") is None:
            rows[tuple(rec[k] for k in ROW_KEYS[op])][rec["provider"]] = rec
    return rows


def _lead(op: str, rows) -> str | None:
    present = {p for row in rows.values() for p in row}
    return next((p for p in LEADS[op] if p in present), None)


def op_table(op: str, records: list[dict]) -> str:
    rows = _rows(op, records)
    if not rows:
        return ""
    names = _ordered(p for row in rows.values() for p in row)
    lead = _lead(op, rows)
    # A variant of the lead (ptuning_fast_static beside ptuning_fast) is ours too: it gets its
    # own speedup columns against the others, never one against the lead.
    leads = [p for p in names if lead and (p == lead or p.startswith(lead + "_"))]
    others = [p for p in names if p not in leads and p != "copy"]
    titles = [COLUMN_TITLES.get(k, {}).get(op, k) for k in ROW_KEYS[op]] + names
    speedups = lead and op != "prompt_embedding"
    shares = lead and "copy" in names
    if shares:
        titles += [f"{p} % of copy" for p in names if p != "copy"]
    if speedups:
        titles += [f"{ours} speedup vs {p}" for ours in leads for p in others]
        if op in ("train_step", "generate"):
            titles += [f"{ours} memory / {p}" for ours in leads for p in others]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for key, row in rows.items():
        cells = [str(k) for k in key] + [_cell(op, row[p]) if p in row else "" for p in names]
        if shares:
            copy = row.get("copy")
            cells += [f"{100 * row[p]['gbps'] / copy['gbps']:.0f}%"
                      if p in row and row[p]["gbps"] and copy and copy["gbps"] else ""
                      for p in names if p != "copy"]
        if speedups:
            cells += [f"{row[p]['median_ms'] / row[ours]['median_ms']:.2f}x"
                      if ours in row and p in row else "" for ours in leads for p in others]
            if op in ("train_step", "generate"):
                cells += [f"{row[ours]['peak_mem_mb'] / row[p]['peak_mem_mb']:.2f}x"
                          if ours in row and p in row and row[ours]["peak_mem_mb"]
                          and row[p]["peak_mem_mb"] else "" for ours in leads for p in others]
        lines.append("| " + " | ".join(cells) + " |")
    if op == "train_step":
        lines += _checkpointed_line(rows)
    return "\n".join(lines)


def _checkpointed_line(rows) -> list[str]:
    """Ours with activation checkpointing against PEFT's plain prefix tuning (which cannot
    checkpoint): the pair that decides the memory target."""
    ours = [r["ptuning_fast"] for k, r in rows.items()
            if k[0] == "prefix_tuning_checkpointed" and "ptuning_fast" in r]
    peft = [r["peft"] for k, r in rows.items() if k[0] == "prefix_tuning" and "peft" in r]
    if not (ours and peft):
        return []
    speed = ours[0]["tokens_per_s"] / peft[0]["tokens_per_s"]
    line = f"ptuning_fast prefix_tuning_checkpointed vs peft prefix_tuning: {speed:.2f}x tokens/s"
    if ours[0]["peak_mem_mb"] and peft[0]["peak_mem_mb"]:
        line += f", {ours[0]['peak_mem_mb'] / peft[0]['peak_mem_mb']:.2f}x peak memory"
    return ["", line + "."]


def skipped_table(records: list[dict]) -> str:
    counts = Counter((r["op"], r["mode"], r["provider"], r["skipped"])
                     for r in records if r.get("skipped") is not None)
    if not counts:
        return ""
    lines = ["| op | mode | provider | cases | reason |", "|---|---|---|---|---|"]
    lines += [f"| {op} | {mode} | {prov} | {n} | {reason} |"
              for (op, mode, prov, reason), n in counts.items()]
    return "\n".join(lines)


def targets_section(head: dict, records: list[dict]) -> str:
    """The targets of docs/design.md judged on a run's records: the GPU targets, or without a
    GPU the CPU ones."""
    from . import targets
    rows_by_op = {op: _rows(op, records) for op in OP_ORDER}
    if not is_cpu(head):
        return "## Targets (docs/design.md)\n\n" + targets.table(rows_by_op)
    return ("## Targets without Triton (docs/design.md)\n\n"
            + targets.table(rows_by_op, targets.CPU_TARGETS, "target (CPU, fp32)"))


def markdown(head: dict, records: list[dict], plot_names: dict[str, str] | None = None) -> str:
    out = [f"# ptuning_fast benchmarks: {head['device']}, {head['created']}", "",
           f"torch {head['torch']}, triton {head['triton']}, transformers {head['transformers']}. "
           "Medians; TF/s counts only unmasked (causal + prefix) work; MB is peak CUDA memory "
           "(the call's own for ops, everything allocated for train_step/generate)."]
    if is_cpu(head):
        out += ["", "**CPU figures**: small sizes, fp32, no peak memory, one thread on a shared "
                "machine. train_step and generate time ours (backend \"auto\": the torch path "
                "on CPU) and PEFT in alternation, round by round, by process CPU time (not "
                "wall-clock: time spent waiting for a core is not counted), and take each one's "
                "median, so load from other processes falls on both; their ratios are "
                "comparable within a run. The op cases run one after another (the same case has moved by up to 2x "
                "between runs here): read no speedup from them. None of it says anything about "
                "GPU performance; kernel timings need a GPU."]
    out += ["", targets_section(head, records)]
    for op in OP_ORDER:
        table = op_table(op, records)
        if table:
            out += ["", f"## {op}", "", table]
            if plot_names and op in plot_names:
                out += ["", f"![{op}]({plot_names[op]})"]
    skipped = skipped_table(records)
    if skipped:
        out += ["", "## Not measured", "", skipped]
    return "\n".join(out) + "\n"


def _subplots(count: int, width=5.0, height=3.6):
    import matplotlib.pyplot as plt
    cols = min(count, 4)
    rows = (count + cols - 1) // cols
    # room for the two-line title however few panels there are
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.0, width * cols), height * rows + 0.6),
                             squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _line_plot(op: str, records: list[dict], metric: str, ylabel: str, panel_keys: tuple):
    """x = Lk (log scale), one line per (provider, P), one panel per `panel_keys` value."""
    measured = [r for r in records if r["op"] == op and r.get("skipped") is None]
    panels = sorted({tuple(r[k] for k in panel_keys) for r in measured}, key=str)
    fig, axes = _subplots(len(panels))
    names = _ordered(r["provider"] for r in measured)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    for ax, panel in zip(axes, panels):
        mine = [r for r in measured if tuple(r[k] for k in panel_keys) == panel]
        prefixes = sorted({r["P"] for r in mine})
        for ci, name in enumerate(names):
            for si, P in enumerate(prefixes):
                pts = sorted((r["Lk"], r[metric]) for r in mine
                             if r["provider"] == name and r["P"] == P and r[metric] is not None)
                if pts:
                    ax.plot(*zip(*pts), styles[si % len(styles)], marker=markers[si % 4],
                            color=f"C{ci}",
                            label=f"{name} P={P}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("Lk (keys per row, prefix excluded)")
        ax.set_ylabel(ylabel)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel)), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return fig


def _bar_plot(op: str, records: list[dict], metrics: list[tuple[str, str]], group_keys: tuple):
    measured = [r for r in records if r["op"] == op and r.get("skipped") is None]
    groups = sorted({tuple(r[k] for k in group_keys) for r in measured}, key=str)
    names = _ordered(r["provider"] for r in measured)
    shown = [(m, label) for m, label in metrics if any(r[m] is not None for r in measured)]
    fig, axes = _subplots(len(shown), width=max(5.0, 1.6 * len(groups) * len(names) / 2))
    width = 0.8 / max(1, len(names))
    for ax, (metric, label) in zip(axes, shown):
        for i, name in enumerate(names):
            values = []
            for g in groups:
                hit = [r[metric] for r in measured if r["provider"] == name
                       and tuple(r[k] for k in group_keys) == g]
                values.append(hit[0] if hit and hit[0] is not None else 0.0)
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=name,
                   color=f"C{i}")
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(groups))])
        ax.set_xticklabels(["\n".join(f"{k}={v}" for k, v in zip(group_keys, g)) for g in groups],
                           fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plotting_unavailable() -> str | None:
    """Why no plot can be drawn here (matplotlib is an optional dependency: `[bench]`), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'ptuning_fast[bench]'): no plots"
    return None


def plot(op: str, head: dict, records: list[dict], path: Path) -> bool:
    """Writes `path` (PNG) for `op`; False when the op has no measured record."""
    if not any(r["op"] == op and r.get("skipped") is None for r in records):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if op == "prefix_attention":
        fig = _line_plot(op, records, "tflops", "TFLOP/s", ("mode", "dtype", "D"))
    elif op == "decode":
        fig = _line_plot(op, records, "gbps", "GB/s", ("dtype", "D"))
    elif op == "prompt_embedding":
        fig = _bar_plot(op, records, [("gbps", "GB/s")], ("dtype", "B", "Lq"))
    elif op == "attention_terms":
        fig = _bar_plot(op, records, [("tflops", "TFLOP/s")], ("mode", "terms", "Lk"))
    else:
        fig = _bar_plot(op, records, [("tokens_per_s", "tokens/s"), ("peak_mem_mb", "peak MB")],
                        ("method",))
    label = "CPU figures: not kernel timings" if is_cpu(head) else "GPU"
    fig.suptitle(f"{op}: {head['device']}\n{label}, {str(head['created'])[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
