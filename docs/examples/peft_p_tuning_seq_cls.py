"""P-Tuning of a sequence classifier, in the shape of PEFT's example
examples/sequence_classification/P_Tuning.ipynb (huggingface/peft): a prompt encoder (MLP) in
front of RoBERTa decides whether two sentences say the same (GLUE MRPC).

Only the import line differs from the PEFT version: put `peft` in place of `ptuning_fast` and
the script runs on PEFT (tests/test_peft_examples.py runs both and compares the loss curves).
The Hub model and GLUE are replaced by a tiny model and made-up pairs (`offline.py`), so it
runs in seconds on a CPU; accuracy is counted by hand where the notebook uses `evaluate`.
"""
import tempfile

import torch
from datasets import Dataset, DatasetDict
from torch.optim import AdamW
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                          get_linear_schedule_with_warmup)

from ptuning_fast import PeftModel, PromptEncoderConfig, get_peft_model

import offline

batch_size = 8
model_name_or_path = offline.model_folder("seq_cls")      # the notebook: roberta-large
device = "cuda" if torch.cuda.is_available() else "cpu"
num_epochs = 2
peft_config = PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=20,
                                  encoder_hidden_size=128)
lr = 1e-3

tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, padding_side="right")
if getattr(tokenizer, "pad_token_id") is None:
    tokenizer.pad_token_id = tokenizer.eos_token_id

datasets = DatasetDict({"train": Dataset.from_dict(offline.sentence_pairs(16, seed=0)),
                        "validation": Dataset.from_dict(offline.sentence_pairs(8, seed=1))})


def tokenize_function(examples):
    return tokenizer(examples["sentence1"], examples["sentence2"], truncation=True,
                     max_length=None)


tokenized_datasets = datasets.map(tokenize_function, batched=True,
                                  remove_columns=["sentence1", "sentence2"])
tokenized_datasets = tokenized_datasets.rename_column("label", "labels")


def collate_fn(examples):
    return tokenizer.pad(examples, padding="longest", return_tensors="pt")


train_dataloader = DataLoader(tokenized_datasets["train"], shuffle=True, collate_fn=collate_fn,
                              batch_size=batch_size)
eval_dataloader = DataLoader(tokenized_datasets["validation"], shuffle=False,
                             collate_fn=collate_fn, batch_size=batch_size)

model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, return_dict=True)
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()

optimizer = AdamW(params=model.parameters(), lr=lr)
lr_scheduler = get_linear_schedule_with_warmup(
    optimizer=optimizer, num_warmup_steps=0,
    num_training_steps=(len(train_dataloader) * num_epochs))


def accuracy(model, dataloader):
    correct = total = 0
    for batch in dataloader:
        batch.to(device)
        with torch.no_grad():
            predictions = model(**batch).logits.argmax(dim=-1)
        correct += (predictions == batch["labels"]).sum().item()
        total += len(predictions)
    return correct / total


model.to(device)
train_losses = []          # every step's loss: the curve the test compares
for epoch in range(num_epochs):
    model.train()
    for step, batch in enumerate(tqdm(train_dataloader)):
        batch.to(device)
        outputs = model(**batch)
        loss = outputs.loss
        train_losses.append(loss.item())
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    model.eval()
    print(f"epoch {epoch}:", {"accuracy": accuracy(model, eval_dataloader)})

# -- save, load back, evaluate again -----------------------------------------------------------
peft_model_id = tempfile.mkdtemp(prefix="p-tuning-seq-cls-")
model.save_pretrained(peft_model_id)

inference_model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path)
inference_model = PeftModel.from_pretrained(inference_model, peft_model_id)
inference_model.to(device)
inference_model.eval()
reloaded_accuracy = accuracy(inference_model, eval_dataloader)
print({"accuracy": reloaded_accuracy})
