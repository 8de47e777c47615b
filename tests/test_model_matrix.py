"""The model matrix (tests/model_matrix.py) against PEFT: for every family x task x method, the
same logits, loss, gradients and AdamW step as PEFT with the same weights, greedy and beam tokens
for generating models, PEFT checkpoints both ways, mixed-task batches and gradient checkpointing;
or, for a declared refusal, exactly the declared error. The README's table is this matrix."""
import builtins
import os
import re

import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from model_matrix import FAMILIES, PEFT_REFUSES_PREFIX, cell_id, cells, markdown
from models import (MaterializedPrompt, materialized_seq2seq_generate, materialized_seq2seq_greedy,
                    peft_name, peft_refuses, peft_twin, token_cls_loss)
from test_integration_peft import assert_same_gradients_and_step

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = 3


def method_config(method: str, num_tasks: int = 1):
    return {
        "prompt": lambda: pf.PromptTuningConfig(P, num_tasks=num_tasks),
        "ptuning_mlp": lambda: pf.PTuningConfig(P, encoder_hidden_size=12, num_tasks=num_tasks),
        "ptuning_lstm": lambda: pf.PTuningConfig(P, encoder_reparameterization_type="lstm",
                                                 encoder_hidden_size=8, num_tasks=num_tasks),
        "prefix": lambda: pf.PrefixTuningConfig(P, num_tasks=num_tasks),
    }[method]()


def inputs(task: str, batch: int = 3, length: int = 7, seed: int = 1) -> dict:
    """Left-padded rows of different lengths and the task's targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        mask[b, :min(2 * b, length - 2)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = dict(input_ids=ids, attention_mask=mask)
    if task == "CAUSAL_LM":
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif task == "SEQ_CLS":
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    elif task == "TOKEN_CLS":
        out["labels"] = torch.randint(0, 3, (batch, length), generator=g).masked_fill(
            mask == 0, -100)
    elif task == "QUESTION_ANS":
        out["start_positions"] = torch.randint(0, length, (batch,), generator=g)
        out["end_positions"] = torch.randint(0, length, (batch,), generator=g)
    elif task == "SEQ_2_SEQ_LM":
        out["labels"] = torch.randint(3, 97, (batch, 4), generator=g)
    return out


def wrapped(family, task, method, num_tasks=1, backend="reference"):
    base = family.build(task)
    ours = pf.wrap(base, method_config(method, num_tasks), backend=backend)
    with torch.no_grad():   # random, not zero: a zero prefix or head would hide mistakes
        for p in ours.trainable_parameters().values():
            p.normal_(0, 0.5)
    return ours


def outputs(out) -> dict:
    """The tensors a task's output is compared on."""
    if getattr(out, "start_logits", None) is not None:
        return {"start_logits": out.start_logits, "end_logits": out.end_logits}
    return {"logits": out.logits}


def run_step(model, task, method, batch):
    """(outputs, loss) of one training forward. PEFT cannot take token-classification labels
    with a prompt (it does not pad them): there the loss is computed here, on both sides."""
    if task == "TOKEN_CLS" and method != "prefix":
        rest = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**rest)
        return outputs(out), token_cls_loss(out.logits, batch["labels"])
    out = model(**batch)
    return outputs(out), out.loss


SUPPORTED = [pytest.param(f, t, m, id=cell_id(f, t, m)) for f, t, m, r in cells() if r is None]
REFUSED = [pytest.param(f, t, m, r, id=cell_id(f, t, m)) for f, t, m, r in cells()
           if r is not None]


@pytest.mark.parametrize("family, task, method", SUPPORTED)
def test_training_step_matches_peft(family, task, method):
    ours = wrapped(family, task, method)
    batch = inputs(task)
    if method == "prefix" and task in PEFT_REFUSES_PREFIX:
        twin = peft_twin(ours, family.build(task))
        with pytest.raises(ValueError) as refused:
            twin(**batch)
        assert peft_refuses(refused.value), refused.value     # else the README note is stale
        other, name_of = MaterializedPrompt(ours), (lambda name: name)
    else:
        other, name_of = peft_twin(ours, family.build(task)), peft_name
    ours.train(), other.train()
    a, loss_a = run_step(ours, task, method, batch)
    b, loss_b = run_step(other, task, method, batch)
    for key in b:
        assert a[key].shape == b[key].shape, key
        assert_close(a[key], b[key], torch.float32, "fwd", name=key)
    assert_close(loss_a, loss_b, torch.float32, "fwd", name="loss")
    if task == "TOKEN_CLS" and method != "prefix":       # our own loss is that one
        assert_close(ours(**batch).loss, loss_a, torch.float32, "fwd", name="our loss")
    loss_a.backward(), loss_b.backward()
    assert_same_gradients_and_step(ours, other, name_of)


GENERATING = [p for p in SUPPORTED if p.values[1] in ("CAUSAL_LM", "SEQ_2_SEQ_LM")]


@pytest.mark.parametrize("family, task, method", GENERATING)
def test_generation_matches_peft(family, task, method):
    """Greedy and beam tokens equal PEFT's (one model pair for both). Causal LMs: equal to
    PEFT's algorithm run without PEFT (the prompt in the KV cache), and to PEFT's own generate()
    wherever that agrees with its algorithm (with transformers 5.24 PEFT's prefix generation
    does not: it injects its cache under the old argument name). Prefix-tuned seq2seq: equal to
    PEFT's algorithm run without PEFT (README note [e]; more beams, sampling and mixed tasks in
    test_prefix_seq2seq_beams_sampling_and_tasks_match_peft_algorithm)."""
    ours = wrapped(family, task, method)
    batch = inputs(task)
    twin = peft_twin(ours, family.build(task))
    for mode in (dict(), dict(num_beams=2)):
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  max_new_tokens=4, do_sample=False, pad_token_id=0, **mode)
        _check_generation(ours, twin, family, task, method, kw)


def _check_generation(ours, twin, family, task, method, kw):
    what = "beam" if kw.get("num_beams") else "greedy"
    if task == "SEQ_2_SEQ_LM" and method == "prefix":
        tokens = ours.generate(**kw)
        reference = materialized_seq2seq_generate(ours, **kw)
        assert torch.equal(tokens, reference), f"{what} tokens differ:\n{tokens}\n{reference}"
        if what == "greedy":    # the reference's cache seeding, checked by full passes
            by_passes = materialized_seq2seq_greedy(ours, kw["input_ids"], kw["attention_mask"],
                                                    kw["max_new_tokens"])
            assert torch.equal(reference, by_passes), f"{reference}\n{by_passes}"
        theirs = twin.generate(**kw)
        if not torch.equal(theirs, reference):      # PEFT drops its prefix (README note [e])
            assert torch.equal(theirs, twin.get_base_model().generate(**kw)), "note [e] is stale"
        return
    tokens = ours.generate(**kw)
    if task == "SEQ_2_SEQ_LM":
        theirs = twin.generate(**kw)
        assert torch.equal(tokens, theirs), f"{what} tokens differ:\n{tokens}\n{theirs}"
        return
    reference = MaterializedPrompt(ours).generate(**kw)
    assert torch.equal(tokens, reference), f"{what} tokens differ:\n{tokens}\n{reference}"
    try:
        theirs = twin.generate(**kw)
    except RuntimeError:
        # PEFT's generate() fails on OPT with a prompt (its position embeddings get 0 positions
        # for the prompted first step), and on ALiBi Falcon (its mask and the ALiBi bias, built
        # from it, disagree in length: with a prefix its cache, injected under the old argument
        # name, is ignored): the README's note [d] says so.
        assert (family.prefix == "OPT" and method != "prefix") or (
            family.prefix == "Falcon" and ours.config.alibi), "PEFT's generate() raised"
        return
    if torch.equal(theirs, reference):
        assert torch.equal(tokens, theirs), what


def model_inputs(task, rows=slice(None)) -> dict:
    """Inputs without targets (but a seq2seq model's labels: its decoder's inputs)."""
    keep = ("input_ids", "attention_mask") + (("labels",) if task == "SEQ_2_SEQ_LM" else ())
    return {k: v[rows] for k, v in inputs(task).items() if k in keep}


def logits_of(model, task):
    with torch.no_grad():
        return outputs(model(**model_inputs(task)))


@pytest.mark.parametrize("family, task, method", SUPPORTED)
def test_checkpoints_both_ways_mixed_tasks_and_checkpointing(family, task, method, tmp_path):
    ours = wrapped(family, task, method)
    expected = logits_of(ours, task)

    # ours -> PEFT: PEFT loads exactly our prompt_embeddings and heads (inference mode).
    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(family.build(task), tmp_path / "ours")
    assert_close(loaded.prompt_encoder["default"].embedding.weight,
                 ours.prompt_encoder.output_for_checkpoint(), torch.float32,
                 name="PEFT loads our prompt_embeddings")
    for name in ours.modules_to_save:
        head = loaded.base_model.get_submodule(name).modules_to_save["default"]
        for key, value in ours.base_model.get_submodule(name).state_dict().items():
            assert torch.equal(head.state_dict()[key], value), f"PEFT loads {name}.{key}"
    # PEFT -> ours: the twin's save loads into ours with the same outputs.
    twin = peft_twin(ours, family.build(task))
    twin.save_pretrained(tmp_path / "peft")
    back = pf.PTuningModel.from_pretrained(family.build(task), tmp_path / "peft")
    for key, value in logits_of(back, task).items():
        assert_close(value, expected[key], torch.float32, name=f"loaded PEFT's: {key}")

    # Mixed-task batch: each row equals the row alone with its task.
    multi = wrapped(family, task, method, num_tasks=2)
    tasks = torch.tensor([1, 0, 1])
    with torch.no_grad():
        together = outputs(multi(**model_inputs(task), task_ids=tasks))
        for row in range(3):
            alone = outputs(multi(**model_inputs(task, slice(row, row + 1)),
                                  task_ids=tasks[row:row + 1]))
            for key, value in alone.items():
                assert_close(together[key][row:row + 1], value, torch.float32,
                             name=f"row {row} {key}")

    # Gradient checkpointing: the same loss and gradients.
    ours.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            ours.gradient_checkpointing_enable()
        ours.zero_grad(set_to_none=True)
        _, loss = run_step(ours, task, method, inputs(task))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone()
                                      for n, p in ours.trainable_parameters().items()}))
    assert_close(grads[1][0], grads[0][0], torch.float32, name="loss under checkpointing")
    for name, g in grads[0][1].items():
        assert_close(grads[1][1][name], g, torch.float32, "grad", name=name)


@pytest.mark.parametrize("family, task, method, refusal", REFUSED)
def test_refused_cells_raise_the_declared_error(family, task, method, refusal):
    base = family.build(task)
    error = getattr(builtins, refusal.error)
    match = re.escape(type(base).__name__) + ".*" + re.escape(refusal.message)
    if refusal.when == "wrap":
        with pytest.raises(error, match=match):
            pf.wrap(base, method_config(method))
        return
    model = pf.wrap(base, method_config(method))
    with pytest.raises(error, match=match):
        model(**model_inputs(task))


def test_peft_refuses_prefix_tuning_on_deberta_too():
    """The DeBERTa-v2 refusal's README note says PEFT refuses these cells too: still true."""
    family = next(f for f in FAMILIES if f.name == "DeBERTa-v2")
    for task in family.tasks:
        twin = peft.get_peft_model(family.build(task),
                                   peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
        with pytest.raises(ValueError) as refused:
            twin(**model_inputs(task))
        assert peft_refuses(refused.value), refused.value


def test_readme_table_is_the_generated_one():
    """README.md holds `python -m tests.model_matrix --markdown`'s table, byte for byte,
    between its markers."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    begin, end = "<!-- model-matrix:begin -->\n", "<!-- model-matrix:end -->"
    assert begin in readme and end in readme, "README.md lacks the model-matrix markers"
    assert readme.split(begin, 1)[1].split(end, 1)[0] == markdown(), \
        "README table is stale: regenerate it with `python -m tests.model_matrix --markdown`"


def test_every_family_builds_its_declared_heads():
    """Guards the matrix itself: each row's model exists with that head, and a wrapped model is
    recognised as that task type."""
    for family in FAMILIES:
        for task in family.tasks:
            model = pf.wrap(family.build(task), pf.PromptTuningConfig(P))
            assert model.task_type == task, (family.name, task, model.task_type)


def test_prompt_and_prefix_change_the_outputs():
    """Guards the equivalence tests: the soft prompt influences each kind of output."""
    for family, task, method in [(FAMILIES[0], "CAUSAL_LM", "prefix"),
                                 (FAMILIES[-2], "SEQ_2_SEQ_LM", "prompt"),
                                 (next(f for f in FAMILIES if f.name == "BERT"),
                                  "QUESTION_ANS", "prefix")]:
        model = wrapped(family, task, method)
        batch = inputs(task)
        batch.pop("start_positions", None), batch.pop("end_positions", None)
        with torch.no_grad():
            a = outputs(model(**batch))
            model.prompt_encoder.embedding.weight.mul_(2.0)
            b = outputs(model(**batch))
        assert max((a[k] - b[k]).abs().max() for k in a) > 1e-3, (family.name, task, method)


def test_encoder_decoder_heads_other_than_seq2seq_lm_are_refused():
    import transformers
    config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=4, num_labels=3)
    for cls in (transformers.T5ForSequenceClassification, transformers.T5Model):
        with pytest.raises(NotImplementedError, match=f"{cls.__name__}.*seq2seq LM"):
            pf.wrap(cls(config), pf.PromptTuningConfig(P))


@pytest.mark.parametrize("name, task", [("BART", "SEQ_2_SEQ_LM"), ("OPT", "CAUSAL_LM")])
def test_prefix_paths_of_this_matrix_run_on_the_kernels(name, task):
    """The Triton kernels (the interpreter without a GPU) give the reference backend's outputs
    and gradients on the paths this matrix added: BART's decoder-only prefixes, OPT's
    mask-numbered positions."""
    family = next(f for f in FAMILIES if f.name == name)
    models = {backend: wrapped(family, task, "prefix", backend=backend)
              for backend in ("reference", "triton")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    results = {}
    for backend, model in models.items():
        model.train()
        out, loss = run_step(model, task, "prefix", inputs(task))
        loss.backward()
        results[backend] = out, {n: p.grad for n, p in model.trainable_parameters().items()}
    for key, value in results["triton"][0].items():
        assert_close(value, results["reference"][0][key], torch.float32, name=key)
    for name_, grad in results["triton"][1].items():
        assert_close(grad, results["reference"][1][name_], torch.float32, "grad", name=name_)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_seq2seq_forward_with_given_encoder_outputs(method):
    """A decoding loop of one's own passes the encoder's outputs back with the original mask:
    the wrapper extends that mask over the prompt (or leaves it, for prefixes) and gives the
    logits of a full pass."""
    family = next(f for f in FAMILIES if f.name == "BART")
    model = wrapped(family, "SEQ_2_SEQ_LM", method)
    batch = model_inputs("SEQ_2_SEQ_LM")
    with torch.no_grad():
        full = model(**batch)
        for ids in (batch["input_ids"], None):
            again = model(attention_mask=batch["attention_mask"], labels=batch["labels"],
                          encoder_outputs=(full.encoder_last_hidden_state,), input_ids=ids)
            assert_close(again.logits, full.logits, torch.float32, name="logits")


@pytest.mark.parametrize("name, method", [("BART", "prompt"), ("BART", "prefix"),
                                          ("T5 / Flan-T5", "ptuning_lstm")])
def test_seq2seq_mixed_task_generation_equals_each_row_alone(name, method):
    family = next(f for f in FAMILIES if f.name == name)
    model = wrapped(family, "SEQ_2_SEQ_LM", method, num_tasks=2)
    batch = model_inputs("SEQ_2_SEQ_LM")
    tasks = torch.tensor([1, 0, 1])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=2)
    together = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              task_ids=tasks, **kw)
    for row in range(3):
        alone = model.generate(input_ids=batch["input_ids"][row:row + 1],
                               attention_mask=batch["attention_mask"][row:row + 1],
                               task_ids=tasks[row:row + 1], **kw)
        assert torch.equal(together[row, :alone.shape[1]], alone[0]), row


@pytest.mark.parametrize("name", ["T5 / Flan-T5", "BART"])
def test_prefix_seq2seq_beams_sampling_and_tasks_match_peft_algorithm(name):
    """Beam search (2 and 3 beams, several sequences returned), sampling with a fixed seed (alone
    and in beams), on a left-padded batch of rows of different lengths and mixed tasks: the
    tokens of PEFT's algorithm run without PEFT (transformers' generate() of the unwrapped model
    from PEFT's prefix cache, each row with its task's prefix; README note [e]). Guards: beam
    search's tokens are not greedy's, and the tasks' prefixes change them."""
    family = next(f for f in FAMILIES if f.name == name)
    model = wrapped(family, "SEQ_2_SEQ_LM", "prefix", num_tasks=2)
    batch = inputs("SEQ_2_SEQ_LM", batch=4, length=9, seed=5)
    tasks = torch.tensor([1, 0, 0, 1])

    def both(**mode):
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  task_ids=tasks, max_new_tokens=5, pad_token_id=0, **mode)
        torch.manual_seed(11)
        tokens = model.generate(**kw)
        torch.manual_seed(11)
        reference = materialized_seq2seq_generate(model, **kw)
        assert torch.equal(tokens, reference), f"{mode}: tokens differ:\n{tokens}\n{reference}"
        return tokens

    beams = both(num_beams=2)
    assert not torch.equal(beams, both(do_sample=False)), "2 beams found greedy's tokens"
    both(num_beams=3, num_return_sequences=2)
    both(do_sample=True, num_return_sequences=2)
    both(do_sample=True, num_beams=2)
    torch.manual_seed(11)
    one_task = materialized_seq2seq_generate(model, batch["input_ids"], batch["attention_mask"],
                                             tasks.new_zeros(4), max_new_tokens=5,
                                             pad_token_id=0, num_beams=2)
    assert not torch.equal(beams, one_task), "the tasks' prefixes do not change the tokens"
