"""bench/gpu_session.sh, dry run on this CPU (DRY_RUN=1: no install, the GPU tests collected and
skipped, the bench at --quick on a few ops): every step runs and passes, in order, and leaves
exactly the files a lent GPU session brings back, within the device tool's limits on them. A
plumbing mistake costs a CI minute here instead of the GPU's minutes."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from ptuning_fast.benchmarks import results

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def _targets_markdown(path: Path) -> str:
    """bench/targets_table.py's table (loaded by path: bench/ on sys.path would shadow the
    tests' conftest with its own)."""
    spec = importlib.util.spec_from_file_location("targets_table",
                                                  ROOT / "bench" / "targets_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.targets_markdown(path)

# The device tool's limits on what comes back from $OUT (/work/.library/device/README.md):
# at most 8 files, names of letters, digits, '.', '_' and '-'.
MAX_FILES = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
FILES = {"session.log", "tests.log", "tests.xml", "bench.log", "results.json", "results.md",
         "plots.tar", "targets.md"}
STEPS = ["install", "tests", "bench-models", "merge models", "layer-call", "bench-attention",
         "merge all", "targets"]

needs_shell = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                 reason="needs bash and coreutils' timeout")


def _session(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # The script's own processes decide on the interpreter; an outer pytest-xdist worker's
    # variables are not the inner pytest's.
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(DRY_RUN="1", OUT=str(out), PY=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session") / "out"
    proc = _session(out)
    return proc, out


@needs_shell
@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run is the CPU's stand-in")
def test_dry_run_passes_every_step_in_order(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "== every step passed" in proc.stdout
    log = (out / "session.log").read_text()
    ends = [m.group(1) for m in re.finditer(r"^== (.+?): exit 0 \(", log, re.M)]
    assert ends == STEPS, log[-3000:]
    assert "dry run: 1" in log


@needs_shell
@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run is the CPU's stand-in")
def test_dry_run_leaves_the_files_a_gpu_session_brings_back(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:]
    entries = sorted(out.iterdir())
    assert {p.name for p in entries} == FILES and len(entries) <= MAX_FILES
    assert all(p.is_file() and p.stat().st_size > 0 and NAME.match(p.name) for p in entries)

    # The GPU tests: collected (this is where an import error would show) and skipped here.
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    assert cases and int(suite.get("skipped")) == len(cases) and int(suite.get("failures")) == 0
    files = {c.get("classname").split(".")[1] for c in cases}
    assert {"test_gpu_decode", "test_gpu_terms", "test_gpu_training"} <= files

    # Both bench halves reached results.json (merged after each), their tables and plots too.
    head, records = results.read(out / "results.json")
    assert {r["op"] for r in records} >= {"decode", "prefix_attention"}
    assert any(r["skipped"] is None for r in records)
    md = (out / "results.md").read_text()
    assert "## decode" in md and "## prefix_attention" in md
    with tarfile.open(out / "plots.tar") as tar:
        plots = {Path(n).name for n in tar.getnames()}
    assert {"results-decode.png", "results-prefix_attention.png"} <= plots

    # The targets table is the one the results file gives.
    assert (out / "targets.md").read_text() == _targets_markdown(out / "results.json")
    assert "| target (CPU, fp32) |" in (out / "targets.md").read_text()


@needs_shell
def test_unknown_stage_is_refused(tmp_path):
    proc = _session(tmp_path / "out", "everything", timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr
