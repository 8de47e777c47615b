"""`ptuning-fast bench --static`: the code the kernels would run on an H100 and an A100, read from
the compiler on a machine without a GPU (ARCHITECTURE.md, "Performance").

For each benchmark shape (the lists of attention.py and embedding.py, not a copy), the real
launchers run on CPU tensors inside `launch.pretend_target(H100 | A100)` with every launch
captured instead of run (kernels/launch_capture.py). Each distinct binary is compiled once for
sm_90 / sm_80, specialized as Triton's JIT would specialize that launch; the log of Triton's
ptxas run gives registers and spills, the PTX wgmma / cp.async / TMA, the SASS each hot loop's
instruction economy (sass_loops.py), and occupancy.py the programs an SM holds and the waves of
the grid.

Processes: one per (arch, shard) captures everything (cheap) and compiles its share of the
binaries (Triton's compiler is single-threaded); the parent merges them and writes the report.
A new launcher is one WORKLOADS line (plus a driver when its inputs are not attention's).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import attention, embedding, terms
from .case import Case, Unavailable, torch_dtype
from .occupancy import blocks_per_sm, waves

GPU = torch.device("cuda")   # selects the GPU shape lists; nothing here touches CUDA
ARCHS = (90, 80)
TASKS = 4                    # per-task prefix variant: row b uses task b % TASKS
VARIANT_AT = {"D": 128, "P": 64, "Lk": 1024}   # the shape of the per-row / per-task variants
COMMAND = "ptuning-fast bench --static"


@dataclass(frozen=True)
class Work:
    """One call of the launchers to capture: a benchmark case, and how its prefix is held."""
    op: str
    case: Case
    prefix: str = "shared"           # shared | per_row | per_task (attention ops)
    tasks: int = TASKS               # per_task: the table's size (row b uses task b % tasks)

    def shape(self) -> str:
        c = self.case
        if self.op == "prompt_embedding":
            text = f"B={c.B} L={c.Lq} P={c.P} d={c.D}"
        else:
            text = f"B={c.B} Hq={c.Hq} Hkv={c.Hkv} Lq={c.Lq} Lk={c.Lk} P={c.P} D={c.D}"
        if c.terms:
            text += f" terms={c.terms}"
        if self.prefix == "per_task":
            return f"{c.dtype} {text} per_task T={self.tasks}"
        return f"{c.dtype} {text}" + ("" if self.prefix == "shared" else f" {self.prefix}")


# --- shapes: taken from the benchmark modules ------------------------------------------------

def attention_work(quick: bool) -> list[Work]:
    """Forward + backward at every bf16 shape of the benchmark grid, shared prefix (the
    forward-only cases launch the same forward)."""
    return [Work("prefix_attention", c) for c in attention.attention_cases(GPU, quick, ["fused"])
            if c.dtype == "bf16" and c.mode == "fwd_bwd"]


def prefix_variant_work(quick: bool) -> list[Work]:
    """The per-row and per-task prefixes at one benchmark shape (VARIANT_AT)."""
    cases = [w.case for w in attention_work(quick)
             if all(getattr(w.case, k) == v for k, v in VARIANT_AT.items())]
    if not cases:
        return []
    return [Work("prefix_attention", cases[0], prefix) for prefix in ("per_row", "per_task")]


# Issue 26's per-task shape (an H100, bf16): a table of T task prefixes at B = 8 rows, Lq = Lk
# = 32768, P = 128, Hkv = 8 (GQA 4:1), D = 128. The prefix gradient's splits and partials
# must follow the tasks the batch uses (at most min(T, B)), not T.
TASK_TABLE_AT = dict(B=8, Hq=32, Hkv=8, Lq=32768, Lk=32768, P=128, D=128)
TASK_TABLE_SIZES = (1, 33, 1000)


def task_table_work(quick: bool) -> list[Work]:
    case = Case("prefix_attention", "fwd_bwd", "fused", "bf16", causal=True, **TASK_TABLE_AT)
    return [Work("prefix_attention", case, "per_task", tasks) for tasks in TASK_TABLE_SIZES]


# Issue 24's shape (an H100, bf16, causal): its forward's hot-loop economy is held to targets
# by tests/test_static_report.py. Lengths only specialize on divisibility, so this compiles to
# the grid's D = 128 binaries: capturing it costs no compile.
HOT_LOOP_AT = dict(B=4, Hq=32, Hkv=8, Lq=4096, Lk=4096, P=64, D=128)


def hot_loop_work(quick: bool) -> list[Work]:
    return [Work("prefix_attention", Case("prefix_attention", "fwd_bwd", "fused", "bf16",
                                          causal=True, **HOT_LOOP_AT))]


def terms_work(quick: bool) -> list[Work]:
    """Forward + backward of every attention-term set at the terms benchmark's first length
    (the other lengths launch the same binaries: compiling them again only costs CI time)."""
    cases = [c for c in terms.terms_cases(GPU, quick, ["fused"])
             if c.mode == "fwd_bwd" and c.terms != "none"]
    return [Work("attention_terms", c) for c in cases if c.Lk == cases[0].Lk]


def embedding_work(quick: bool) -> list[Work]:
    cases = embedding.prompt_embedding_cases(GPU, quick, ["fused"])
    return [Work("prompt_embedding", c) for c in cases if c.provider == "fused"]


def decode_work(quick: bool) -> list[Work]:
    return [Work("decode", c) for c in attention.decode_cases(GPU, quick, ["fused"])
            if c.provider == "fused"]


# (Hkv, Lq) varied at the issue's decode shape (B = 8, Hq = 32, Lk = 4096, D = 128): GQA 8:1 and
# 1:1, and 2 / 4 / 16 draft tokens of speculative decoding at 4:1 (the grid has only 4:1, Lq = 1).
DECODE_VARIANTS = ((4, 1), (32, 1), (8, 2), (8, 4), (8, 16))


def decode_variant_work(quick: bool) -> list[Work]:
    issue = [w.case for w in decode_work(quick) if (w.case.Lk, w.case.B, w.case.Hq, w.case.Hkv,
                                                    w.case.D) == (4096, 8, 32, 8, 128)]
    return [Work("decode", dataclasses.replace(c, Hkv=hkv, Lq=lq))
            for c in issue[:1] for hkv, lq in DECODE_VARIANTS]


# --- drivers: call the real launchers (their launches are captured, nothing runs) -------------

def _attention_inputs(work: Work):
    """q, k, v, prefix_k, prefix_v, prefix_index as the benchmark makes them (contiguous),
    uninitialized: the kernels never run, so no page is touched."""
    c, dtype = work.case, torch_dtype(work.case.dtype)
    q = torch.empty(c.B, c.Hq, c.Lq, c.D, dtype=dtype)
    k, v = (torch.empty(c.B, c.Hkv, c.Lk, c.D, dtype=dtype) for _ in range(2))
    lead = {"shared": (), "per_row": (c.B,), "per_task": (work.tasks,)}[work.prefix]
    pk, pv = (torch.empty(*lead, c.Hkv, c.P, c.D, dtype=dtype) for _ in range(2))
    index = torch.arange(c.B) % work.tasks if work.prefix == "per_task" else None
    return q, k, v, pk, pv, index


def drive_attention(rec, work: Work) -> None:
    from ..kernels.attention_options import AttentionSpec
    from ..kernels.prefix_attention_bwd import prefix_attention_bwd
    from ..kernels.prefix_attention_fwd import prefix_attention_fwd
    q, k, v, pk, pv, index = _attention_inputs(work)
    spec = AttentionSpec(prefix_index=index, causal=work.case.causal)
    with rec.phase("fwd"):
        out, lse = prefix_attention_fwd(q, k, v, pk, pv, spec)
    if work.case.mode == "fwd_bwd":
        with rec.phase("bwd"):   # autograd's grad_out: contiguous, like the benchmark's
            prefix_attention_bwd(torch.empty_like(q), q, k, v, pk, pv, out, lse, spec)


def drive_terms(rec, work: Work) -> None:
    from ..kernels.attention_options import AttentionSpec
    from ..kernels.prefix_attention_bwd import prefix_attention_bwd
    from ..kernels.prefix_attention_fwd import prefix_attention_fwd
    from ..packing import packed_segments
    c = work.case
    q, k, v, pk, pv, index = _attention_inputs(work)
    kw = terms.term_kwargs(c.terms, c, "cpu", make=torch.empty)
    segments = packed_segments(kw.get("position_ids"), batch=c.B, length=c.Lk)
    spec = AttentionSpec(prefix_index=index, causal=c.causal, bias=kw.get("bias"),
                         sinks=kw.get("sinks"), segments=segments,
                         window_size=kw.get("window_size", (-1, -1)),
                         softcap=kw.get("softcap", 0.0))
    with rec.phase("fwd"):
        out, lse = prefix_attention_fwd(q, k, v, pk, pv, spec)
    with rec.phase("bwd"):
        prefix_attention_bwd(torch.empty_like(q), q, k, v, pk, pv, out, lse, spec)


def drive_embedding(rec, work: Work) -> None:
    from ..kernels.prompt_embedding import prompt_embedding_fwd, prompt_grad
    c, dtype = work.case, torch_dtype(work.case.dtype)
    ids = torch.empty(c.B, c.Lq, dtype=torch.int64)
    weight = torch.empty(embedding.VOCAB_GPU, c.D, dtype=dtype)
    prompt = torch.empty(c.P, c.D, dtype=dtype)
    with rec.phase("fwd"):
        out = prompt_embedding_fwd(ids, weight, prompt, None)
    with rec.phase("bwd"):
        prompt_grad(torch.empty_like(out), None, 1, c.P, dtype)


def drive_decode(rec, work: Work) -> None:
    import importlib
    try:
        module = importlib.import_module("ptuning_fast.kernels.prefix_attention_decode")
        launcher = module.prefix_attention_decode
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"no decode launcher yet ({e})") from None
    q, k, v, pk, pv, _ = _attention_inputs(work)
    with rec.phase("fwd"):
        launcher(q, k, v, pk, pv)


@dataclass(frozen=True)
class Workload:
    shapes: Callable[[bool], list[Work]]
    drive: Callable[[object, Work], None]


WORKLOADS = (
    Workload(attention_work, drive_attention),
    Workload(prefix_variant_work, drive_attention),
    Workload(task_table_work, drive_attention),
    Workload(hot_loop_work, drive_attention),
    Workload(terms_work, drive_terms),
    Workload(embedding_work, drive_embedding),
    Workload(decode_work, drive_decode),
    Workload(decode_variant_work, drive_decode),
)


# --- one process: capture, compile a shard of the binaries -----------------------------------

def _target(arch: int):
    from ..kernels import launch
    return {90: launch.H100, 80: launch.A100}[arch]


def constexpr(spec, name: str):
    """The value a launch gave constexpr (or 1-valued int) `name`; None if it has none."""
    params = list(spec.signature)
    return next((v for k, v in spec.constexprs.items() if params[k[0]] == name), None)


def decode_tile_rows(launch, case: Case) -> dict:
    """For a decode split-kernel launch: the query rows its tiles hold (Hq / Hkv * Lq per kv
    head) over the rows they have (row blocks x BLOCK_M, read from the launch: grid axis 1 is
    Hkv x row blocks), and whether the tile is keys-major (queries as the MMA's columns);
    empty for any other launch."""
    if launch.kernel != "_decode_split_kernel":
        return {}
    block_m, row_blocks = constexpr(launch.spec, "BLOCK_M"), launch.grid[1] // case.Hkv
    rows = case.Hq // case.Hkv * case.Lq
    return {"tile_rows": row_blocks * block_m, "query_rows": rows,
            "useful_rows": round(rows / (row_blocks * block_m), 4),
            "keys_major": bool(constexpr(launch.spec, "KEYS_MAJOR"))}


def capture_all(arch: int, quick: bool) -> tuple[list[dict], dict, list[dict]]:
    """(launch rows, binary id -> Specialized, skipped works) for every workload on `arch`;
    launches with one binary id compile to one binary."""
    from ..kernels.launch import pretend_target
    from ..kernels.launch_capture import capture_launches
    rows, specs, skipped = [], {}, []
    for workload in WORKLOADS:
        for work in workload.shapes(quick):
            try:
                with pretend_target(_target(arch)), capture_launches(arch) as rec:
                    workload.drive(rec, work)
            except Exception as e:  # noqa: BLE001 — one broken launcher must not hide the rest
                failed = not isinstance(e, Unavailable)
                reason = f"failed: {type(e).__name__}: {e}" if failed else str(e)
                skipped.append({"op": work.op, "shape": work.shape(), "arch": arch,
                                "failed": failed, "reason": reason})
                continue
            for launch in rec.launches:
                key = hashlib.sha1(launch.spec.key().encode()).hexdigest()[:12]
                specs[key] = launch.spec
                rows.append({"op": work.op, "mode": work.case.mode, "shape": work.shape(),
                             "prefix": work.prefix, "case": work.case.fields(),
                             "kernel": launch.kernel, "phase": launch.phase, "arch": arch,
                             "grid": list(launch.grid), "programs": launch.programs,
                             "partial_bytes": launch.partial_bytes,
                             "binary": key, **decode_tile_rows(launch, work.case),
                             "unaligned_args": launch.spec.unspecialized(),
                             "args_equal_to_1": launch.spec.equal_to_one()})
    return rows, specs, skipped


# tl.dot calls per iteration of each kernel's hot loops: an iteration of a program does
# dots x 2 x BLOCK_M x BLOCK_N x BLOCK_D FLOP on the tensor cores (forward and decode: scores and
# p V; dQ: scores, dP and dS K; dK/dV and prefix dK/dV: scores, dP, dV and dK).
LOOP_DOTS = {"_prefix_attention_fwd_kernel": 2, "_decode_split_kernel": 2, "_dq_kernel": 3,
             "_dkdv_kernel": 4, "_prefix_dkdv_kernel": 4}


def loop_figures(spec, arch: int) -> dict:
    """For a kernel of LOOP_DOTS: its hot loops in code order (sass_loops.py), each with its
    non-MMA instructions per 1k FLOP of a program iteration's tile (per warp: FLOP / warps),
    and the FLOP its MMA instructions do (equal to the tile's where the loop is one full
    iteration). Empty for any other kernel."""
    from ..kernels.compile_specs import compile_specialized
    from .sass_loops import disassemble, hot_loops
    if spec.name not in LOOP_DOTS:
        return {}
    tile = LOOP_DOTS[spec.name] * 2 * constexpr(spec, "BLOCK_M") * constexpr(spec, "BLOCK_N") \
        * constexpr(spec, "BLOCK_D")
    per_warp = tile / spec.options["num_warps"]
    cubin = compile_specialized(spec, arch).asm["cubin"]    # Triton's cache: compiled already
    return {"loop_flop": tile, "loops": [
        {"instructions": loop.instructions, "mma": loop.mma,
         "mma_flop": loop.mma_flop * spec.options["num_warps"],
         "per_kflop": round(loop.per_kflop(per_warp), 3)}
        for loop in hot_loops(disassemble(cubin))]}


def measure(arch: int, quick: bool, shard: int, shards: int) -> dict:
    """Captures everything; compiles binaries shard, shard + shards, ... (in key order)."""
    import warnings

    import triton

    from ..kernels.compile_specs import compile_and_measure
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
    rows, specs, skipped = capture_all(arch, quick)
    mine = sorted(specs)[shard::shards]
    binaries = {}
    for i, key in enumerate(mine):
        start = time.perf_counter()
        try:
            binaries[key] = {"ok": True, **compile_and_measure(specs[key], arch),
                             **loop_figures(specs[key], arch)}
        except Exception as e:  # noqa: BLE001 — reported in the row, and by the tests
            binaries[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"sm_{arch} [{i + 1}/{len(mine)}] {specs[key].name}: "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return {"arch": arch, "triton": triton.__version__, "rows": rows if shard == 0 else [],
            "binaries": binaries, "skipped": skipped if shard == 0 else []}


# --- the parent: processes, merge, occupancy, files ------------------------------------------

def run_processes(quick: bool, jobs: int) -> list[dict]:
    """One measuring process per (arch, shard), without TRITON_INTERPRET; their results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shards = max(1, jobs // len(ARCHS))
    procs = [subprocess.Popen(
        [sys.executable, "-m", __name__, "--arch", str(arch), "--shard", f"{i}/{shards}"]
        + (["--quick"] if quick else []), stdout=subprocess.PIPE, env=env, text=True)
        for arch in ARCHS for i in range(shards)]
    outputs = [p.communicate()[0] for p in procs]
    failed = [" ".join(p.args[-4:]) for p in procs if p.returncode != 0]
    if failed:
        raise RuntimeError(f"static report: measuring process failed: {failed}")
    return [json.loads(out) for out in outputs]


def merge(parts: list[dict]) -> dict:
    """One report: each launch row with its binary's figures, occupancy and waves."""
    binaries = {(p["arch"], k): b for p in parts for k, b in p["binaries"].items()}
    rows = []
    for row in (r for p in parts for r in p["rows"]):
        arch, binary = row["arch"], binaries[(row["arch"], row["binary"])]
        row = dict(row, **binary)
        target = _target(arch)
        row["sm_count"] = target.sm_count
        row["programs_per_sm"] = round(row["programs"] / target.sm_count, 3)
        if binary["ok"]:
            row["blocks_per_sm"], row["limiter"] = blocks_per_sm(
                arch, binary["regs"], binary["num_warps"], binary["shared"])
            wave_count = waves(row["programs"], target.sm_count, row["blocks_per_sm"])
            row["waves"] = None if wave_count is None else round(wave_count, 3)
        rows.append(row)
    return {"kind": "static", "command": COMMAND,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "triton": parts[0]["triton"], "torch": torch.__version__,
            "targets": {a: vars(_target(a)) for a in ARCHS},
            "binaries": len(binaries), "rows": rows,
            "skipped": [s for p in parts for s in p["skipped"]]}


COLUMNS = ("kernel", "phase", "shape", "arch", "grid", "programs", "waves", "regs",
           "spill st/ld B", "smem KB", "blocks/SM (limit)", "wgmma/cp.async/TMA",
           "loops: non-MMA / kFLOP", "useful rows", "partials MiB")


def _useful_rows(r: dict) -> str:
    """'4/8 K' for a decode split launch (query rows / tile rows, K: keys-major), else '-'."""
    if "useful_rows" not in r:
        return "-"
    return f"{r['query_rows']}/{r['tile_rows']}" + (" K" if r["keys_major"] else "")


def _loop_cell(r: dict) -> str:
    """'0.81 1.05': each hot loop's non-MMA instructions per 1k FLOP, in code order; '(1.5x)'
    after a loop whose MMA instructions do another multiple of the tile's FLOP (padded or
    repeated tensor-core work, or a peeled or unrolled copy of the loop)."""
    if not r.get("loops"):
        return "-"
    cells = []
    for loop in r["loops"]:
        ratio = loop["mma_flop"] / r["loop_flop"]
        cells.append(f"{loop['per_kflop']:.2f}" + ("" if ratio == 1 else f" ({ratio:.3g}x)"))
    return ", ".join(cells)


def _cells(r: dict) -> list[str]:
    head = [r["kernel"].strip("_"), r["phase"] or "", r["shape"], f"sm_{r['arch']}",
            "x".join(map(str, r["grid"])), str(r["programs"])]
    partials = f"{r['partial_bytes'] / 2 ** 20:.1f}" if r["partial_bytes"] else "-"
    if not r["ok"]:
        return head + ["compile error: " + r["error"].splitlines()[0][:60]] + [""] * 7 \
            + [partials]
    return head + [
        "-" if r["waves"] is None else f"{r['waves']:.2f}", str(r["regs"]),
        f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", f"{r['shared'] / 1024:.0f}",
        f"{r['blocks_per_sm']} ({r['limiter']})", f"{r['wgmma']}/{r['cp_async']}/{r['tma']}",
        _loop_cell(r), _useful_rows(r), partials]


def markdown(report: dict) -> str:
    lines = [f"# Static kernel report ({report['created'][:10]}, Triton {report['triton']})", "",
             f"`{report['command']}`: launches captured from the real launchers at the "
             "benchmark shapes, compiled as a launch specializes them (no GPU ran). "
             f"{report['binaries']} distinct binaries. waves = programs / (SMs x resident "
             "programs per SM); blocks/SM from registers, shared memory (+1 KB reserved per "
             "block), 2048 threads and 32 blocks per SM; wgmma/cp.async/TMA are static PTX "
             "counts. loops: each hot loop of the SASS (innermost backward branch holding "
             "HGMMA/HMMA), in code order: its non-MMA instructions per 1000 FLOP of one "
             "iteration's tile (per warp); (2x): its MMA instructions do twice the tile's FLOP "
             "(padded or repeated tensor-core work, or an unrolled copy). "
             "useful rows (decode split kernel): the packed query rows of a kv head "
             "(Hq / Hkv x Lq) / the query rows its tiles hold; K: keys-major tile, the queries "
             "as the MMA's columns (8 at the least), else its rows (16 at the least). "
             "partials MiB: the fp32 split partials a launch writes (a split kernel) or sums "
             "(sum_splits).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    order = {a: i for i, a in enumerate(ARCHS)}
    for r in sorted(report["rows"], key=lambda r: order[r["arch"]]):   # stable: launch order
        lines.append("| " + " | ".join(_cells(r)) + " |")
    if report["skipped"]:
        lines.append("")
    lines += [f"- skipped: {s['op']} {s['shape']} sm_{s['arch']}: {s['reason']}"
              for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def to_json(report: dict) -> str:
    """The report as JSON with one row a line (files stay readable and diff line by line)."""
    head = json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1)
    rows = ",\n".join(json.dumps(r, separators=(",", ":")) for r in report["rows"])
    return f'{head[:-2]},\n "rows": [\n{rows}\n ]\n}}\n'


def output_path(out: Path | None) -> Path:
    """`out` if it names a .json file; else a new static-<date>[-n].json in `out` (default
    bench/results): an earlier report is never overwritten."""
    if out is not None and out.suffix == ".json":
        return out
    folder = out if out is not None else Path("bench") / "results"
    stem, n = f"static-{datetime.date.today().isoformat()}", 1
    path = folder / f"{stem}.json"
    while path.exists() or path.with_suffix(".md").exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def main(quick: bool = False, out: Path | None = None, jobs: int | None = None) -> int:
    start = time.perf_counter()
    report = merge(run_processes(quick, jobs or os.cpu_count() or 2))
    report["command"] = COMMAND + (" --quick" if quick else "")
    report["seconds"] = round(time.perf_counter() - start, 1)
    json_path = output_path(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(to_json(report))
    text = markdown(report)
    json_path.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')} ({report['seconds']} s)")
    failed = [r for r in report["rows"] if not r["ok"]] + [
        s for s in report["skipped"] if s["failed"]]
    return 1 if failed else 0


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("--arch", type=int, choices=ARCHS, required=True)
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th binary from i")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    shard, shards = map(int, args.shard.split("/"))
    json.dump(measure(args.arch, args.quick, shard, shards), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
