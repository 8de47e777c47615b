"""`ptuning-fast bench`: build the cases, run each (a progress line per case on stderr), write
JSON + markdown + one PNG per op, print the tables."""
from __future__ import annotations

import argparse
import datetime
import gc
import sys
import warnings
from pathlib import Path

import torch

from ..progress import Progress
from . import attention, embedding, models, providers, report, results, terms
from .case import Case, Unavailable
from .timing import interleaved_cpu_medians_ms, median_ms, peak_memory_mb

OPS = ("prefix_attention", "attention_terms", "decode", "prompt_embedding", "train_step",
       "generate")
INTERRUPTED = "not run: the run was interrupted (time limit or Ctrl-C) before this case"
GPU_NOTICE = ("No CUDA device: timing PyTorch paths (ours: the torch backend) against each other "
              "at small sizes, labelled CPU. Kernel timings need a GPU.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ptuning-fast bench",
        description="Time ptuning_fast against PEFT's concatenation, SDPA and FlexAttention.")
    parser.add_argument("--quick", action="store_true",
                        help="a few representative sizes (minutes on a GPU, ~1 on a CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON file (written as given), or a directory for a new "
                             "<device>-<date>[-N].json (default bench/results/; an existing "
                             "file there is never overwritten); the markdown table and the "
                             "plots are written beside it")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--providers", default=",".join(providers.PROVIDERS),
                        help="comma-separated attention providers to run "
                             f"(of {','.join(providers.PROVIDERS)})")
    parser.add_argument("--static", action="store_true",
                        help="run nothing: capture the kernels' launches at the benchmark shapes, "
                             "compile them for sm_90 and sm_80 and report registers, spills, "
                             "shared memory, occupancy and waves (no GPU needed; --quick: the "
                             "quick shapes; --out: JSON file or directory, default a new "
                             "bench/results/static-<date>.json)")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: render the markdown and plots of a results file, or "
                             "merge several from one device into --out and render that")
    args = parser.parse_args(argv)
    args.ops = _subset(parser, "--ops", args.ops, OPS)
    args.providers = _subset(parser, "--providers", args.providers, providers.PROVIDERS)
    return args


def _subset(parser, flag: str, value: str, allowed) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        parser.error(f"{flag}: unknown {unknown or value!r}; choose from {','.join(allowed)}")
    return chosen


def build_cases(ops, provider_names, device: torch.device, quick: bool) -> list[Case]:
    builders = {
        "prefix_attention": lambda: attention.attention_cases(device, quick, provider_names),
        "attention_terms": lambda: terms.terms_cases(device, quick, provider_names),
        "decode": lambda: attention.decode_cases(device, quick, provider_names),
        "prompt_embedding": lambda: embedding.prompt_embedding_cases(device, quick,
                                                                     provider_names),
        "train_step": lambda: models.train_step_cases(device, quick),
        "generate": lambda: models.generate_cases(device, quick),
    }
    return [case for op in OPS if op in ops for case in builders[op]()]


# On CPU the providers of one model case (ours, PEFT) are timed in alternation.
INTERLEAVED_OPS = ("train_step", "generate")


def _failure_record(case: Case, error: Exception) -> tuple[dict, bool]:
    """(record, failed) for a case that raised: a missing dependency or too little memory is a
    skip; any other error is a skip that marks the run failed."""
    if isinstance(error, Unavailable):
        return results.skipped_record(case, str(error)), False
    if isinstance(error, NotImplementedError):
        return results.skipped_record(case, f"not implemented: {error}"), False
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return results.skipped_record(case, "out of memory on this device"), False
    return results.skipped_record(case, f"failed: {type(error).__name__}: {error}"), True


def run_case(case: Case, device: torch.device, quick: bool) -> tuple[dict, bool]:
    """Measures one case; returns (record, failed)."""
    prepared = None
    try:
        prepared = case.prepare(case, device)
        prepared.step()                      # first call: compiles, and surfaces errors early
        ms = median_ms(prepared.step, device, quick=quick, heavy=prepared.heavy)
        mem = peak_memory_mb(prepared.step, device, whole_process=prepared.whole_process_memory)
        return results.measured_record(case, prepared, ms, mem), False
    except Exception as e:  # noqa: BLE001 — one broken case must not lose the others' numbers
        return _failure_record(case, e)
    finally:
        del prepared
        _release_memory(device)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_interleaved(cases: list[Case], device: torch.device,
                    quick: bool) -> list[tuple[dict, bool]]:
    """Measures the providers of one case together (`interleaved_cpu_medians_ms`); returns
    (record, failed) per case, in order. A provider that cannot run is recorded as skipped and
    the others are still measured."""
    outcomes: list[tuple[dict, bool] | None] = [None] * len(cases)
    prepared = {}
    try:
        for i, case in enumerate(cases):
            try:
                prepared[i] = case.prepare(case, device)
                prepared[i].step()
            except Exception as e:  # noqa: BLE001
                prepared.pop(i, None)
                outcomes[i] = _failure_record(case, e)
        try:
            medians = interleaved_cpu_medians_ms([p.step for p in prepared.values()],
                                                 quick=quick) if prepared else []
            for (i, p), ms in zip(prepared.items(), medians):
                outcomes[i] = results.measured_record(cases[i], p, ms, None), False
        except Exception as e:  # noqa: BLE001
            for i in prepared:
                outcomes[i] = _failure_record(cases[i], e)
    finally:
        prepared.clear()
        _release_memory(device)
    return outcomes


def measurement_groups(cases: list[Case], device: torch.device) -> list[list[Case]]:
    """Cases measured together, in order: on CPU the providers of one model case (same op,
    method and shape) form a group; every other case is alone."""
    groups: list[list[Case]] = []
    where: dict[tuple, int] = {}
    for case in cases:
        if device.type == "cpu" and case.op in INTERLEAVED_OPS:
            key = tuple(v for k, v in case.fields().items() if k != "provider")
            if key in where:
                groups[where[key]].append(case)
                continue
            where[key] = len(groups)
        groups.append([case])
    return groups


def output_path(out: Path | None, device: torch.device) -> Path:
    """An explicit `--out FILE.json` as given; otherwise a new <device>-<date>[-N].json in the
    `--out` folder (default bench/results): a run never overwrites earlier (committed) results."""
    if out is not None and out.suffix == ".json":
        return out
    folder = Path("bench") / "results" if out is None else out
    stem = f"{results.device_slug(device)}-{datetime.date.today().isoformat()}"
    path, n = folder / f"{stem}.json", 2
    while path.exists() or path.with_suffix(".md").exists():
        path, n = folder / f"{stem}-{n}.json", n + 1
    return path


def render(json_path: Path, head: dict, records: list[dict]) -> tuple[Path, list[Path]]:
    """Writes <stem>.md and <stem>-<op>.png beside the JSON; returns their paths."""
    plots = {}
    why_not = report.plotting_unavailable()
    if why_not:
        print(why_not, file=sys.stderr)
    for op in OPS if why_not is None else ():
        png = json_path.with_name(f"{json_path.stem}-{op}.png")
        if report.plot(op, head, records, png):
            plots[op] = png
    md_path = json_path.with_suffix(".md")
    md_path.write_text(report.markdown(head, records, {op: p.name for op, p in plots.items()}))
    return md_path, list(plots.values())


def rerender(sources: list[Path], out: Path | None) -> int:
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        print(f"--from-json: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        read = [results.read(p) for p in sources]
    except (ValueError, KeyError) as err:     # JSONDecodeError is a ValueError
        print(f"--from-json: not a results file of `ptuning-fast bench --out` ({err!r})",
              file=sys.stderr)
        return 2
    head, records = read[0]
    json_path = sources[0]
    if len(sources) > 1 or out is not None:
        for extra, (other_head, other_records) in zip(sources[1:], read[1:]):
            if other_head["device"] != head["device"]:
                print(f"cannot merge {extra} ({other_head['device']}) into results from "
                      f"{head['device']}", file=sys.stderr)
                return 2
            records += other_records
        if out is None or out.suffix != ".json":
            print("merging results needs --out FILE.json", file=sys.stderr)
            return 2
        json_path = out
        results.write(json_path, head, records)
    md_path, pngs = render(json_path, head, records)
    print(report.markdown(head, records))
    print("\n".join(f"wrote {p}" for p in [json_path, md_path, *pngs]))
    return 0


def run_all(args, device: torch.device) -> tuple[list[dict], int, dict]:
    """Runs every selected case, a progress line per case on stderr as it starts and ends;
    returns (records, failures, header)."""
    torch.manual_seed(0)
    cases = build_cases(args.ops, args.providers, device, args.quick)
    head = results.header(device)
    records, failures, reasons_seen = [], 0, set()
    groups = measurement_groups(cases, device)
    # One progress line pair per measurement: a case, or on CPU the providers of a model case
    # timed together.
    progress = Progress(len(groups))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # PEFT's, transformers' and eager flex's chatter
        for index, group in enumerate(groups):
            progress.start(group[0].label() if len(group) == 1 else
                           f"{group[0].label()} and {len(group) - 1} more provider(s), "
                           "interleaved")
            try:
                outcomes = (run_interleaved(group, device, args.quick) if len(group) > 1
                            else [run_case(group[0], device, args.quick)])
            except KeyboardInterrupt:
                # A time limit (timeout -s INT) or Ctrl-C: keep what was measured, say what was not.
                left = [c for g in groups[index:] for c in g]
                progress.done(f"interrupted: {len(left)} case(s) not run")
                records += [results.skipped_record(c, INTERRUPTED) for c in left]
                failures += 1
                break
            for case, (record, failed) in zip(group, outcomes):
                failures += failed
                records.append(record)
            progress.done(", ".join(f"{case.provider} {_outcome(record, failed)}"
                                    if len(group) > 1 else _outcome(record, failed)
                                    for case, (record, failed) in zip(group, outcomes)))
            for case, (record, _) in zip(group, outcomes):
                reason = record["skipped"]
                if reason is not None and (case.op, case.provider, reason) not in reasons_seen:
                    reasons_seen.add((case.op, case.provider, reason))
                    print(f"skipped {case.op} {case.provider}: {reason}", file=sys.stderr)
    return records, failures, head


def _outcome(record: dict, failed: bool) -> str:
    if record["skipped"] is not None:
        return "FAILED" if failed else "skipped"
    return f"{record['median_ms']:.3g} ms"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.static:
        from .static_report import main as static_report
        return static_report(quick=args.quick, out=args.out)
    if args.from_json is not None:
        return rerender(args.from_json, args.out)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print(GPU_NOTICE)
    threads = torch.get_num_threads()
    if device.type != "cpu":
        records, failures, head = run_all(args, device)
    else:
        # One thread: on a small shared CPU an intra-op thread that gets descheduled stalls
        # every parallel op at its barrier (seen here, run to run under load: bench/NOTES.md's
        # CPU timing notes at its top).
        torch.set_num_threads(1)
        try:
            records, failures, head = run_all(args, device)
        finally:
            torch.set_num_threads(threads)

    json_path = output_path(args.out, device)
    results.write(json_path, head, records)
    md_path, pngs = render(json_path, head, records)
    print(report.markdown(head, records))
    print("\n".join(f"wrote {p}" for p in [json_path, md_path, *pngs]))
    if device.type != "cuda":
        print(GPU_NOTICE)
    if failures:
        print(f"{failures} case(s) failed or were cut short; see `skipped` in {json_path}",
              file=sys.stderr)
        return 1
    return 0
