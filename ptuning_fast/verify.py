"""`ptuning-fast verify`: every fused op against its reference, forward and every gradient.

Pass rule: `ptuning_fast.error_bound` (FlashAttention's, the one the tests use too): the fused
result's max error against a float64 reference may be at most 2x the error of the reference
path run in the same low precision, plus a few ulps. Without CUDA the kernels run under
Triton's interpreter (fp32, fp16 only: it cannot do bf16 arithmetic).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .error_bound import check_error
from .kernels.launch import interpreting
from .progress import Progress

OPS = ("prompt_embedding", "prefix_attention")


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[torch.dtype, str], tuple[tuple, dict, list[str]]]  # -> args, kwargs, grad names


def _attention_case(B, Hq, Hkv, Lq, Lk, D, P, *, causal=True, prefix="shared", pad=None):
    desc = f"B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} P={P} {prefix}" \
        + ("" if causal else " non-causal") + (f" pad={pad}" if pad else "")

    def make(dtype, device):
        def rnd(*shape):
            return torch.randn(*shape, dtype=dtype, device=device)
        q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
        kwargs = {"causal": causal}
        args = [q, k, v]
        names = ["q", "k", "v"]
        if P:
            lead = {"shared": (), "per-row": (B,), "per-task": (3,)}[prefix]
            args += [rnd(*lead, Hkv, P, D), rnd(*lead, Hkv, P, D)]
            names += ["prefix_k", "prefix_v"]
            if prefix == "per-task":
                kwargs["prefix_index"] = torch.randint(0, 3, (B,), device=device)
        if pad:
            mask = torch.ones(B, Lk, dtype=torch.bool, device=device)
            lengths = torch.randint(1, Lk + 1, (B,))
            for b, n in enumerate(lengths.tolist()):
                if pad == "left":
                    mask[b, : Lk - n] = False
                else:
                    mask[b, n:] = False
            kwargs["attention_mask"] = mask
        return tuple(args), kwargs, names
    return Case("prefix_attention", desc, make)


def _embedding_case(B, L, V, d, P, T=None):
    desc = f"B={B} L={L} V={V} d={d} P={P}" + (f" T={T}" if T else "")

    def make(dtype, device):
        ids = torch.randint(0, V, (B, L), device=device)
        weight = torch.randn(V, d, dtype=dtype, device=device)
        prompt = torch.randn(*((T,) if T else ()), P, d, dtype=dtype, device=device)
        kwargs = {"prompt_index": torch.randint(0, T, (B,), device=device)} if T else {}
        return (ids, weight, prompt), kwargs, ["weight", "prompt"]
    return Case("prompt_embedding", desc, make)


def cases(quick: bool, on_gpu: bool) -> list[Case]:
    out = [_embedding_case(3, 7, 50, 40, 5), _embedding_case(1, 1, 11, 16, 0),
           _embedding_case(4, 9, 30, 100, 3, T=3)]
    if on_gpu and not quick:
        out += [_embedding_case(8, 512, 32000, 2048, 64), _embedding_case(4, 300, 1000, 4096, 20, T=4)]
    out += [
        _attention_case(2, 4, 2, 37, 37, 64, 5),
        _attention_case(1, 4, 1, 1, 45, 32, 17, prefix="per-row"),
        _attention_case(2, 2, 2, 20, 33, 80, 0, pad="left"),
        _attention_case(3, 4, 2, 19, 19, 64, 7, prefix="per-task", pad="right"),
        _attention_case(1, 2, 2, 23, 23, 32, 3, causal=False),
    ]
    if not quick:
        out += [_attention_case(1, 2, 1, 70, 70, 128, 130), _attention_case(2, 4, 4, 66, 66, 96, 1)]
    if on_gpu and not quick:
        out += [_attention_case(2, 8, 2, 1024, 1024, 128, 64),
                _attention_case(1, 8, 8, 1, 2048, 128, 256, prefix="per-row"),
                _attention_case(2, 8, 2, 500, 777, 64, 33, prefix="per-task", pad="left")]
    return out


def _run(op, args, kwargs, grad_names, backend, upcast, grad_out):
    from . import ops, reference
    leaves = [a.detach().double() if upcast and a.is_floating_point() else a.detach()
              for a in args]
    named = dict(zip(["q", "k", "v", "prefix_k", "prefix_v"] if op == "prefix_attention"
                     else ["input_ids", "weight", "prompt"], leaves))
    for name in grad_names:
        named[name].requires_grad_(True)
    if backend == "fused":
        fn = getattr(ops, op)
        kwargs = {**kwargs, "backend": "triton"}
    else:
        fn = getattr(reference, op)
    out = fn(*named.values(), **kwargs)
    grads = torch.autograd.grad(out, [named[n] for n in grad_names], grad_out.to(out.dtype))
    return [out] + list(grads)


def check(case: Case, dtype: torch.dtype, device: str):
    """Returns one row per compared tensor: (name, max_abs_err, rel_err, allowed, ok)."""
    args, kwargs, grad_names = case.make(dtype, device)
    # Representable in `dtype`, so every path sees exactly the same upstream gradient.
    grad_out = torch.randn(_out_shape(case.op, args), device=device).to(dtype)
    exact = _run(case.op, args, kwargs, grad_names, "reference", True, grad_out)
    fused = _run(case.op, args, kwargs, grad_names, "fused", False, grad_out)
    lowp = _run(case.op, args, kwargs, grad_names, "reference", False, grad_out)
    rows = []
    for i, name in enumerate(["out"] + [f"d{n}" for n in grad_names]):
        result = check_error(fused[i], lowp[i], exact[i], kind="fwd" if i == 0 else "grad",
                             dtype=dtype)
        rows.append((name, result.error, result.relative_error, result.allowed, result.ok))
    return rows


def _out_shape(op, args):
    if op == "prefix_attention":
        return args[0].shape
    ids, weight, prompt = args
    return (ids.shape[0], prompt.shape[-2] + ids.shape[1], weight.shape[1])


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="ptuning-fast verify",
                                     description="Check every fused op against its reference.")
    parser.add_argument("--quick", action="store_true", help="a smaller grid of shapes")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated ops to check (of {','.join(OPS)})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    wanted = {name.strip() for name in args.ops.split(",") if name.strip()}
    unknown = sorted(wanted - set(OPS))
    if unknown or not wanted:
        # An op nobody checks must not end in "all checks passed".
        parser.error(f"--ops: unknown op(s) {unknown or args.ops!r}; choose from {','.join(OPS)}")

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
        if not interpreting():      # kernels already decorated for a GPU: Triton keeps that
            print("error: kernels were imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            return 2
    device = "cuda" if on_gpu else "cpu"
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if on_gpu else [torch.float32, torch.float16]
    if on_gpu:
        print(f"Running the Triton kernels natively on {torch.cuda.get_device_name()}.")
    else:
        print("No CUDA device: running the Triton kernels under the Triton interpreter on CPU "
              "(fp32, fp16; bf16 needs a GPU).")
    torch.manual_seed(args.seed)
    header = f"{'op':<17} {'shape':<58} {'dtype':<9} {'tensor':<10} {'max abs err':>11} " \
             f"{'rel err':>9} {'allowed':>9}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    chosen = [case for case in cases(args.quick, on_gpu) if case.op in wanted]
    progress = Progress(len(chosen) * len(dtypes))       # a line per check on stderr
    for case in chosen:
        for dtype in dtypes:
            progress.start(f"{case.op} {case.shape} {str(dtype)[6:]}")
            try:
                rows = check(case, dtype, device)
            except Exception as exc:  # a crash is a failure; report it and go on
                failures += 1
                progress.done("ERROR")
                print(f"{case.op:<17} {case.shape:<58} {str(dtype)[6:]:<9} "
                      f"ERROR {type(exc).__name__}: {exc}")
                continue
            failed = sum(not ok for *_, ok in rows)
            failures += failed
            progress.done(f"{failed} of {len(rows)} FAIL" if failed else "pass")
            for name, err, rel, allowed, ok in rows:
                print(f"{case.op:<17} {case.shape:<58} {str(dtype)[6:]:<9} {name:<10} "
                      f"{err:>11.3e} {rel:>9.2e} {allowed:>9.2e}  {'pass' if ok else 'FAIL'}")
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0
