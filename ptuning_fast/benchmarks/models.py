"""End-to-end cases on a Llama-3.2-1B-shaped model with random weights (built from a LlamaConfig,
nothing downloaded): a prefix-tuning, P-Tuning or prompt-tuning training step, and greedy
generation; ours
(`pf.wrap`) against PEFT (`peft.get_peft_model`) on identically built base models.

Generation has a third provider, "peft_algorithm": PEFT's generation algorithm done on the
unwrapped base model (prefix tuning: a DynamicCache holding a per-row copy of every layer's
prefix, P ones in front of the mask, positions shifted by P; prompt/P-Tuning: the prompt
prepended to the input embeddings of the first step). It stands in for PEFT where PEFT's own
generate() is broken: with transformers >= 5.24 (the cache argument renamed past_key_values ->
cache) PEFT 0.21's prefix generation attends to no prefix at all, and its prompt-tuning
generation feeds the P prompt vectors again with every new token (P + 1 positions per step).

Record fields: method, provider "ptuning_fast" | "peft" | "peft_algorithm", B, Lq = sequence
(train) or prompt (generate) length, Lk = Lq + new tokens (generate), P, Hq/Hkv/D the model's attention heads.
tokens_per_s counts real tokens trained on, or new tokens generated, per second.
On CPU an 8-layer Llama (SMALL_LLAMA: hidden 256, 8 query / 2 kv heads of 32) stands in (the
same code path, seconds instead of hours), and each case's providers are timed in alternation.
"""
from __future__ import annotations

import functools
import inspect
import itertools

import torch

from .case import Case, Prepared, Unavailable, torch_dtype

METHODS = ("prefix_tuning", "p_tuning", "prompt_tuning")
# Training only: prefix tuning with activation checkpointing, the memory lever that ptuning_fast
# allows and PEFT's prefix tuning does not survive (transformers drops its prefix cache).
CHECKPOINTED = "prefix_tuning_checkpointed"
PROVIDERS = ("ptuning_fast", "peft")
PEFT_ALGORITHM = "peft_algorithm"
# Generation, prefix tuning: ours with a static KV cache and transformers' compiled decoding
# step (CUDA graphs on a GPU; inductor code on a CPU), a path PEFT's dynamic prefix cache has
# not. Not in --quick on a CPU: compiling there takes longer than the rest of a quick run.
STATIC = "ptuning_fast_static"

LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=4096,
                   max_position_embeddings=2048, tie_word_embeddings=True)


def model_shape(device: torch.device) -> dict:
    return LLAMA_3_2_1B if device.type == "cuda" else SMALL_LLAMA


def _heads(shape: dict) -> dict:
    return {"Hq": shape["num_attention_heads"], "Hkv": shape["num_key_value_heads"],
            "D": shape["head_dim"]}


def train_step_cases(device: torch.device, quick: bool) -> list[Case]:
    shape = model_shape(device)
    # GPU: the targets' two lengths (L = 512: no slower than PEFT; L = 4096: 1.3x), 4096 tokens
    # a step at 512 and 8192 at 4096.
    # CPU: P = 16 and the GPU grid's P = 64 (the prompt share of the work that the shared
    # prompt pass saves grows with P: (B - 1) P / (B (P + L)) of the frozen model's positions).
    shapes = ([(8, 512, 64, "bf16"), (2, 4096, 64, "bf16")] if device.type == "cuda"
              else [(4, 128, 16, "fp32"), (4, 128, 64, "fp32")][:1 if quick else 2])
    return [Case("train_step", "step", provider, dtype, B=B, Lq=L, P=P, method=method,
                 prepare=prepare_train_step, **_heads(shape))
            for B, L, P, dtype in shapes
            for method in METHODS + (CHECKPOINTED,) for provider in PROVIDERS]


def generate_cases(device: torch.device, quick: bool) -> list[Case]:
    shape = model_shape(device)
    # GPU: every method at batch 8, and prefix tuning at the decode target's batch 32 (where a
    # step's attention reads 32 rows' caches and the shared prefix once).
    # CPU: P = 16 and 64, and (full run) prefix tuning from 1024-token prompts, where the torch
    # path attends to the prefix and the sequence separately (torch_path._merged).
    shapes = ([(8, 128, 64, 64, "bf16", METHODS), (32, 128, 64, 64, "bf16", ("prefix_tuning",))]
              if device.type == "cuda" else
              [(4, 64, 32, 16, "fp32", METHODS), (4, 64, 32, 64, "fp32", METHODS),
               (4, 1024, 32, 16, "fp32", ("prefix_tuning",))][:1 if quick else 3])
    static = (STATIC,) if device.type == "cuda" or not quick else ()
    return [Case("generate", "greedy", provider, dtype, B=B, Lq=prompt, Lk=prompt + new, P=P,
                 method=method, prepare=prepare_generate, **_heads(shape))
            for B, prompt, new, P, dtype, methods in shapes for method in methods
            for provider in PROVIDERS + (PEFT_ALGORITHM,)
            + (static if method == "prefix_tuning" else ())]


def build_base_model(device: torch.device, dtype: torch.dtype):
    """A frozen Llama-shaped model with random weights, SDPA attention (transformers' default)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging
    logging.set_verbosity_error()
    config = LlamaConfig(**model_shape(device))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return model


def wrap(base, provider: str, method: str, P: int):
    """The tuned model: ours through `pf.wrap`, or PEFT's (when installed)."""
    if provider == "ptuning_fast":
        import ptuning_fast as pf
        config_class = {"prefix_tuning": pf.PrefixTuningConfig, CHECKPOINTED: pf.PrefixTuningConfig,
                        "p_tuning": pf.PTuningConfig,
                        "prompt_tuning": pf.PromptTuningConfig}[method]
        return pf.wrap(base, config_class(num_virtual_tokens=P))
    try:
        import peft
    except ImportError as e:
        raise Unavailable(f"peft is not installed: {e}") from e
    # P-Tuning: both default to PEFT's MLP encoder with the model's hidden size.
    config_class = {"prefix_tuning": peft.PrefixTuningConfig,
                    CHECKPOINTED: peft.PrefixTuningConfig, "p_tuning": peft.PromptEncoderConfig,
                    "prompt_tuning": peft.PromptTuningConfig}[method]
    return peft.get_peft_model(base, config_class(task_type="CAUSAL_LM", num_virtual_tokens=P))


def _random_batches(case: Case, device, length: int, count: int = 3):
    vocab = model_shape(device)["vocab_size"]
    return [torch.randint(0, vocab, (case.B, length), device=device) for _ in range(count)]


def prepare_train_step(case: Case, device: torch.device, compile_model: bool = False) -> Prepared:
    """A training step of the case's provider and method; `compile_model` runs the tuned model
    through `torch.compile` (bench/cpu_compile_ab.py; the bench itself times eager models)."""
    model = wrap(build_base_model(device, torch_dtype(case.dtype)), case.provider, case.method,
                 case.P)
    model.train()
    if case.method == CHECKPOINTED:
        model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if compile_model:
        model = torch.compile(model)
    if not trainable:
        raise RuntimeError(f"{case.provider} left no trainable parameter")
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    batches = itertools.cycle(_random_batches(case, device, case.Lq))
    attention_mask = torch.ones(case.B, case.Lq, dtype=torch.long, device=device)

    def step():
        ids = next(batches)
        loss = model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    if case.method == CHECKPOINTED and case.provider == "peft":
        try:
            step()
        except RuntimeError as e:     # checked, not assumed: a fixed PEFT gets measured
            raise Unavailable("PEFT's prefix tuning fails under gradient checkpointing "
                              f"(transformers drops its prefix cache): {e}") from e
    return Prepared(step=step, tokens=case.B * case.Lq, whole_process_memory=True, heavy=True)


def prepare_generate(case: Case, device: torch.device) -> Prepared:
    base = build_base_model(device, torch_dtype(case.dtype))
    provider = "ptuning_fast" if case.provider in (PEFT_ALGORITHM, STATIC) else case.provider
    model = wrap(base, provider, case.method, case.P)
    model.eval()
    new_tokens = case.Lk - case.Lq
    prompts = itertools.cycle(_random_batches(case, device, case.Lq))
    attention_mask = torch.ones(case.B, case.Lq, dtype=torch.long, device=device)
    # min_new_tokens = max_new_tokens: every row produces exactly `new_tokens` (random weights
    # would otherwise stop at a random EOS).
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if case.provider == STATIC:
        kwargs.update(cache_implementation="static", compile_config=_compile_config(device))
    if case.provider == PEFT_ALGORITHM:
        # Our wrapper only supplies the trained prompt/prefix; the timed call is base.generate.
        generate = functools.partial(peft_algorithm_generate, model, **kwargs)
    else:
        generate = functools.partial(model.generate, **kwargs)

    def step():
        with torch.no_grad():
            return generate(input_ids=next(prompts), attention_mask=attention_mask)
    return Prepared(step=step, tokens=case.B * new_tokens, whole_process_memory=True, heavy=True)


def _compile_config(device: torch.device):
    """transformers' compiled decoding as it runs on CUDA by default (inductor, CUDA graphs
    where there are CUDA tensors), here asked for on any device."""
    from transformers import CompileConfig
    config = CompileConfig()
    config._compile_all_devices = device.type != "cuda"
    return config


def _cache_kwarg(model) -> str:
    """`cache` from transformers 5.24 on (`past_key_values` is deprecated there), else
    `past_key_values`."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def peft_algorithm_generate(wrapped, input_ids, attention_mask, **kwargs):
    """PEFT's generation algorithm on `wrapped`'s unwrapped base model, with its trained
    prompt/prefix (see the module doc); returns the prompt ids and the new ids, as generate().
    The base model runs with its own attention implementation (SDPA), as under PEFT: wrapping
    may have switched it to ptuning_fast's, which `disable_adapter()` undoes meanwhile."""
    with wrapped.disable_adapter():
        return _peft_algorithm_generate(wrapped, input_ids, attention_mask, **kwargs)


def _peft_algorithm_generate(wrapped, input_ids, attention_mask, **kwargs):
    from transformers import DynamicCache
    base, P = wrapped.base_model, wrapped.num_virtual_tokens
    batch = input_ids.shape[0]
    mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], 1)
    dtype = base.get_input_embeddings().weight.dtype
    if wrapped.is_prefix:
        # PEFT runs its prefix encoder once per row and caches those per-row copies.
        prefixes = wrapped.prompt_encoder().to(dtype)
        cache = DynamicCache(config=base.config)
        for layer in range(prefixes.num_layers):
            k, v = prefixes.layer(layer)
            cache.update(k.unsqueeze(0).repeat(batch, 1, 1, 1),
                         v.unsqueeze(0).repeat(batch, 1, 1, 1), layer)
        # P placeholder ids stand for the cached prefix (generate() feeds only uncached ids);
        # with an all-ones mask the real ids get positions P, P + 1, ... as under PEFT.
        ids = torch.cat([input_ids.new_zeros(batch, P), input_ids], 1)
        out = base.generate(input_ids=ids, attention_mask=mask, **kwargs,
                            **{_cache_kwarg(base): cache})
        return torch.cat([input_ids, out[:, P + input_ids.shape[1]:]], 1)
    prompt = wrapped.prompt_encoder().to(dtype)
    embeds = torch.cat([prompt.unsqueeze(0).repeat(batch, 1, 1),
                        base.get_input_embeddings()(input_ids)], 1)
    out = base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    return torch.cat([input_ids, out], 1)           # generate() from embeddings: new ids only
