"""The long commands show progress: a line per case on stderr as it starts and as it ends, with
the case's time and the time since the start; the results stay on stdout."""
import re

from ptuning_fast import verify
from ptuning_fast.benchmarks import command
from ptuning_fast.progress import Progress

DONE = re.compile(r"^\[(\d+)/(\d+)\] (.+): (.+) in (\d+\.\d) s \(elapsed (\d+\.\d) s\)$")


def _pairs(stderr: str):
    """(label, outcome, seconds, elapsed) of each finished case; every case's start line comes
    right before its end line."""
    lines = [line for line in stderr.splitlines() if line.startswith("[")]
    assert len(lines) % 2 == 0, lines
    out, total = [], None
    for n, (begun, ended) in enumerate(zip(lines[::2], lines[1::2]), start=1):
        match = DONE.match(ended)
        assert match, ended
        index, count, label, outcome, seconds, elapsed = match.groups()
        assert begun == f"[{index}/{count}] {label} ...", (begun, ended)
        assert int(index) == n and (total is None or int(count) == total)
        total = int(count)
        out.append((label, outcome, float(seconds), float(elapsed)))
    assert len(out) == total
    elapsed = [e for *_, e in out]
    assert elapsed == sorted(elapsed)
    return out


def test_progress_lines(capsys):
    progress = Progress(2)
    progress.start("first case")
    progress.done("pass")
    progress.start("second")
    progress.done("skipped")
    labels = [(label, outcome) for label, outcome, *_ in _pairs(capsys.readouterr().err)]
    assert labels == [("first case", "pass"), ("second", "skipped")]


def test_verify_prints_a_line_per_check(capsys):
    assert verify.main(["--quick", "--ops", "prompt_embedding"]) == 0
    captured = capsys.readouterr()
    done = _pairs(captured.err)
    checks = [c for c in verify.cases(quick=True, on_gpu=False) if c.op == "prompt_embedding"]
    assert len(done) == 2 * len(checks)                    # fp32 and fp16 on CPU
    assert {label for label, *_ in done} == {f"{c.op} {c.shape} {dtype}" for c in checks
                                             for dtype in ("float32", "float16")}
    assert all(outcome == "pass" for _, outcome, *_ in done)
    assert "[1/" not in captured.out and "all checks passed" in captured.out


def test_bench_prints_a_line_per_case(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert command.main(["--quick", "--out", str(out), "--ops", "prompt_embedding"]) == 0
    done = _pairs(capsys.readouterr().err)
    cases = command.build_cases(["prompt_embedding"], command.providers.PROVIDERS,
                                command.torch.device("cpu"), quick=True)
    assert [label for label, *_ in done] == [case.label() for case in cases]
    # A measured case shows its median; the CPU skips its kernel providers with a reason.
    assert any(outcome.endswith(" ms") for _, outcome, *_ in done)
    assert any(outcome == "skipped" for _, outcome, *_ in done)
