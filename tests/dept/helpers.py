"""Small helpers shared by the core tests."""

from __future__ import annotations

import torch

from dept import DePTConfig, get_dept_model

TASK_TYPES = {"t5": "seq2seq", "llama": "causal", "gpt2": "causal", "bert": "cls"}


def attach(kind: str, model, tokenizer, **overrides):
    """Attach DePT with small sizes and a non-zero B, so A @ B really changes the embeddings."""
    options = dict(num_virtual_tokens=5, r=3, max_length=24, prompt_init="text", task_type=TASK_TYPES[kind])
    options.update(overrides)
    dept_model = get_dept_model(model, DePTConfig(**options), tokenizer=tokenizer)
    with torch.no_grad():
        dept_model.prompt_encoder.lora_embedding_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return dept_model


def base_forward(kind: str, base, inputs_embeds, attention_mask, position_ids=None):
    """Run the frozen base on given embeddings, with the extra inputs each kind needs for logits."""
    if kind == "t5":
        decoder_input_ids = torch.zeros(inputs_embeds.shape[0], 3, dtype=torch.long)
        return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    decoder_input_ids=decoder_input_ids).logits
    return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids).logits


def dept_forward(kind: str, dept_model, batch):
    if kind == "t5":
        decoder_input_ids = torch.zeros(batch["input_ids"].shape[0], 3, dtype=torch.long)
        return dept_model(**batch, decoder_input_ids=decoder_input_ids).logits
    return dept_model(**batch).logits
