"""Every kernel configuration compiles for sm_80 and sm_90 without a GPU, within shared memory.

Each kernel module in ptuning_fast.kernels that defines `compile_specs()` is compiled by
Triton's own compiler for both targets in a subprocess with the interpreter off.
"""
import json
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import ptuning_fast.kernels as kernels_pkg

MODULES = sorted(m.name for m in pkgutil.iter_modules(kernels_pkg.__path__)
                 if m.name != "compile_specs")


def _has_specs(name):
    # Read the source: collection must not import kernels (that happens in the subprocess).
    path = os.path.join(kernels_pkg.__path__[0], f"{name}.py")
    with open(path) as f:
        return "def compile_specs(" in f.read()


SPEC_MODULES = [m for m in MODULES if _has_specs(m)]


def test_every_kernel_module_declares_its_configs():
    from ptuning_fast.kernels import compile_specs as cs
    jit_modules = []
    for name in MODULES:
        with open(os.path.join(kernels_pkg.__path__[0], f"{name}.py")) as f:
            if "@triton.jit" in f.read():
                jit_modules.append(name)
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
    over = [f"{r['name']}: {r['shared']} B" for r in rows if r["shared"] > SHARED_MEMORY_LIMIT[arch]]
    assert not over, f"over the sm_{arch} shared-memory limit {SHARED_MEMORY_LIMIT[arch]} B: {over}"
