"""Helpers of the multi-process tests (DDP, FSDP): gloo on CPU, one free port per run, and the
soft-prompt model every rank and the single-process reference build alike."""
import socket

import pytest
import torch
import torch.distributed as dist

import ptuning_fast as pf
from models import tiny_llama

WORLD = 2

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soft_prompt_model(config):
    """A tiny Llama wrapped with `config`, its trainable parameters random (not PEFT's init):
    the same model in every process."""
    torch.manual_seed(0)
    model = pf.wrap(tiny_llama(0), config, backend="reference").train()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.normal_(0, 0.3)
    return model
