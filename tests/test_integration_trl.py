"""TRL's SFTTrainer on a wrapped model, as PEFT users train: padded batches (completion-only and
assistant-only loss masks) and packing (padding-free rows: position ids, cu_seq_lens_q/k,
seq_idx). SFTTrainer computes its loss through TRL's fused LM head (`add_fused_lm_head`), which
it adds to the inner transformers model of a PeftModel and, for anything else, to the model it
is given: the wrapper hands it to its base model (model._retarget_forward_patch).

- prompt tuning: every logged loss equals PEFT's, started from the same prompt;
- prefix tuning and P-Tuning (PEFT's prefix tuning fails there): each step's loss and prompt
  gradients equal the same step computed by the reference backend from the step's inputs and
  parameters, through the model's own logits and loss (not the fused head);
- a packed batch's loss equals its sequences run one per row (same labels, same divisor).
Tiny local models, a word tokenizer built offline, a few steps each."""
import copy
import random

import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import VOCAB, peft_twin, tiny_llama
from tiny_tokenizer import WORDS, tiny_tokenizer

pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

STEPS = 3
# Generation markers make SFTTrainer's assistant-only mask cover the assistant's turns.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                 "{{ m['content'] }} </s> {% endgeneration %}{% else %}{{ m['role'] }} "
                 "{{ m['content'] }} {% endif %}{% endfor %}")


def texts(count, seed, shortest=2, longest=7):
    g = random.Random(seed)
    return [" ".join(g.choices(WORDS, k=g.randint(shortest, longest))) for _ in range(count)]


def dataset(kind):
    """16 examples: 'completion' (prompt + completion: completion-only loss), 'assistant'
    (conversations: assistant-only loss) or 'text' (language modeling, for packing)."""
    if kind == "completion":
        # The completion's leading space keeps the prompt's last word whole in prompt+completion.
        return datasets.Dataset.from_dict({"prompt": texts(16, 1),
                                           "completion": [" " + t for t in texts(16, 2)]})
    if kind == "assistant":
        return datasets.Dataset.from_dict({"messages": [
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in zip(texts(16, 3), texts(16, 4))]})
    return datasets.Dataset.from_dict({"text": texts(16, 5, 3, 9)})


# mode -> (dataset, SFTConfig options)
MODES = {
    "completion_only": ("completion", {}),
    "assistant_only": ("assistant", {"assistant_only_loss": True}),
    # One sequence per row, padding-free: PEFT's concatenation is the right function there.
    "padding_free": ("text", {"padding_free": True, "per_device_train_batch_size": 1,
                              "max_length": None}),
    # No loss mask: every row's first label counts.
    "language_modeling": ("text", {}),
    # Several sequences per row (best-fit-decreasing bins of 24 tokens, then flattened).
    "packed": ("text", {"packing": True, "max_length": 24}),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    tok.chat_template = CHAT_TEMPLATE
    return tok


class RecordingTrainer(trl.SFTTrainer):
    """Keeps, for every step, its inputs, the trainable parameters it started from, its loss
    and the gradients its backward left (before clipping and the optimizer step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        batch = dict(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        self.steps.append(dict(batch=batch, num_items_in_batch=num_items_in_batch,
                               params=params, loss=loss.detach().clone(), grads=grads))
        return loss


def train(model, mode, tokenizer, tmp_path, **config):
    """`STEPS` steps of SFTTrainer (TRL's defaults otherwise: bf16 autocast where the device
    has it); `config` overrides SFTConfig options."""
    kind, options = MODES[mode]
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=STEPS, logging_steps=1,
                         **{"per_device_train_batch_size": 4, "max_length": 32, **options},
                         learning_rate=0.05, report_to=[], save_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, seed=0, **config)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset(kind),
                               processing_class=tokenizer)
    trainer.train()
    return trainer


def logged_losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


CONFIGS = {
    "prompt": lambda: pf.PromptTuningConfig(4),
    "ptuning": lambda: pf.PTuningConfig(4, encoder_hidden_size=16),
    "prefix": lambda: pf.PrefixTuningConfig(4),
}


@pytest.mark.parametrize("mode", ["completion_only", "assistant_only", "padding_free"])
def test_prompt_tuning_logs_peft_losses(mode, tokenizer, tmp_path):
    """Prompt tuning from the same prompt: every logged loss is PEFT's inside SFTTrainer, and
    the batches held the masks the mode promises (ignored labels, or padding-free rows)."""
    base = tiny_llama(0)
    ours = pf.wrap(copy.deepcopy(base), CONFIGS["prompt"]())
    twin = peft_twin(ours, base)
    ours_run = train(ours, mode, tokenizer, tmp_path / "ours")
    peft_run = train(twin, mode, tokenizer, tmp_path / "peft")
    losses = logged_losses(ours_run)
    assert len(losses) == STEPS
    assert_close(losses, logged_losses(peft_run), torch.float32, name="logged losses")
    first = ours_run.steps[0]["batch"]
    if mode == "padding_free":
        assert "attention_mask" not in first and "seq_idx" in first
    else:
        assert (first["labels"] == -100).any(dim=1).all()      # every row masks some tokens


def test_prompt_tuning_without_a_loss_mask_divides_by_every_predicted_label(tokenizer, tmp_path):
    """Language modeling data, padded: the trainer counts labels for the loss's divisor
    (num_items_in_batch) as for a causal LM, leaving out each row's first label, which nothing
    predicts there; behind a prompt the last prompt position predicts it, and the fused LM head
    sums its term. Ours counts it (`PTuningModel.loss_type`); PEFT's divisor leaves it out, so
    its logged loss is larger. Same summed loss at the first step, same parameters."""
    base = tiny_llama(0)
    ours = pf.wrap(copy.deepcopy(base), CONFIGS["prompt"]())
    twin = peft_twin(ours, base)
    ours_step = train(ours, "language_modeling", tokenizer, tmp_path / "ours").steps[0]
    peft_step = train(twin, "language_modeling", tokenizer, tmp_path / "peft").steps[0]
    labels = ours_step["batch"]["labels"]
    assert ours_step["num_items_in_batch"] == (labels != -100).sum()
    assert peft_step["num_items_in_batch"] == (labels[:, 1:] != -100).sum()
    assert_close(ours_step["loss"] * ours_step["num_items_in_batch"],
                 peft_step["loss"] * peft_step["num_items_in_batch"], torch.float32,
                 name="summed loss")


def reference_step(model_like, config, step):
    """The step's loss and gradients from a reference-backend model holding the step's
    parameters, through the model's own logits and loss (num_items_in_batch as the trainer
    divided by)."""
    reference = pf.wrap(copy.deepcopy(model_like.base_model), config, backend="reference")
    reference.load_state_dict(step["params"], strict=False)
    reference.train()
    kwargs = {} if step["num_items_in_batch"] is None \
        else {"num_items_in_batch": step["num_items_in_batch"]}
    loss = reference(**step["batch"], **kwargs).loss
    loss.backward()
    return loss, {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["completion_only", "packed"])
@pytest.mark.parametrize("method", ["prefix", "ptuning"])
def test_each_step_equals_the_reference_backend(method, mode, tokenizer, tmp_path):
    """Prefix tuning and P-Tuning: each step's loss and prompt gradients inside SFTTrainer are
    those the reference backend computes for the same inputs and parameters."""
    base = tiny_llama(0)
    config = CONFIGS[method]()
    # fp32 (no bf16 autocast), so that the comparison is exact.
    run = train(pf.wrap(copy.deepcopy(base), config), mode, tokenizer, tmp_path, bf16=False)
    assert len(run.steps) == STEPS
    untouched = pf.wrap(copy.deepcopy(base), config)     # its base model is not patched
    for index, step in enumerate(run.steps):
        assert ("cu_seq_lens_q" in step["batch"]) == (mode == "packed")
        loss, grads = reference_step(untouched, config, step)
        assert_close(step["loss"], loss.detach(), torch.float32, name=f"step {index} loss")
        assert step["grads"].keys() == grads.keys()
        for name, grad in step["grads"].items():
            assert grad.abs().sum() > 0, f"step {index}: {name} got no gradient"
            assert_close(grad, grads[name], torch.float32, "grad", name=f"step {index} {name}")


def unpacked(batch):
    """A padding-free batch's sequences one per row (right padding), with the same labels."""
    bounds = batch["cu_seq_lens_q"].tolist()
    rows = [(a, b) for a, b in zip(bounds, bounds[1:])]
    width = max(b - a for a, b in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (a, b) in enumerate(rows):
        ids[row, :b - a] = batch["input_ids"][0, a:b]
        labels[row, :b - a] = batch["labels"][0, a:b]
        mask[row, :b - a] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_packed_batch_loss_equals_its_sequences_unpacked(method, tokenizer, tmp_path):
    """Each packed step of SFTTrainer: its logged loss is the loss of the same sequences run one
    per row with the same labels (the collator ignores each sequence's first token) and the
    same divisor — packing changes neither which tokens count nor how much."""
    config = CONFIGS[method]()
    run = train(pf.wrap(tiny_llama(0), config), "packed", tokenizer, tmp_path, bf16=False)
    model = pf.wrap(tiny_llama(0), config)
    for index, step in enumerate(run.steps):
        batch = step["batch"]
        assert len(batch["cu_seq_lens_q"]) > 2, "a packed row holds several sequences"
        model.load_state_dict(step["params"], strict=False)
        kwargs = {} if step["num_items_in_batch"] is None \
            else {"num_items_in_batch": step["num_items_in_batch"]}
        with torch.no_grad():
            rows = model(**unpacked(batch), **kwargs).loss
        assert_close(step["loss"], rows, torch.float32, name=f"step {index} loss")


def test_fused_lm_head_added_to_the_wrapper_scores_the_prompted_sequence():
    """TRL's add_fused_lm_head on the wrapper: with fused_lm_head=True the per-token log
    probabilities are those of the wrapper's own logits (prompt in front, labels shifted past
    it); without it the wrapper's forward is unchanged; `base_model` is still the
    transformers model."""
    from trl.trainer.utils import add_fused_lm_head
    model = pf.wrap(tiny_llama(0), pf.PromptTuningConfig(4))
    ids = torch.randint(3, VOCAB, (2, 6))
    labels = ids.clone()
    labels[1, :2] = -100
    with torch.no_grad():
        before = model(input_ids=ids).logits
        add_fused_lm_head(model)
        assert model.base_model is model.get_base_model()
        after = model(input_ids=ids).logits
        fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert_close(after, before, torch.float32, name="logits")
    P = model.num_virtual_tokens
    log_probs = before[:, P - 1:-1].log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    want = torch.cat([torch.zeros(2, P), log_probs.masked_fill(labels == -100, 0)], 1)[:, 1:]
    assert_close(fused.log_probs, want, torch.float32, name="log_probs")
