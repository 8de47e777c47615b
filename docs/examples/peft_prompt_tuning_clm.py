"""Prompt tuning of a causal LM, in the shape of PEFT's example
examples/causal_language_modeling/peft_prompt_tuning_clm.ipynb (huggingface/peft): a prompt
initialised from text classifies tweets as complaints by generating the label.

Only the import line differs from the PEFT version: put `peft` in place of `ptuning_fast` and
the script runs on PEFT (tests/test_peft_examples.py runs both and compares the loss curves).
The Hub model and the RAFT dataset are replaced by a tiny model and made-up rows
(`offline.py`), so it runs in seconds on a CPU.
"""
import tempfile

import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, default_data_collator,
                          get_linear_schedule_with_warmup)

from ptuning_fast import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

import offline

device = "cuda" if torch.cuda.is_available() else "cpu"
model_name_or_path = offline.model_folder("causal_lm")     # the notebook: bigscience/bloomz-560m
peft_config = PromptTuningConfig(
    task_type=TaskType.CAUSAL_LM,
    prompt_tuning_init=PromptTuningInit.TEXT,
    num_virtual_tokens=8,
    prompt_tuning_init_text="Classify if the tweet is a complaint or not:",
    tokenizer_name_or_path=model_name_or_path,
)
text_column = "Tweet text"
label_column = "text_label"
max_length = 24
lr = 3e-2
num_epochs = 2
batch_size = 8

# -- the data: tweets with a text label the model learns to generate ----------------------------
classes = ["no complaint", "complaint"]
dataset = DatasetDict({"train": Dataset.from_dict(offline.complaints(16, seed=0)),
                       "test": Dataset.from_dict(offline.complaints(8, seed=1))})
dataset = dataset.map(lambda x: {"text_label": [classes[label] for label in x["Label"]]},
                      batched=True)

tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
if tokenizer.pad_token_id is None:
    tokenizer.pad_token_id = tokenizer.eos_token_id


def preprocess_function(examples):
    """Input "Tweet text : <tweet> Label : " then the label and EOS, left-padded to
    max_length; the loss only on the label (-100 elsewhere)."""
    inputs = [f"{text_column} : {x} Label : " for x in examples[text_column]]
    targets = [str(x) for x in examples[label_column]]
    model_inputs = tokenizer(inputs)
    labels = tokenizer(targets, add_special_tokens=False)
    for i in range(len(inputs)):
        sample_ids = model_inputs["input_ids"][i]
        label_ids = labels["input_ids"][i] + [tokenizer.eos_token_id]
        ids = (sample_ids + label_ids)[:max_length]
        pad = max_length - len(ids)
        model_inputs["input_ids"][i] = [tokenizer.pad_token_id] * pad + ids
        model_inputs["attention_mask"][i] = [0] * pad + [1] * len(ids)
        labels["input_ids"][i] = ([-100] * (pad + len(sample_ids)) + label_ids)[:max_length]
    model_inputs["labels"] = labels["input_ids"]
    return model_inputs


processed = dataset.map(preprocess_function, batched=True,
                        remove_columns=dataset["train"].column_names)
processed.set_format("torch")
train_dataloader = DataLoader(processed["train"], shuffle=True,
                              collate_fn=default_data_collator, batch_size=batch_size)
eval_dataloader = DataLoader(processed["test"], collate_fn=default_data_collator,
                             batch_size=batch_size)

# -- the model ---------------------------------------------------------------------------------
model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()

optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
lr_scheduler = get_linear_schedule_with_warmup(
    optimizer=optimizer, num_warmup_steps=0,
    num_training_steps=(len(train_dataloader) * num_epochs))

# -- training and evaluation -------------------------------------------------------------------
model = model.to(device)
train_losses = []          # every step's loss: the curve the test compares
for epoch in range(num_epochs):
    model.train()
    total_loss = 0
    for step, batch in enumerate(tqdm(train_dataloader)):
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = model(**batch)
        loss = outputs.loss
        total_loss += loss.detach().float()
        train_losses.append(loss.item())
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    model.eval()
    eval_loss = 0
    for step, batch in enumerate(tqdm(eval_dataloader)):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            outputs = model(**batch)
        eval_loss += outputs.loss.detach().float()
    eval_epoch_loss = eval_loss / len(eval_dataloader)
    train_epoch_loss = total_loss / len(train_dataloader)
    print(f"{epoch=}: {train_epoch_loss=} {eval_epoch_loss=}")

# -- generate a label --------------------------------------------------------------------------
inputs = tokenizer(f'{text_column} : {dataset["test"][0][text_column]} Label : ',
                   return_tensors="pt")
with torch.no_grad():
    inputs = {k: v.to(device) for k, v in inputs.items()}
    generated = model.generate(input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"], max_new_tokens=4,
                               eos_token_id=tokenizer.eos_token_id, do_sample=False)
    print(tokenizer.batch_decode(generated.detach().cpu().numpy(), skip_special_tokens=True))

# -- save, load back, evaluate again -----------------------------------------------------------
peft_model_id = tempfile.mkdtemp(prefix="prompt-tuning-clm-")
model.save_pretrained(peft_model_id)

model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
model = PeftModel.from_pretrained(model, peft_model_id)
model.to(device)
model.eval()
with torch.no_grad():
    reloaded_eval_loss = sum(model(**{k: v.to(device) for k, v in batch.items()}).loss.item()
                             for batch in eval_dataloader) / len(eval_dataloader)
print(f"{reloaded_eval_loss=}")
