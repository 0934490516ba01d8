"""Shared tiny-model fixtures. Every test builds models from these, never its own config by hand.

The builders come from `scripts/tiny_models.py`, which the demos use too; test modules import them from here.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertForSequenceClassification,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    T5ForConditionalGeneration,
)

from scripts.tiny_models import (  # noqa: E402
    build_word_tokenizer,
    save_tiny_model,
    tiny_bert_config,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_t5_config,
)

__all__ = ["build_word_tokenizer", "save_tiny_model", "tiny_bert_config", "tiny_gpt2_config", "tiny_llama_config",
           "tiny_t5_config"]  # the tiny-model builders, for the test modules

torch.set_num_threads(1)  # the suite runs two workers on two cores

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"
OFFICIAL_CHECKPOINTS = SHARED_REFERENCE / "dept-official-checkpoints"
T5_TOKENIZER_DIR = SHARED_REFERENCE / "t5-tokenizer"

CORPUS = [
    "Classify this text is postive or not:",
    "the movie was great and the actors were wonderful",
    "a dull and boring film with terrible acting",
    "question: what color is the sky? context: the sky is blue today",
    "sentence1: a man is playing a guitar . sentence2: a person plays music",
    "true false yes no 0 1 2 3 4 5 red green blue circle square triangle",
]


@pytest.fixture(scope="session")
def tokenizer():
    return build_word_tokenizer(CORPUS)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def _seeded(build):
    torch.manual_seed(0)
    model = build()
    model.eval()
    return model


@pytest.fixture
def t5_model(tokenizer):
    return _seeded(lambda: T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))))


@pytest.fixture
def llama_model(tokenizer):
    return _seeded(lambda: LlamaForCausalLM(tiny_llama_config(len(tokenizer))))


@pytest.fixture
def gpt2_model(tokenizer):
    return _seeded(lambda: GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer))))


@pytest.fixture(params=["llama", "gpt2"])
def causal_model(request, tokenizer):
    """A decoder-only tiny model for each position scheme: RoPE (LLaMA) and learned absolute positions (GPT-2)."""
    return request.getfixturevalue(f"{request.param}_model")


@pytest.fixture
def bert_model(tokenizer):
    return _seeded(lambda: BertForSequenceClassification(tiny_bert_config(len(tokenizer))))


@pytest.fixture(params=["t5", "llama", "bert"])
def any_model(request, tokenizer):
    """(model kind, freshly built tiny model) for each of the three task types."""
    builders = {
        "t5": lambda: T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))),
        "llama": lambda: LlamaForCausalLM(tiny_llama_config(len(tokenizer))),
        "bert": lambda: BertForSequenceClassification(tiny_bert_config(len(tokenizer))),
    }
    return request.param, _seeded(builders[request.param])


TASK_TYPES = {"t5": "seq2seq", "llama": "causal", "bert": "cls"}


@pytest.fixture
def t5_base_dims_model():
    """A T5 with t5-base's d and vocabulary (random weights, one thin layer): what official adapters need."""
    config = tiny_t5_config(32128, d_model=768, d_kv=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)
    return _seeded(lambda: T5ForConditionalGeneration(config))


def free_port() -> int:
    """A free TCP port for a multi-process launch, so concurrent test workers never share a rendezvous port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
