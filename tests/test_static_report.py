"""The static report (`ptuning-fast bench --static`) and the targets it checks without a GPU.

One run of the command (every benchmark shape, sm_90 and sm_80 in parallel processes, each
distinct binary compiled once: about 40 binaries) feeds every test here. The targets come from
ARCHITECTURE.md ("Performance"): no register spills, and every backward kernel launches at
least as many programs as the H100 has SMs. Those two fail on kernels that miss them: that is
what they are for.
"""
import json
import os
import subprocess
import sys

import pytest

from ptuning_fast.benchmarks import occupancy, static_report
from ptuning_fast.kernels import launch

# Launched by the backward launchers (the split reductions' partials are summed by
# _sum_splits_kernel); a new backward kernel shows up in the report and joins this set.
BACKWARD_KERNELS = {"_delta_kernel", "_dq_kernel", "_dkdv_kernel", "_prefix_dkdv_kernel",
                    "_prompt_grad_kernel", "_sum_splits_kernel"}
EXPECTED_KERNELS = BACKWARD_KERNELS | {"_prefix_attention_fwd_kernel",
                                       "_prompt_embedding_fwd_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "ptuning_fast.cli", "bench", "--static", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=1500)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def _where(rows):
    return [f"{r['kernel']} sm_{r['arch']} {r['shape']}" for r in rows]


def test_every_kernel_compiles_for_both_archs(report):
    failed = [f"{r['kernel']} sm_{r['arch']}: {r['error']}" for r in report["rows"] if not r["ok"]]
    failed += [f"{s['op']} {s['shape']}: {s['reason']}" for s in report["skipped"] if s["failed"]]
    assert not failed, "\n".join(failed)
    for arch in static_report.ARCHS:
        seen = {r["kernel"] for r in report["rows"] if r["arch"] == arch}
        assert EXPECTED_KERNELS <= seen, EXPECTED_KERNELS - seen
    assert {r["prefix"] for r in report["rows"]} >= {"shared", "per_row", "per_task"}


def test_report_fields_are_sane(report, tmp_path):
    rows = report["rows"]
    assert report["binaries"] < len(rows)        # shapes share binaries; each compiled once
    for r in rows:
        target = {90: launch.H100, 80: launch.A100}[r["arch"]]
        assert len(r["grid"]) == 3 and min(r["grid"]) >= 1
        assert r["programs"] == r["grid"][0] * r["grid"][1] * r["grid"][2]
        assert 0 < r["regs"] <= 255 and r["spill_store_bytes"] >= 0 and r["stack_bytes"] >= 0
        assert r["same_cubin"]                   # ptxas's figures describe the compiled binary
        assert 0 <= r["shared"] <= 228 * 1024 and r["num_warps"] in (1, 2, 4, 8, 16)
        assert 1 <= r["blocks_per_sm"] <= 32
        assert set(r["limiter"].split("+")) <= {"regs", "smem", "threads", "blocks"}
        assert r["sm_count"] == target.sm_count
        assert r["waves"] == pytest.approx(r["programs"] / (target.sm_count * r["blocks_per_sm"]),
                                           abs=1e-3)
        assert r["phase"] in ("fwd", "bwd")
        # Every tensor the launchers pass is aligned (as CUDA allocations are): only ints
        # may miss the JIT's divisibility.
        assert not [a for a in r["unaligned_args"] if a[0].isupper()], r["unaligned_args"]
    fwd = [r for r in rows if r["kernel"] == "_prefix_attention_fwd_kernel"]
    assert all((r["wgmma"] > 0) == (r["arch"] == 90) for r in fwd)    # tensor cores per arch
    assert all(r["mma_sync"] > 0 for r in fwd if r["arch"] == 80)
    # Specialized as a launch: the vectorized loads a launch gets (not element-wise ones).
    assert all(r["ld_global_vector"] > 0 for r in fwd)
    for column in static_report.COLUMNS:
        assert column in report["stdout"]
    md = static_report.markdown(report)
    assert md.count("\n| ") == len(rows) + 1 and "| dkdv_kernel |" in md


def test_hot_loops_are_reported(report):
    # Issue 24: each MMA kernel's hot loops from its SASS, with their non-MMA instructions per
    # 1k FLOP of the tile (sass_loops.py). The forward's loops do exactly the tile's tensor-core
    # work (no padded or repeated MMA), on both archs.
    rows = [r for r in report["rows"] if r["kernel"] in static_report.LOOP_DOTS]
    assert {r["kernel"] for r in rows} == set(static_report.LOOP_DOTS)
    for w, r in zip(_where(rows), rows):
        assert r["loops"], f"{w}: no hot loop found"
        assert all(0 < loop["per_kflop"] < 20 and 0 < loop["mma"] < loop["instructions"]
                   for loop in r["loops"]), (w, r["loops"])
        if r["kernel"] == "_prefix_attention_fwd_kernel":
            assert all(loop["mma_flop"] == r["loop_flop"] for loop in r["loops"]), (w, r["loops"])
    assert not [r for r in report["rows"] if r["kernel"] not in static_report.LOOP_DOTS
                and r.get("loops")]


def test_forward_hot_loop_at_issue_24s_shape(report):
    # Issue 24: at its shape (bf16, causal, D = 128, P = 64) on sm_90 the forward streams its
    # keys in two pipelined loops, the prefix blocks inside them (no loop, and no drain, of
    # their own): the steady-state loop (the open pass: whole prefix blocks, then the sequence
    # blocks every query sees whole) does at most 0.55 non-MMA instructions per 1k FLOP and
    # the upper edge (the prefix's partial block, then the causal diagonal) at most 0.8
    # (Triton's tutorial: 0.48; bench/NOTES.md), without spills, its grid filling the H100's
    # SMs.
    at = static_report.HOT_LOOP_AT
    (r,) = [r for r in report["rows"] if r["arch"] == 90
            and r["kernel"] == "_prefix_attention_fwd_kernel"
            and all(r["case"][k] == v for k, v in at.items())]
    assert len(r["loops"]) == 2, r["loops"]
    steady, diagonal = r["loops"][0]["per_kflop"], r["loops"][1]["per_kflop"]
    assert steady <= 0.55 and diagonal <= 0.8, r["loops"]
    assert r["spill_store_bytes"] == 0 and r["programs"] >= launch.H100.sm_count
    assert r["tma"] > 0                          # K/V through tensor descriptors


def test_no_register_spills(report):
    spilling = [f"{w}: {r['regs']} regs, {r['spill_store_bytes']}/{r['spill_load_bytes']} B "
                f"spill stores/loads" for w, r in zip(_where(report["rows"]), report["rows"])
                if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilling, "register spills:\n" + "\n".join(sorted(set(spilling)))


def test_backward_kernels_fill_the_h100(report):
    sms = launch.H100.sm_count
    rows = [r for r in report["rows"] if r["arch"] == 90 and r["phase"] == "bwd"]
    assert {r["kernel"] for r in rows} >= BACKWARD_KERNELS
    short = [f"{w}: {r['programs']} programs (grid {r['grid']})"
             for w, r in zip(_where(rows), rows) if r["programs"] < sms]
    assert not short, f"backward kernels with fewer programs than the H100's {sms} SMs:\n" + \
        "\n".join(short)


def test_task_table_prefix_gradient_follows_the_batch(report):
    # Issue 26: the per-task prefix gradient's splits and fp32 partials were sized for all T
    # task slots (at T = 1000: 16,000 programs, 1000 MiB of partials; at T >= 33 one split).
    # Now they follow the batch: T = 1's, plus one split per other task in use at the most.
    at = static_report.TASK_TABLE_AT
    rows = {int(r["shape"].rsplit("T=", 1)[1]): r for r in report["rows"]
            if r["arch"] == 90 and r["kernel"] == "_prefix_dkdv_kernel"
            and r["prefix"] == "per_task" and all(r["case"][k] == v for k, v in at.items())}
    assert set(rows) == set(static_report.TASK_TABLE_SIZES)
    split_bytes = 2 * at["Hkv"] * at["P"] * at["D"] * 4          # a K and a V fp32 tile set
    one = rows[1]
    one_splits = one["partial_bytes"] // split_bytes
    for tasks, r in rows.items():
        splits = r["partial_bytes"] // split_bytes
        assert r["partial_bytes"] == splits * split_bytes
        assert one_splits <= splits <= one_splits + min(tasks, at["B"]) - 1, (tasks, splits)
        assert r["programs"] * one_splits == one["programs"] * splits, (tasks, r["grid"])


def test_decode_launches_are_reported(report):
    # The decode shapes run the decode launcher (split + merge), never the prefill kernel.
    for arch in static_report.ARCHS:
        kernels = {r["kernel"] for r in report["rows"] if r["op"] == "decode" and r["arch"] == arch}
        assert "_decode_split_kernel" in kernels, (arch, kernels)
        assert "_prefix_attention_fwd_kernel" not in kernels
    assert not report["skipped"], report["skipped"]


def _decode_split_rows(report, arch=90):
    return [r for r in report["rows"]
            if r["op"] == "decode" and r["arch"] == arch and r["kernel"] == "_decode_split_kernel"]


def test_decode_issue_shape_fills_the_h100(report):
    # Issue 14: B = 8, Hq = 32, Hkv = 8, Lk = 4096: programs >= 2 waves of the H100's SMs.
    sms = launch.H100.sm_count
    issue = [r for r in _decode_split_rows(report)
             if (r["case"]["B"], r["case"]["Hq"], r["case"]["Hkv"], r["case"]["Lk"],
                 r["case"]["Lq"]) == (8, 32, 8, 4096, 1)]
    assert issue
    for r in issue:
        assert r["programs"] >= 2 * sms, (r["shape"], r["grid"])


def test_decode_tile_rows_are_mostly_useful(report):
    """useful rows = Hq / Hkv x Lq / the query rows of the launch's tiles (row blocks x
    BLOCK_M, read from the captured launch). The MMA computes 16 rows x 8 columns at the least;
    the keys-major tile puts the queries in the columns, so a group of 8 fills its tile and a
    group of 4 (GQA 4:1, one token) half of it, where the 16-row tile held 4 / 16."""
    rows = _decode_split_rows(report) + _decode_split_rows(report, 80)
    assert {r["case"]["Hq"] // r["case"]["Hkv"] * r["case"]["Lq"] for r in rows} >= \
        {1, 4, 8, 16, 64}
    for r in rows:
        packed = r["case"]["Hq"] // r["case"]["Hkv"] * r["case"]["Lq"]
        assert r["query_rows"] == packed
        assert r["useful_rows"] == pytest.approx(packed / r["tile_rows"], abs=1e-4)
        assert r["keys_major"] == (packed <= 8) and r["tile_rows"] >= (8 if packed <= 8 else 16)
        if packed >= 4:      # every GQA group from 4:1 up
            assert r["useful_rows"] >= 0.5, (r["shape"], r["useful_rows"])
        if packed in (8, 16, 64):
            assert r["useful_rows"] == 1.0, (r["shape"], r["useful_rows"])
    md = static_report.markdown(report)
    assert "| 4/8 K |" in md and "| 8/8 K |" in md and "| 16/16 |" in md


def test_occupancy_by_hand():
    # 255 regs x 128 threads: 8192 registers per warp -> 8 warps -> 2 blocks of 4 warps.
    assert occupancy.blocks_per_sm(90, 255, 4, 40 * 1024) == (2, "regs")
    assert occupancy.blocks_per_sm(90, 255, 4, 80 * 1024) == (2, "smem+regs")
    # 100 KB of shared memory (+1 KB reserved) fits twice in 228 KB, once in 164 KB.
    assert occupancy.blocks_per_sm(90, 64, 4, 100 * 1024) == (2, "smem")
    assert occupancy.blocks_per_sm(80, 64, 4, 100 * 1024) == (1, "smem")
    # 168 regs: 5376 per warp (a multiple of 256) -> 12 warps -> 1 block of 8 warps.
    assert occupancy.blocks_per_sm(90, 168, 8, 0) == (1, "regs")
    # 4 warps: the 2048-thread limit allows 16 blocks; at 32 regs the registers do too.
    assert occupancy.blocks_per_sm(90, 24, 4, 0) == (16, "threads")
    assert occupancy.blocks_per_sm(90, 32, 4, 0) == (16, "threads+regs")
    assert occupancy.blocks_per_sm(90, 16, 1, 0) == (32, "blocks")
    assert occupancy.waves(528, 132, 2) == 2.0 and occupancy.waves(1, 132, 0) is None


def test_output_path_never_overwrites(tmp_path):
    first = static_report.output_path(tmp_path)
    first.write_text("{}")
    second = static_report.output_path(tmp_path)
    assert second != first and second.parent == tmp_path and second.name.startswith("static-")
    assert static_report.output_path(tmp_path / "x.json") == tmp_path / "x.json"
