"""`pytest -m gpu` selects the GPU-only tests, and without CUDA they are skipped with a reason,
not failed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The tests that need a CUDA device (a new one goes here and gets the `gpu` marker). Not found by
# name: test_gpu_* tests of the GPU tile tables run on CPU under the interpreter.
GPU_ONLY = {
    "test_prefix_attention.py::test_gpu_matches_reference",
    "test_prefix_attention.py::test_gpu_fp32_tf32_and_ieee",
    "test_prefix_attention_dropout.py::test_gpu_matches_reference_with_kernel_mask",
    "test_prompt_embedding.py::test_gpu_llama_sized",
    "test_torch_backend.py::test_auto_on_cuda_takes_the_kernels_and_falls_back_for_float64",
    "test_gpu_decode.py::test_gpu_decode_matches_reference",
    "test_gpu_decode.py::test_gpu_keys_major_and_row_major_tiles_agree",
    "test_gpu_decode.py::test_gpu_decode_step_in_a_cuda_graph",
    "test_gpu_terms.py::test_gpu_terms_match_reference_bf16",
    "test_gpu_terms.py::test_gpu_backward_is_bitwise_deterministic",
    "test_gpu_terms.py::test_gpu_tma_forward_equals_pointer_loads",
    "test_gpu_terms.py::test_gpu_autotune_pick_per_key_equals_fixed_tile",
    "test_gpu_terms.py::test_gpu_fp32_highest_meets_ieee_tolerance",
    "test_gpu_training.py::test_gpu_bf16_train_step_matches_reference",
    "test_gpu_training.py::test_gpu_train_step_is_bitwise_deterministic",
    "test_gpu_training.py::test_gpu_train_step_has_no_host_sync",
    "test_gpu_training.py::test_gpu_train_step_in_a_cuda_graph",
    "test_gpu_training.py::test_gpu_static_cache_generation_in_cuda_graphs",
    "test_gpu_launch_defects.py::test_gpu_new_tf32_api",
    "test_gpu_launch_defects.py::test_gpu_tma_forward_from_a_second_thread",
    "test_gpu_launch_defects.py::test_gpu_graph_replays_the_eager_tile",
    "test_gpu_launch_defects.py::test_gpu_int_seed_dropout_never_syncs_and_is_captured",
    "test_gpu_launch_defects.py::test_gpu_grids_past_65535",
    "test_gpu_launch_defects.py::test_gpu_task_table_gradient",
}


def _pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_gpu_marker_selects_the_gpu_tests():
    proc = _pytest("--collect-only", "-q", "-m", "gpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    collected = {re.sub(r"^tests/|\[.*$", "", i) for i in ids}
    assert collected == GPU_ONLY


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the GPU tests run")
def test_gpu_tests_skip_without_cuda():
    files = sorted({f"tests/{name.split('::')[0]}" for name in GPU_ONLY})
    proc = _pytest("-q", "-rs", "-m", "gpu", *files)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ skipped, \d+ deselected in ", summary), summary
    assert "needs a CUDA device" in proc.stdout
