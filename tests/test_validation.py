"""Bad input gets a clear error naming the argument, never a crash inside a kernel."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

import ptuning_fast as pf
from ptuning_fast.kernels import launch
from ptuning_fast.ops import choose_backend


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


@pytest.mark.parametrize("decorated", [None, False], ids=["not-yet-decorated", "for-a-gpu"])
def test_triton_backend_on_cpu_without_interpreter(monkeypatch, decorated):
    """Without the interpreter, and with TRITON_INTERPRET=1 set only after the kernels were
    decorated for a GPU (Triton keeps that mode): a clear refusal, never Triton's own crash."""
    monkeypatch.setenv("TRITON_INTERPRET", "0" if decorated is None else "1")
    monkeypatch.setattr(launch, "_defined_interpreted", decorated)
    tensors = {"q": torch.randn(1, 2, 3, 4)}
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose_backend("triton", "prefix_attention", tensors, {})
    assert choose_backend("auto", "prefix_attention", tensors, {}) == "torch"
    assert choose_backend("reference", "prefix_attention", tensors, {}) == "reference"


def _attention_inputs(D=8, dtype=torch.float32):
    q = torch.randn(1, 2, 3, D, device=DEVICE, dtype=dtype)
    return q, q.clone(), q.clone()


BAD_ARGUMENTS = [
    (dict(scale=float("nan")), ValueError, ["scale", "nan", "finite"]),
    (dict(scale=float("inf")), ValueError, ["scale", "inf", "finite"]),
    (dict(scale=True), TypeError, ["scale", "bool"]),
    (dict(causal="no"), TypeError, ["causal", "str", "'no'", "bool"]),
    (dict(causal=torch.tensor(True)), TypeError, ["causal", "Tensor", "bool"]),
    (dict(causal=1), TypeError, ["causal", "int", "bool"]),
]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("kwargs, error, words", BAD_ARGUMENTS)
def test_prefix_attention_bad_arguments(kwargs, error, words, backend):
    with pytest.raises(error) as info:
        pf.prefix_attention(*_attention_inputs(), backend=backend, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("kwargs, error, words", BAD_ARGUMENTS + [
    (dict(window_size=(True, -1)), ValueError, ["window_size", "True"]),
    (dict(softcap=True), TypeError, ["softcap", "bool"]),
    (dict(backend="fast"), ValueError, ["backend", "'fast'"]),
])
def test_layer_calls_after_a_good_one_are_still_checked(kwargs, error, words):
    """Every model layer's call is checked: one that differs from a good call only in an
    option's type (causal=1 after causal=True, scale=True after 1.0), a NaN or a name is
    refused."""
    good = dict(causal=True, scale=1.0, window_size=(1, -1), softcap=2.0, backend="auto")
    pf.ops.layer_prefix_attention(*_attention_inputs(), **good)
    with pytest.raises(error) as info:
        pf.ops.layer_prefix_attention(*_attention_inputs(), **{**good, **kwargs})
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_prefix_attention_zero_head_dim(backend):
    with pytest.raises(ValueError, match="head dim D must be >= 1.*shape=\\(1, 2, 3, 0\\)"):
        pf.prefix_attention(*_attention_inputs(D=0), backend=backend)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs CPU tensors only")
def test_bf16_under_the_interpreter_is_refused():
    # The interpreter stores bf16 as uint16 and its bf16 dots return garbage: refuse, never
    # return that. The reference path stays available in bf16.
    q, k, v = _attention_inputs(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter.*bfloat16.*`q`.*float32 or float16"):
        pf.prefix_attention(q, k, v, backend="triton")
    ids, weight, prompt = _inputs()
    with pytest.raises(TypeError, match="interpreter.*bfloat16.*`weight`"):
        pf.prompt_embedding(ids, weight.bfloat16(), prompt.bfloat16(), backend="triton")
    assert pf.prefix_attention(q, k, v, backend="reference").dtype == torch.bfloat16
    assert pf.prefix_attention(q, k, v, backend="torch").dtype == torch.bfloat16
    assert pf.prefix_attention(q, k, v).dtype == torch.bfloat16      # auto: the torch path


@pytest.mark.skipif(DEVICE != "cpu", reason="a plain CPU: no CUDA device")
def test_dropout_keep_mask_on_a_plain_cpu_is_a_clear_error():
    # Without the interpreter, Triton's own error says "0 active drivers ([])".
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from ptuning_fast.kernels.attention_dropout import dropout_keep_mask\n"
            "dropout_keep_mask(1, 1, 1, 2, 0, 4, 0.5, 'cpu')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr and "active drivers" not in proc.stderr, \
        proc.stderr[-2000:]


@pytest.mark.skipif(DEVICE != "cpu", reason="a plain CPU: no CUDA device")
def test_interpreter_set_after_import_until_the_first_kernel_call():
    """What the README says of TRITON_INTERPRET: set after `import ptuning_fast` it still
    counts (the kernels are imported at their first call, and ptuning_fast imports no Triton);
    set after a kernel module was imported, or after Triton itself was (transformers' model
    classes import it), Triton has decided, and the call is refused by name, not crashed
    inside Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    call = ("q = torch.randn(2, 4, 9, 16); k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)\n"
            "out = pf.prefix_attention(q, k, v, backend='triton')\n"
            "assert (out - pf.reference.prefix_attention(q, k, v)).abs().max() < 1e-5\n"
            "print('ran')\n")
    late = "import os, torch, ptuning_fast as pf\nos.environ['TRITON_INTERPRET'] = '1'\n" + call
    proc = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "ran" in proc.stdout, proc.stderr[-2000:]
    for first in ("import ptuning_fast.kernels.prefix_attention_fwd",
                  "from transformers import LlamaForCausalLM"):
        too_late = (f"import os, torch, ptuning_fast as pf\n{first}\n"
                    "os.environ['TRITON_INTERPRET'] = '1'\n" + call)
        proc = subprocess.run([sys.executable, "-c", too_late], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode != 0 and "ValueError" in proc.stderr, (first, proc.stderr[-2000:])
        assert "TRITON_INTERPRET=1" in proc.stderr and "outside of the scope" not in \
            proc.stderr and "active drivers" not in proc.stderr, (first, proc.stderr[-2000:])
