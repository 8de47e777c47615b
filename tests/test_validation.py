"""Bad input gets a clear error naming the argument, never a crash inside a kernel."""
import pytest
import torch
from conftest import DEVICE

import ptuning_fast as pf
from ptuning_fast.ops import resolve_backend


def _inputs():
    ids = torch.randint(0, 10, (2, 3), device=DEVICE)
    weight = torch.randn(10, 8, device=DEVICE)
    prompt = torch.randn(4, 8, device=DEVICE)
    return ids, weight, prompt


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("mutate, error, words", [
    (lambda i, w, p: (i.float(), w, p, None), TypeError, ["input_ids", "int64"]),
    (lambda i, w, p: (i[0], w, p, None), ValueError, ["input_ids", "2-D"]),
    (lambda i, w, p: (i, w.long(), p, None), TypeError, ["weight", "dtype"]),
    (lambda i, w, p: (i, w, p[:, :5], None), ValueError, ["prompt", "embedding width 8"]),
    (lambda i, w, p: (i, w, p[None].expand(2, 4, 8), None), ValueError, ["prompt_index"]),
    (lambda i, w, p: (i, w, p, torch.zeros(2, dtype=torch.long)), ValueError, ["prompt_index", "shared"]),
    (lambda i, w, p: (i, w, p[None].expand(3, 4, 8), torch.zeros(5, dtype=torch.long)),
     ValueError, ["prompt_index", "(B,)"]),
    (lambda i, w, p: (i + 10, w, p, None), ValueError, ["input_ids", "outside [0, 10)"]),
    (lambda i, w, p: (i - 11, w, p, None), ValueError, ["input_ids", "outside [0, 10)"]),
    (lambda i, w, p: (i, w, p[None].expand(2, 4, 8), torch.tensor([0, 2])), ValueError,
     ["prompt_index", "outside [0, 2)"]),
])
def test_prompt_embedding_bad_inputs(mutate, error, words, backend):
    ids, weight, prompt, index = mutate(*_inputs())
    with pytest.raises(error) as info:
        pf.prompt_embedding(ids, weight, prompt, prompt_index=index, backend=backend)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_mixed_devices_named():
    ids, weight, prompt = _inputs()
    with pytest.raises(TypeError, match="one device"):
        pf.prompt_embedding(ids, weight, prompt.to("meta"))


def test_all_reasons_reported_at_once():
    ids, weight, prompt = _inputs()
    with pytest.raises(TypeError) as info:
        pf.prompt_embedding(ids.float(), weight.long(), prompt)
    assert "input_ids" in str(info.value) and "weight" in str(info.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match="`backend` must be one of"):
        pf.prompt_embedding(*_inputs(), backend="cuda")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
