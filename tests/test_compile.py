"""Every kernel configuration compiles for sm_80 and sm_90 without a GPU, within shared memory.

Each kernel module in ptuning_fast.kernels that defines `compile_specs()` is compiled by
Triton's own compiler for both targets in a subprocess with the interpreter off, specialized as
a launch would be (Triton's JIT binder: aligned pointers, sizes and strides divisible by 16).
Registers and spills come from ptxas; configs that spill are reported as warnings (the static
report's tests hold the benchmark shapes to zero spills).
"""
import json
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

import ptuning_fast.kernels as kernels_pkg

MODULES = sorted(m.name for m in pkgutil.iter_modules(kernels_pkg.__path__)
                 if m.name != "compile_specs")


def _source(name):
    # Read the source: collection must not import kernels (that happens in the subprocess).
    with open(os.path.join(kernels_pkg.__path__[0], f"{name}.py")) as f:
        return f.read()


def _has_specs(name):
    return "def compile_specs(" in _source(name)


def _defines_kernels(name):
    """A module with a kernel entry point (`def ..._kernel(` under @triton.jit); modules of
    device functions only (attention_terms.py) compile inside the kernels that call them."""
    return re.search(r"^@triton\.jit\s*\ndef \w+_kernel\(", _source(name), re.MULTILINE) \
        is not None


SPEC_MODULES = [m for m in MODULES if _has_specs(m)]


def test_every_kernel_module_declares_its_configs():
    from ptuning_fast.kernels import compile_specs as cs
    jit_modules = [name for name in MODULES if _defines_kernels(name)]
    assert jit_modules, "no kernel modules found"
    assert set(jit_modules) <= set(SPEC_MODULES), \
        f"kernel modules without compile_specs(): {set(jit_modules) - set(SPEC_MODULES)}"
    assert set(cs.SHARED_MEMORY_LIMIT) == {80, 90}


def _compile_module(module, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "ptuning_fast.kernels.compile_specs", module, str(arch)],
        capture_output=True, text=True, env=env, timeout=1200)


@pytest.fixture(scope="module")
def compiled():
    """Every (module, arch) compiled at once, one subprocess each, as many at a time as there
    are cores: Triton's compiler is single-threaded and this is the slowest test in CI."""
    jobs = [(m, a) for m in SPEC_MODULES for a in (80, 90)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(jobs, pool.map(lambda job: _compile_module(*job), jobs)))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("module", SPEC_MODULES)
def test_compiles_for_target(module, arch, compiled):
    from ptuning_fast.kernels.compile_specs import SHARED_MEMORY_LIMIT
    proc = compiled[(module, arch)]
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"{module}: no configurations compiled\n{proc.stderr[-2000:]}"
    failed = [f"{r['name']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert all(r["cubin"] for r in rows)
    assert all(r["same_cubin"] for r in rows), "ptxas's figures are not the compiled binary's"
    over = [f"{r['name']}: {r['shared']} B" for r in rows if r["shared"] > SHARED_MEMORY_LIMIT[arch]]
    assert not over, f"over the sm_{arch} shared-memory limit {SHARED_MEMORY_LIMIT[arch]} B: {over}"
    assert all(0 < r["regs"] <= 255 for r in rows), [(r["name"], r["regs"]) for r in rows]
    spills = [f"{r['name']}: {r['regs']} regs, {r['spill_store_bytes']} B spill stores"
              for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    if spills:
        warnings.warn(f"sm_{arch} {module}: {len(spills)} of {len(rows)} configs spill "
                      "registers:\n  " + "\n  ".join(spills), stacklevel=1)
