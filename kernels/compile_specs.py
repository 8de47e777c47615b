"""Ahead-of-time compilation of kernel configurations for a GPU this machine does not have.

Each kernel module exposes `compile_specs()` yielding one `CompileSpec` per configuration its
launchers can choose; `compile_for_target` builds it for a CUDA architecture with Triton's
compiler alone (no driver needed), so CI proves every config lowers to PTX/cubin for sm_80 and
sm_90 and fits in shared memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Max dynamic shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class CompileSpec:
    name: str
    fn: object                       # the @triton.jit function
    signature: dict[str, str]        # runtime arguments -> Triton type ("*fp16", "i32", ...)
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple[int, ...] = field(default=(80, 90))


def compile_for_target(spec: CompileSpec, arch: int):
    """Compiles `spec` for sm_<arch>; returns Triton's CompiledKernel (asm + metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(spec.signature)
    signature.update({name: "constexpr" for name in spec.constexprs})
    source = ASTSource(fn=spec.fn, signature=signature, constexprs=dict(spec.constexprs))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def _report(module_name: str, arch: int) -> None:
    """Compiles every spec of `ptuning_fast.kernels.<module_name>` for sm_<arch>; prints one
    JSON line per spec. Run in a process without TRITON_INTERPRET (the interpreter replaces
    the kernels by Python functions that cannot be compiled)."""
    import importlib
    import json

    module = importlib.import_module(f"ptuning_fast.kernels.{module_name}")
    for spec in module.compile_specs():
        if arch not in spec.archs:
            continue
        try:
            compiled = compile_for_target(spec, arch)
            row = {"name": spec.name, "arch": arch, "ok": True,
                   "shared": compiled.metadata.shared,
                   "cubin": bool(compiled.asm.get("cubin")),
                   "wgmma": "wgmma" in compiled.asm.get("ptx", "")}
        except Exception as exc:  # reported to the test, which fails on it
            row = {"name": spec.name, "arch": arch, "ok": False,
                   "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    import sys

    _report(sys.argv[1], int(sys.argv[2]))
