"""What the "triton" backend can run: its limits as data, and `not_supported_reasons`.

Imports no kernel module (importing one decorates the kernels, which must wait until
TRITON_INTERPRET is decided), so `ptuning_fast.ops` can ask before choosing a backend.
"""
from __future__ import annotations

import torch

from ..kernels.attention_options import ATTENTION_OPTIONS
from ..kernels.launch import interpreting
from ..validation import Reasons, describe, refuse_unknown_options

NAME = "triton"

# What the kernels have GPU tile configs for (kernels/tiles.py) and compile specs.
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Options each op's kernels compute: every option of prefix attention's spec. Any other
# keyword in use is refused, never dropped.
EMBEDDING_OPTIONS = frozenset({"prompt_index"})


def kernels_can_run(device: torch.device) -> bool:
    """The Triton kernels run on CUDA tensors, and on CPU tensors under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def not_supported_reasons(op: str, tensors: dict, options: dict, *, auto: bool = False) -> Reasons:
    """Why the kernels cannot run `op` ("prefix_attention" | "prompt_embedding") on these
    validated inputs; `auto`: also why "auto" should not pick them (the interpreter on CPU is
    a testing tool, far slower than PyTorch). Dtype and device reasons are type errors,
    unknown options unsupported features, the rest value errors."""
    r = Reasons(op)
    present = {n: t for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    device = next(iter(present.values())).device
    if not kernels_can_run(device):
        r.value(f"`backend`='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before Triton is first imported (transformers' model classes import it) "
                f"and before the first kernel call: Triton keeps the mode it decorated its "
                f"functions in; got tensors on {device}")
    elif auto and device.type != "cuda":
        r.value("'auto' does not pick Triton's interpreter (a testing tool, far slower than "
                "PyTorch on CPU)")
    if device.type == "cpu":
        bf16 = [f"`{n}` {describe(t)}" for n, t in present.items() if t.dtype == torch.bfloat16]
        if bf16:
            # The interpreter stores bf16 as uint16; a bf16 tl.dot returns garbage (#11584).
            r.type(f"the Triton kernels on CPU tensors run under Triton's interpreter, which "
                   f"cannot compute in bfloat16; got {', '.join(bf16)}. Expected float32 or "
                   "float16 here (bf16 runs on a GPU), or backend='torch' / 'reference'")
    if op == "prefix_attention":
        q = tensors["q"]
        if q.dtype not in KERNEL_DTYPES:
            r.type(f"the Triton kernels take `q`, `k`, `v` in {[str(d) for d in KERNEL_DTYPES]}, "
                   f"got {describe(q)}")
        if q.shape[-1] > MAX_HEAD_DIM:
            r.value(f"`q` head dim D={q.shape[-1]} exceeds the Triton kernels' maximum "
                    f"{MAX_HEAD_DIM}: {describe(q)}")
    known = ATTENTION_OPTIONS if op == "prefix_attention" else EMBEDDING_OPTIONS
    refuse_unknown_options(r, NAME, known, options)
    return r
