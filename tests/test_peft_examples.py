"""PEFT's import surface, shown by three of PEFT's own prompt-learning examples written in their
shape (docs/examples/): each runs with `from ptuning_fast import ...` and, with only that line
changed, with `from peft import ...`, and both give the same loss at every training step and
the same evaluation after saving and loading back. (The tiny T5 has dropout off: ptuning_fast's
attention dropout keeps other elements than PEFT's eager attention, docs/examples/offline.py.)"""
import tempfile
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("datasets")

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
OURS = "from ptuning_fast import "
THEIRS = "from peft import "

# script -> what it leaves behind after loading its saved adapter back
SCRIPTS = {"peft_prompt_tuning_clm.py": "reloaded_eval_loss",
           "peft_p_tuning_seq_cls.py": "reloaded_accuracy",
           "peft_prefix_tuning_seq2seq.py": "reloaded_eval_loss"}


def _run(source: str, path: Path) -> dict:
    namespace = {"__name__": "__main__", "__file__": str(path)}
    torch.manual_seed(0)
    exec(compile(source, str(path), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_example_runs_on_ours_and_on_peft_with_the_same_losses(script, tmp_path, monkeypatch):
    path = EXAMPLES / script
    ours = path.read_text()
    theirs = ours.replace(OURS, THEIRS)
    changed = [(a, b) for a, b in zip(ours.splitlines(), theirs.splitlines()) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith(OURS), changed   # the import line only
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # the saved models and adapters
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    mine, twin = _run(ours, path), _run(theirs, path)
    assert type(mine["model"]).__module__.startswith("ptuning_fast")
    assert type(twin["model"]).__module__.startswith("peft")
    losses = torch.tensor(mine["train_losses"])
    assert len(losses) >= 4 and losses.isfinite().all()
    torch.testing.assert_close(losses, torch.tensor(twin["train_losses"]), rtol=1e-4, atol=1e-5)
    reloaded = SCRIPTS[script]
    torch.testing.assert_close(torch.tensor(float(mine[reloaded])),
                               torch.tensor(float(twin[reloaded])), rtol=1e-4, atol=1e-5)
