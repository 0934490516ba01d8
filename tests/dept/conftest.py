"""Helpers of the core tests: the formula written out by hand, and train-free adapters saved the real way."""

from __future__ import annotations

import copy
import math

import torch

from tests.conftest import ADAPTER_SIZES, attach, base_forward

# The adapter of each row of a 5-row mixed batch: every size of ADAPTER_SIZES, one of them twice.
ROW_ADAPTERS = ["long_prompt", "short_prompt", "prompt_tuning", "update_only", "short_prompt"]


def paper_scaling(config) -> float:
    """The paper's (and the official code's) scale of A @ B, written out: lora_alpha / sqrt(r)."""
    return config.lora_alpha / math.sqrt(config.r)


def hand_computed_logits(kind, dept_model, input_ids):
    """E' = E + lora_alpha / sqrt(r) * (A @ B)[:s]; X = [P ; E'] — written out for one unpadded example."""
    encoder = dept_model.prompt_encoder
    s = input_ids.shape[1]
    E = dept_model.base_model.get_input_embeddings().weight[input_ids[0]]
    update = paper_scaling(dept_model.config) * (encoder.lora_embedding_A @ encoder.lora_embedding_B)[:s]
    X = torch.cat([encoder.prompt_embeddings, E + update])[None]
    m = dept_model.config.num_virtual_tokens
    mask = torch.ones(1, m + s, dtype=torch.long)
    positions = torch.arange(m + s)[None]
    return base_forward(kind, dept_model.base_model, X, mask, positions)


def save_adapters(kind, model, tokenizer, directory):
    """Train-free stand-ins for trained adapters of each of ADAPTER_SIZES: distinct P, A, B (and heads), saved the
    real way."""
    paths = {}
    for seed, (name, sizes) in enumerate(ADAPTER_SIZES.items()):
        dept_model = attach(kind, copy.deepcopy(model), tokenizer, prompt_init="vocab", init_seed=seed, **sizes)
        if kind == "bert":  # each task has its own head
            with torch.no_grad():
                dept_model.base_model.classifier.weight.normal_(generator=torch.Generator().manual_seed(seed))
        paths[name] = dept_model.save_pretrained(directory / name)
    return paths


def tokenize(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    try:
        return tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
