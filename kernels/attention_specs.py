"""Ahead-of-time compile-spec variants shared by the attention kernels' `compile_specs()`
(forward, dQ, dK/dV, decode; see kernels/compile_specs.py): which dtypes, dot precisions, head
blocks and flags each kernel is compiled with, and the attention terms' variants."""
from __future__ import annotations

import torch

from .compile_specs import CompileSpec, spec_signature
from .tiles import terms_config

# (causal, padding mask) combinations, rotated over the specs so that every dtype and every head
# block meets each combination's code without compiling the full cross product (each spec's
# compile time: `ptuning-fast bench --static` prints it).
FLAG_COMBOS = ((True, True), (True, False), (False, True), (False, False))

# (torch dtype, Triton element type, dot input precision, BLOCK_D) per spec variant: every
# (16-bit?, BLOCK_D) table entry once, fp16 and bf16 taking turns (same tiles, same code; bf16
# at D = 128, the common head dim); fp32 alternates exact and tf32 dots.
SPEC_VARIANTS = (
    (torch.float16, "fp16", "tf32", 32), (torch.bfloat16, "bf16", "tf32", 64),
    (torch.bfloat16, "bf16", "tf32", 128), (torch.float16, "fp16", "tf32", 256),
    (torch.float32, "fp32", "ieee", 32), (torch.float32, "fp32", "tf32", 64),
    (torch.float32, "fp32", "ieee", 128), (torch.float32, "fp32", "tf32", 256),
)

# Spec variants compiled a second time with HAS_DROPOUT (BERT/RoBERTa shapes: 16-bit at D = 64
# and 128, fp32 at D = 64), on top of every variant without it: dropout adds Philox arithmetic
# in registers, not shared memory, so a few configs prove that code lowers.
DROPOUT_VARIANTS = (1, 2, 5)


def spec_ints(constexprs: dict) -> dict:
    """The int arguments whose value at a benchmark launch is not a multiple of 16 (the others
    get compile_specs.REPRESENTATIVE_INT): GQA 4:1, and with a (B, Lk) padding mask its unit
    last stride, which the JIT turns into the constant 1."""
    return {"group_size": 4, **({"stride_mask_l": 1} if constexprs.get("HAS_MASK") else {})}


def spec_variants():
    """Yields (index, torch dtype, element type, precision, BLOCK_D, causal, has_mask,
    has_dropout): every SPEC_VARIANTS entry without dropout, then DROPOUT_VARIANTS with it."""
    for has_dropout in (False, True):
        for i, (dtype, elem, precision, block_d) in enumerate(SPEC_VARIANTS):
            if has_dropout and i not in DROPOUT_VARIANTS:
                continue
            causal, has_mask = FLAG_COMBOS[i % len(FLAG_COMBOS)]
            yield i, dtype, elem, precision, block_d, causal, has_mask, has_dropout


# Compile-spec types of the attention terms' runtime arguments (kernels/attention_terms.py).
TERM_TYPES = dict(Bias="*fp32", Sinks="*fp32", SegStart="*i32", SegEnd="*i32",
                  softcap_scale="fp32")

# Every term's code, at the models' head dims, for each arch's fixed 16-bit tile.
# (label, flags, causal, head block, element).
TERM_VARIANTS = (
    ("all", dict(HAS_BIAS=True, HAS_SINKS=True, IS_PACKED=True, HAS_WINDOW=True, SOFTCAP=True),
     True, 64, "bf16"),
    ("all", dict(HAS_BIAS=True, HAS_SINKS=True, IS_PACKED=True, HAS_WINDOW=True, SOFTCAP=True),
     True, 128, "bf16"),
    ("gemma2", dict(HAS_WINDOW=True, SOFTCAP=True), True, 128, "bf16"),
    ("gpt_oss", dict(HAS_WINDOW=True, HAS_SINKS=True), True, 64, "bf16"),
    ("t5", dict(HAS_BIAS=True), False, 64, "fp16"),
)


def term_compile_specs(kind, fn, tile_kernel, tensors, types, base_constexprs, *,
                       takes_sinks=False, tile=lambda cfg: cfg):
    """CompileSpecs of `fn` for every TERM_VARIANTS entry on sm_80 and sm_90.

    tile_kernel: the kernels/tiles.py table whose 16-bit terms tile (`terms_config`) is used,
    mapped through `tile`; tensors: the pointer arguments in the element type;
    types: the other non-int arguments' types; base_constexprs(causal, cfg): the kernel's own
    flags."""
    for label, flags, causal, block_d, elem in TERM_VARIANTS:
        flags = {n: f for n, f in flags.items() if takes_sinks or n != "HAS_SINKS"}
        for arch in (80, 90):
            cfg = tile(terms_config(tile_kernel, arch, True, block_d))
            constexprs = dict(base_constexprs(causal, cfg), **flags, BLOCK_M=cfg.block_m,
                              BLOCK_N=cfg.block_n, BLOCK_D=block_d, INPUT_PRECISION="tf32")
            arg_types = dict(types, **TERM_TYPES)
            arg_types.update({t: f"*{elem}" for t in (*tensors, "Bias")})
            ints = dict(spec_ints(constexprs), stride_bias_c=1)
            yield CompileSpec(f"prefix_attention_{kind}[{elem},terms={label},D={block_d}]", fn,
                              spec_signature(fn, constexprs, arg_types), constexprs,
                              cfg.num_warps, cfg.num_stages, (arch,), ints=ints)
