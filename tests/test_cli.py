"""The `ptuning-fast` command as a user runs it."""
import os
import subprocess
import sys

import pytest


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "ptuning_fast.cli", *args],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("ops", ["prompt_embedding", "prefix_attention"])
def test_verify_prints_table_and_passes(ops):
    proc = _run("verify", "--quick", "--ops", ops)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith(ops)]
    assert rows and all(line.rstrip().endswith("pass") for line in rows)
    assert {"out"} <= {line.split()[-5] for line in rows}


def test_verify_fails_loudly_on_a_broken_kernel(tmp_path):
    # A kernel that writes wrong values must make verify exit 1 with FAIL rows.
    script = tmp_path / "broken.py"
    script.write_text(
        "import sys, torch\n"
        "import ptuning_fast.ops as ops\n"
        "real = ops.prompt_embedding\n"
        "def wrong(*a, **k):\n"
        "    out = real(*a, **k)\n"
        "    return out * 1.01 if k.get('backend') == 'triton' else out\n"
        "ops.prompt_embedding = wrong\n"
        "from ptuning_fast.verify import main\n"
        "sys.exit(main(['--quick', '--ops', 'prompt_embedding']))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "FAIL" in proc.stdout and "check(s) failed" in proc.stdout


def test_usage_and_unknown_command():
    assert _run("--help").returncode == 0
    proc = _run("frobnicate")
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_verify_unknown_op_is_an_error():
    # An op nobody checks must not print an empty table and "all checks passed".
    proc = _run("verify", "--quick", "--ops", "bogus")
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "bogus" in proc.stderr and "prompt_embedding,prefix_attention" in proc.stderr
    assert "all checks passed" not in proc.stdout
