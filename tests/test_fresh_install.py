"""What a new user runs works from any folder: the repo's kernels/ folder never takes the name
`kernels` from Hugging Face's package (transformers >= 5.25 imports it at
`from transformers import ...`), and the suite's collection and `ptuning-fast verify` run from
the repo root and from another folder alike."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTEST_XDIST_WORKER",
                        "PYTEST_CURRENT_TEST")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args} in {cwd} exited {done.returncode}:\n" \
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_kernels_is_hugging_faces_package(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    code = ("import kernels, ptuning_fast.kernels.launch as ours\n"
            "print(kernels.__file__); print(ours.__file__)\n")
    if not _hf_kernels_installed():
        code = "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent')\n" \
               "import ptuning_fast.kernels.launch as ours\nprint(ours.__file__)\n"
    out = _run([sys.executable, "-c", "import transformers\n" + code], cwd).split()
    theirs, ours = (out if _hf_kernels_installed() else (None, out[-1]))
    assert Path(ours).resolve() == ROOT / "kernels" / "launch.py"
    if theirs is not None:
        assert not Path(theirs).resolve().is_relative_to(ROOT / "kernels"), theirs
    if _hf_kernels_installed():
        _run([sys.executable, "-c", "from transformers import LlamaConfig"], cwd)


def test_kernels_folder_alone_is_refused_by_its_name(tmp_path):
    """With the repo root on sys.path and no other `kernels` to be found, the folder still does
    not answer to that name: the import fails as if it were not there."""
    code = ("import sys\n"
            f"sys.path[:] = [{str(ROOT)!r}] + [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\n"
            "except ModuleNotFoundError as err:\n"
            "    print('refused:', 'kernels' in sys.modules, err)\n"
            "else:\n    print('imported', kernels.__file__)\n")
    out = _run([sys.executable, "-c", code], tmp_path)
    assert out.startswith("refused: False") and "ptuning_fast.kernels" in out, out


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_suite_collects_from(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    target = [] if where == "root" else [str(ROOT / "tests")]
    out = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                *target], cwd)
    assert " tests collected" in out, out[-2000:]


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_verify_runs_from(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    script = Path(sys.executable).parent / "ptuning-fast"     # the installed console script
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "ptuning_fast.cli"]
    out = _run([*command, "verify"], cwd)
    assert "all checks passed" in out


def test_wheel_installs_kernels_as_ptuning_fast_kernels(tmp_path):
    """A wheel carries kernels/ as ptuning_fast/kernels/ and no top-level `kernels`; installed
    alone on the path, ptuning_fast.kernels imports from it and `kernels` stays Hugging Face's."""
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w",
          str(tmp_path / "dist")], tmp_path, timeout=600)
    wheel = next((tmp_path / "dist").glob("ptuning_fast-*.whl"))
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.split("/")[0] == "kernels"], names
    assert "ptuning_fast/kernels/launch.py" in names
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
          str(wheel)], tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import ptuning_fast.kernels.launch as ours\nprint(ours.__file__)\n")
    out = _run([sys.executable, "-c", code, str(target)], tmp_path).split()
    assert Path(out[-1]).resolve() == (target / "ptuning_fast" / "kernels" / "launch.py").resolve()
