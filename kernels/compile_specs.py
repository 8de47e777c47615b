"""Ahead-of-time compilation of kernel launches for a GPU this machine does not have.

A launch compiles what Triton's JIT builds from its arguments: pointers whose address is a
multiple of 16 and ints divisible by 16 get `tt.divisibility = 16`, ints equal to 1 become
constants. `jit_specialize` runs the installed Triton's own binder for that (the function a
`kernel[grid](...)` call runs), so a binary compiled here is the one a launch would get, on
Triton 3.6 and 3.9 alike. Compiled without it, the same kernel loads element by element and
spills registers a launch never would.

Each kernel module exposes `compile_specs()` yielding one `CompileSpec` per configuration its
launchers can choose, with representative argument values (aligned pointers; sizes and strides
multiples of 16 as at the benchmark shapes, unless the spec names another value);
`compile_and_measure` builds a specialization for a CUDA architecture with Triton's compiler alone
(no driver needed) and reads registers and spills from the log of Triton's own ptxas stage.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import re
import struct
from dataclasses import dataclass, field

# Max dynamic shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# An int argument's value when a spec names none: a multiple of 16, as every size and stride is
# at the benchmark shapes (D, P and L multiples of 16), so the JIT marks it divisible.
REPRESENTATIVE_INT = 64


@dataclass
class CompileSpec:
    name: str
    fn: object                       # the @triton.jit function
    signature: dict[str, str]        # runtime arguments -> Triton type ("*fp16", "i32", ...)
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple[int, ...] = field(default=(80, 90))
    ints: dict[str, int] = field(default_factory=dict)   # int arguments not REPRESENTATIVE_INT

    def launch_arguments(self) -> dict:
        """Keyword arguments of a launch of this config: a 16-byte aligned tensor of the right
        dtype per pointer, the spec's values for ints and floats, the constexprs, the options."""
        import torch
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                  "i8": torch.int8, "i32": torch.int32, "i64": torch.int64}
        args = {}
        for name, ty in self.signature.items():
            if ty.startswith("*"):
                args[name] = torch.empty(0, dtype=dtypes[ty[1:]])   # data_ptr 0: aligned
            elif ty.startswith("fp"):
                args[name] = 0.5
            else:
                args[name] = self.ints.get(name, REPRESENTATIVE_INT)
        return dict(args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)



def spec_signature(fn, constexprs: dict, types: dict) -> dict:
    """Triton types for every runtime argument of `fn`: `types` names pointers and floats;
    every other runtime argument is an i32 size or stride. A constexpr parameter the spec
    leaves out keeps its default (it must never be compiled as a runtime int)."""
    params = inspect.signature(fn.fn).parameters
    constexpr = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
    return {name: types.get(name, "i32") for name in params
            if name not in constexprs and name not in constexpr}

@dataclass(frozen=True)
class Specialized:
    """What `triton.compile` receives for one launch: exactly the JIT's ASTSource and options."""
    fn: object
    signature: dict                  # every parameter -> Triton type or "constexpr"
    constexprs: dict                 # (index,) -> value: the constexprs and the ints equal to 1
    attrs: dict                      # (index,) -> [["tt.divisibility", 16]] and the like
    options: dict                    # the backend's parsed options (num_warps, num_stages, ...)

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self) -> str:
        """Equal for launches that compile to one binary (Triton's JIT caches on the same)."""
        return repr((self.fn.__module__, self.fn.__name__, self.fn.cache_key,
                     sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted((k, str(v)) for k, v in self.attrs.items()),
                     sorted((k, str(v)) for k, v in self.options.items())))

    def unspecialized(self) -> list[str]:
        """Runtime pointer and int arguments the JIT could not mark divisible by 16."""
        params = list(self.signature)
        return [params[path[0]] for path, v in sorted(self.attrs.items())
                if len(path) == 1 and not v and self.signature[params[path[0]]][0] in "*iu"]

    def equal_to_one(self) -> list[str]:
        """Runtime int arguments that were 1 at the launch and so became constants."""
        return [name for param, (name, ty) in zip(self.fn.params, self.signature.items())
                if ty == "constexpr" and not param.is_constexpr]


def _target(arch: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


@functools.lru_cache(maxsize=None)
def _binder(fn, arch: int):
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(_target(arch))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def jit_specialize(fn, args: tuple, kwargs: dict, arch: int) -> tuple[Specialized, dict]:
    """Specializes a launch `fn[grid](*args, **kwargs)` for sm_<arch> with the installed
    Triton's binder and argument packing (JITFunction.run's own steps). Returns the
    specialization and the bound arguments (parameter name -> value)."""
    from triton import knobs
    backend, binder = _binder(fn, arch)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug   # as run() does
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return Specialized(fn, signature, constexprs, attrs, dict(options.__dict__)), bound


def ptxas_log(ptx: str, options: dict, arch: int) -> tuple[str, bytes]:
    """(`ptxas -v` log, cubin) of `ptx`: Triton's own ptxas stage (the backend's make_cubin: the
    same ptxas binary and flags that built the cubin) rerun with its log printed
    (TRITON_DUMP_PTXAS_LOG). A compile served from Triton's cache runs no ptxas, hence the rerun;
    its machine code is the compiled one's (checked by compile_and_measure)."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    backend = make_backend(_target(arch))
    out = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        cubin = backend.make_cubin(ptx, {}, backend.parse_options(dict(options)), arch)
    return out.getvalue(), cubin


def machine_code(cubin: bytes) -> dict[str, bytes]:
    """The cubin's (ELF64) .text.* sections and their .nv.info.* attributes (register count
    and the like) by name: what two builds must share to be the same kernel. Debug sections
    differ between ptxas runs (they name the temporary .ptx file)."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    names_at = headers[names_index][4]

    def name(offset):
        start = names_at + offset
        return cubin[start:cubin.index(b"\0", start)].decode()
    return {name(h[0]): cubin[h[4]:h[4] + h[5]] for h in headers
            if name(h[0]).startswith((".text.", ".nv.info."))}


_PROPERTIES = re.compile(
    r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads")
_REGISTERS = re.compile(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", re.S)


def ptxas_usage(log: str, name: str) -> dict:
    """Registers, stack frame and spill bytes of entry function `name` from a `ptxas -v` log."""
    regs = {fn: int(n) for fn, n in _REGISTERS.findall(log)}
    frames = {m[0]: tuple(map(int, m[1:])) for m in _PROPERTIES.findall(log)}
    if name not in regs or name not in frames:
        raise ValueError(f"no ptxas -v figures for {name!r} in the log:\n{log[-2000:]}")
    stack, stores, loads = frames[name]
    return {"regs": regs[name], "stack_bytes": stack, "spill_store_bytes": stores,
            "spill_load_bytes": loads}


def ptx_features(ptx: str) -> dict:
    """Static counts of the PTX instructions that show how a kernel uses the chip."""
    loads = re.findall(r"\bld\.global[\w.]*", ptx)
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),      # Hopper tensor cores
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),          # Ampere-style tensor cores
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)), # async global -> shared
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        "ld_global_vector": sum(".v" in ld for ld in loads),
        "ld_global_scalar": sum(".v" not in ld for ld in loads),
    }


def compile_specialized(spec: Specialized, arch: int):
    """Compiles `spec` for sm_<arch>; returns Triton's CompiledKernel (asm + metadata)."""
    import triton
    from triton.compiler import ASTSource
    source = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
    return triton.compile(source, target=_target(arch), options=dict(spec.options))


def compile_and_measure(spec: Specialized, arch: int) -> dict:
    """Compiles `spec` for sm_<arch>; the binary's figures: shared memory (bytes), ptxas's
    registers / stack / spills, PTX instruction counts, num_warps, num_stages."""
    compiled = compile_specialized(spec, arch)
    log, cubin = ptxas_log(compiled.asm["ptx"], spec.options, arch)
    return {"shared": compiled.metadata.shared, "cubin": bool(compiled.asm.get("cubin")),
            # The figures are the binary's: the rerun built the same machine code.
            "same_cubin": machine_code(cubin) == machine_code(compiled.asm["cubin"]),
            "num_warps": spec.options["num_warps"], "num_stages": spec.options["num_stages"],
            **ptxas_usage(log, compiled.metadata.name), **ptx_features(compiled.asm["ptx"])}


def _report(module_name: str, arch: int) -> None:
    """Compiles every spec of `ptuning_fast.kernels.<module_name>` for sm_<arch> as a launch
    would (JIT specialization); prints one JSON line per spec. Run in a process without
    TRITON_INTERPRET (the interpreter replaces the kernels by Python functions)."""
    import importlib
    import json

    module = importlib.import_module(f"ptuning_fast.kernels.{module_name}")
    for spec in module.compile_specs():
        if arch not in spec.archs:
            continue
        try:
            specialized, _ = jit_specialize(spec.fn, (), spec.launch_arguments(), arch)
            row = {"name": spec.name, "arch": arch, "ok": True,
                   **compile_and_measure(specialized, arch)}
        except Exception as exc:  # reported to the test, which fails on it
            row = {"name": spec.name, "arch": arch, "ok": False,
                   "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    import sys

    _report(sys.argv[1], int(sys.argv[2]))
