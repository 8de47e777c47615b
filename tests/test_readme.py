"""README.md and bench/README.md run as written.

- Every ```python block runs, in a fresh namespace, in a fresh interpreter without the tests'
  TRITON_INTERPRET (as a user's would), from an empty working folder: no undefined names, no
  downloads (a tiny model built from a config stands in for a real checkpoint). The blocks of a
  file share one interpreter, in order; a block that sets environment variables (`os.environ`)
  gets one of its own, since it shows what must happen before anything is imported.
- Every command of a ```bash block exists, and so do the subcommands, options, extras, modules
  and files it names.
- Every link resolves to a file in the repo; nothing links outside it.
"""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptuning_fast import cli

tomllib = pytest.importorskip("tomllib")        # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def blocks(doc: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(doc.read_text()) if lang == language]


def _run_python(sources: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """Runs each source in a fresh namespace of one new interpreter, in order."""
    driver = ("import sys\n"
              "for i, src in enumerate(SOURCES):\n"
              "    print(f'--- block {i}', flush=True)\n"
              "    exec(compile(src, f'<block {i}>', 'exec'), {'__name__': '__main__'})\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"          # a block that tried to download fails here
    return subprocess.run([sys.executable, "-c", f"SOURCES = {sources!r}\n{driver}"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d, "python")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written(doc, tmp_path):
    sources = blocks(doc, "python")
    shared = [s for s in sources if "os.environ" not in s]
    alone = [s for s in sources if "os.environ" in s]
    for n, group in enumerate([shared] + [[s] for s in alone]):
        if not group:
            continue
        workdir = tmp_path / f"run{n}"
        workdir.mkdir()
        proc = _run_python(group, workdir)
        assert proc.returncode == 0, f"{doc.name}: a python block failed\n" \
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_readme_has_python_blocks():
    # The test above must have something to run: the usage examples are python blocks.
    assert len(blocks(ROOT / "README.md", "python")) >= 2


# ---------------------------------------------------------------------------------------------
# Shell blocks: the commands and what they name exist

def _commands(doc: Path):
    for body in blocks(doc, "bash"):
        for line in body.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            for command in line.split("&&"):
                words = shlex.split(command)
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                    words.pop(0)                                  # VAR=value before a command
                if words:
                    yield words


def _help(args: list[str], capsys) -> str:
    """`ptuning-fast <args> --help`, run in this process (the console script's entry point)."""
    try:
        code = cli.main([*args, "--help"])
    except SystemExit as stop:                                    # argparse's --help
        code = stop.code
    assert code == 0, f"ptuning-fast {' '.join(args)} --help exited {code}"
    return capsys.readouterr().out


def _check_pip(words: list[str]) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert words[1] == "install", words
    for word in words[2:]:
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", word)
        if match and match.group(1):
            unknown = set(match.group(1).split(",")) - set(extras)
            assert not unknown, f"pip install {word}: no extra {unknown} in pyproject.toml"


def _check_ptuning_fast(words: list[str], capsys) -> None:
    assert PYPROJECT["project"]["scripts"]["ptuning-fast"] == "ptuning_fast.cli:main"
    if len(words) == 1:
        return
    text = _help(words[1:2], capsys)
    for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
        assert flag in text, f"ptuning-fast {words[1]} has no option {flag}"


def check_command(words: list[str], capsys) -> None:
    name = words[0]
    if name == "pip":
        _check_pip(words)
    elif name in ("python", "python3") and words[1:2] == ["-m"]:
        assert importlib.util.find_spec(words[2]), f"python -m {words[2]}: no such module"
    elif name == "ptuning-fast":
        _check_ptuning_fast(words, capsys)
    elif name in ("bash", "sh"):
        assert (ROOT / words[1]).is_file(), f"{name} {words[1]}: no such file in the repo"
    elif name == "pytest":
        assert importlib.util.find_spec("pytest")
        for path in (w for w in words[1:] if not w.startswith("-")):
            assert (ROOT / path).exists(), f"pytest {path}: no such path in the repo"
    else:
        assert shutil.which(name), f"{name}: no such command"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_commands_exist(doc, capsys):
    commands = list(_commands(doc))
    assert commands, f"{doc.name} has no ```bash block"
    for words in commands:
        check_command(words, capsys)


def test_shell_check_catches_a_wrong_command(capsys):
    with pytest.raises(AssertionError, match="no option --fastest"):
        check_command(["ptuning-fast", "bench", "--fastest"], capsys)
    with pytest.raises(AssertionError, match="no extra"):
        check_command(["pip", "install", "-e", ".[tests]"], capsys)
    with pytest.raises(AssertionError, match="exited 2"):
        check_command(["ptuning-fast", "benchmark"], capsys)


# ---------------------------------------------------------------------------------------------
# Links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(doc: Path) -> list[str]:
    """Targets of the markdown links and images outside code."""
    text = FENCE.sub("", doc.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text) + re.findall(r"<(\w+://[^>]+)>", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repo(doc):
    found = links(doc)
    assert found, f"{doc.name}: no links found (the pattern is broken?)"
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", doc.read_text()))
    addresses = re.findall(r"\b\w+://\S+", text)
    assert not addresses, f"{doc.name} names web addresses outside code: {addresses}"
    for target in found:
        assert not re.match(r"\w+:|//", target), f"{doc.name} links outside the repo: {target}"
        path = target.split("#")[0]
        if not path:                                               # an anchor on this page
            continue
        resolved = (doc.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name}: {target} points out of the repo"
        assert resolved.exists(), f"{doc.name}: {target} does not resolve to a file in the repo"


# ---------------------------------------------------------------------------------------------
# The README's GPU status against bench/results

def gpu_result_files() -> list[str]:
    """Timed results files in bench/results whose device is a GPU (the static report's files
    time nothing and carry no device)."""
    import json

    from ptuning_fast.benchmarks import report
    found = []
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        if "records" in data and not report.is_cpu(data):
            found.append(path.name)
    return found


def test_gpu_status_says_what_has_run():
    """Until a GPU's results are in bench/results the README says nothing has run on one; once
    they are, the section must name each such file (and stop saying so)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## GPU status", 1)[1].split("\n## ", 1)[0]
    runs = gpu_result_files()
    if not runs:
        assert "Nothing has run on a GPU yet" in section
        assert "Every figure in [bench/results](bench/results) is a CPU figure" in section
    else:
        assert "Nothing has run on a GPU yet" not in section
        assert all(name in section for name in runs), f"name {runs} in the GPU status"
