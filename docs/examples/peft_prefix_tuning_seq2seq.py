"""Prefix tuning of an encoder-decoder, in the shape of PEFT's example
examples/conditional_generation/peft_prefix_tuning_seq2seq.ipynb (huggingface/peft): T5 learns
to answer a financial news line with its sentiment ("Bearish", "Bullish", "Neutral").

Only the import line differs from the PEFT version: put `peft` in place of `ptuning_fast` and
the script runs on PEFT (tests/test_peft_examples.py runs both and compares the loss curves).
The Hub model and dataset are replaced by a tiny model and made-up rows (`offline.py`), so it
runs in seconds on a CPU.
"""
import os
import tempfile

import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, default_data_collator,
                          get_linear_schedule_with_warmup)

from ptuning_fast import PeftModel, PrefixTuningConfig, TaskType, get_peft_model

import offline

os.environ["TOKENIZERS_PARALLELISM"] = "false"
device = "cuda" if torch.cuda.is_available() else "cpu"
model_name_or_path = offline.model_folder("seq2seq")      # the notebook: t5-large
text_column = "text"
label_column = "text_label"
max_length = 16
lr = 1e-2
num_epochs = 2
batch_size = 8

peft_config = PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False,
                                 num_virtual_tokens=20)
model = AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path)
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()

classes = ["Bearish", "Bullish", "Neutral"]
dataset = DatasetDict({"train": Dataset.from_dict(offline.financial_news(16, seed=0)),
                       "validation": Dataset.from_dict(offline.financial_news(8, seed=1))})
dataset = dataset.map(lambda x: {"text_label": [classes[label] for label in x["label"]]},
                      batched=True)

tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)


def preprocess_function(examples):
    model_inputs = tokenizer(examples[text_column], max_length=max_length, padding="max_length",
                             truncation=True, return_tensors="pt")
    labels = tokenizer(examples[label_column], max_length=2, padding="max_length",
                       truncation=True, return_tensors="pt")["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    model_inputs["labels"] = labels
    return model_inputs


processed_datasets = dataset.map(preprocess_function, batched=True,
                                 remove_columns=dataset["train"].column_names)
train_dataloader = DataLoader(processed_datasets["train"], shuffle=True,
                              collate_fn=default_data_collator, batch_size=batch_size)
eval_dataloader = DataLoader(processed_datasets["validation"], collate_fn=default_data_collator,
                             batch_size=batch_size)

optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
lr_scheduler = get_linear_schedule_with_warmup(
    optimizer=optimizer, num_warmup_steps=0,
    num_training_steps=(len(train_dataloader) * num_epochs))


def evaluate(model):
    """(mean loss, predicted label strings) over the validation set."""
    eval_loss, eval_preds = 0, []
    for batch in tqdm(eval_dataloader):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            outputs = model(**batch)
        eval_loss += outputs.loss.detach().float()
        eval_preds.extend(tokenizer.batch_decode(
            torch.argmax(outputs.logits, -1).detach().cpu().numpy(), skip_special_tokens=True))
    return eval_loss / len(eval_dataloader), eval_preds


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
    eval_epoch_loss, eval_preds = evaluate(model)
    train_epoch_loss = total_loss / len(train_dataloader)
    print(f"{epoch=}: {train_epoch_loss=} {eval_epoch_loss=}")

correct = sum(pred.strip() == true.strip()
              for pred, true in zip(eval_preds, dataset["validation"]["text_label"]))
print(f"accuracy={100 * correct / len(eval_preds)} % on the evaluation dataset")

# -- save, load back, evaluate again -----------------------------------------------------------
peft_model_id = tempfile.mkdtemp(prefix="prefix-tuning-seq2seq-")
model.save_pretrained(peft_model_id)

model = AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path)
model = PeftModel.from_pretrained(model, peft_model_id)
model.to(device)
model.eval()
reloaded_eval_loss, _ = evaluate(model)
print(f"{reloaded_eval_loss=}")
