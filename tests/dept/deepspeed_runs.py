"""The two small runs of the DeepSpeed tests, built the same way in the test process and under DeepSpeed:
the toy model, and a tiny DePT T5 (whose P, A and B live in a submodule, as ZeRO-3 needs)."""

from __future__ import annotations

import torch
from transformers import T5ForConditionalGeneration

from dept import DePTConfig, get_dept_model
from dept.trainer import Trainer
from tests.conftest import build_word_tokenizer, tiny_t5_config
from tests.dept._toy import ToyAdapterModel, toy_trainer

TEXTS = ["the movie was great", "a dull and boring film", "the actors were wonderful", "terrible acting"]


def tiny_dept_t5(seed: int = 0):
    tokenizer = build_word_tokenizer(TEXTS + ["0 1"])
    torch.manual_seed(seed)
    base = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer)))
    config = DePTConfig(num_virtual_tokens=4, r=2, max_length=16, prompt_init="text", prompt_init_text=TEXTS[0])
    return get_dept_model(base, config, tokenizer=tokenizer), tokenizer


def build_run(kind: str, args, accelerator=None) -> Trainer:
    if kind == "toy":
        return toy_trainer(args, ToyAdapterModel(), accelerator=accelerator)
    model, tokenizer = tiny_dept_t5()
    examples = [{"text": text, "target": str(i % 2)} for i, text in enumerate(TEXTS * 4)]

    def collate(batch):
        inputs = tokenizer([ex["text"] for ex in batch], padding=True, return_tensors="pt")
        labels = tokenizer([ex["target"] for ex in batch], padding=True, return_tensors="pt").input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        return {**inputs, "labels": labels}

    return Trainer(model, args, collate_fn=collate, train_dataset=examples, eval_dataset=examples[:5],
                   accelerator=accelerator)  # fmt: skip
