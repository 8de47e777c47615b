"""Launch-side helpers (kernels/launch.py).

Kernels launch on their tensors' device, not on whichever CUDA device is current: a model on
cuda:1 (moved there, or a layer placed there by device_map) runs while cuda:0 is current, and
Triton launches on the current device. No second GPU here: the CUDA tensors are fake (shape,
dtype and device only) and the device switch is recorded instead of made.

The host-side ceil-division and next power of two are Triton's, without its wrappers' cost."""
import contextlib

import pytest
import torch
import triton
from conftest import DEVICE
from torch._subclasses.fake_tensor import FakeTensorMode

from ptuning_fast.kernels import attention_dropout, launch
from ptuning_fast.kernels import prefix_attention_bwd as bwd
from ptuning_fast.kernels import prefix_attention_decode as decode
from ptuning_fast.kernels import prefix_attention_fwd as fwd
from ptuning_fast.kernels import prompt_embedding as embedding


@pytest.fixture
def switches(monkeypatch):
    """cuda:0 current; records every device `torch.cuda.device` is asked to make current."""
    made = []

    @contextlib.contextmanager
    def device(d):
        made.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return made


def fake(device):
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(2, 3, device=device)


def test_a_launcher_runs_with_its_first_tensors_device_current(switches):
    seen = []
    launcher = launch.on_input_device(lambda *args, **kw: seen.append(args) or "ran")
    assert launcher(3, fake("cuda:1"), fake("cuda:0")) == "ran"
    assert switches == [torch.device("cuda:1")]
    switches.clear()
    launcher(fake("cuda:0"), fake("cuda:1"))            # already current: no switch
    launcher(torch.empty(2), 5)                         # CPU: nothing to switch
    launcher(5, scale=1.0)                              # no tensor at all
    assert switches == [] and len(seen) == 4


def test_on_device_switches_only_to_another_cuda_device(switches):
    for device in ("cuda:1", "cuda:0", "cuda", "cpu"):
        with launch.on_device(torch.device(device)):
            pass
    assert switches == [torch.device("cuda:1")]


@pytest.mark.parametrize("entry", [fwd.prefix_attention_fwd, bwd.prefix_attention_bwd,
                                   decode.prefix_attention_decode,
                                   embedding.prompt_embedding_fwd, embedding.prompt_grad],
                         ids=lambda f: f.__name__)
def test_every_kernel_entry_point_launches_on_its_inputs_device(entry):
    assert getattr(entry, "on_input_device", False), entry.__name__


@pytest.mark.skipif(DEVICE != "cpu" or not launch.interpreting(),
                    reason="runs the mask kernel under the interpreter")
def test_the_dropout_mask_launches_on_its_device(monkeypatch):
    asked = []
    monkeypatch.setattr(attention_dropout, "on_device",
                        lambda d: asked.append(d) or contextlib.nullcontext())
    keep = attention_dropout.dropout_keep_mask(7, 1, 2, 3, 1, 4, 0.5, "cpu")
    assert keep.shape == (1, 2, 3, 5) and asked == [torch.device("cpu")]


def test_host_arithmetic_equals_tritons():
    assert all(launch.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(launch.cdiv(a, b) == triton.cdiv(a, b)
               for a in range(0, 300) for b in range(1, 40))
