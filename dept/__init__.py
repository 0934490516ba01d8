"""DePT: Decomposed Prompt Tuning (ICLR 2024).

    >>> from transformers import T5ForConditionalGeneration
    >>> from dept import DePTConfig, get_dept_model
    >>> from dept.testing import build_word_tokenizer, tiny_t5_config   # any HF model and tokenizer will do
    >>> tokenizer = build_word_tokenizer(["Classify this text is postive or not:"])
    >>> hf_model = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), d_model=32))
    >>> model = get_dept_model(hf_model, DePTConfig(num_virtual_tokens=60, r=30, max_length=256), tokenizer)
    >>> model.num_trainable_parameters()   # m*d = 60*32 for P, s_max*r + r*d = 256*30 + 30*32 for A and B
    {'prompt': 1920, 'lora_embedding': 8640, 'dept': 10560, 'total': 10560}
"""

from .checkpoint import UnsafeCheckpointError, load_adapter, save_adapter
from .config import ConfigError, DePTConfig
from .embedding import DePTEmbedding, InputTooLongError
from .model import (
    AdapterMismatchError,
    DePTModel,
    DePTModelForCausalLM,
    DePTModelForSeq2SeqLM,
    DePTModelForSequenceClassification,
    get_dept_model,
    infer_task_type,
)
from .multi_adapter import MultiAdapterModel

__all__ = [
    "AdapterMismatchError",
    "ConfigError",
    "DePTConfig",
    "DePTEmbedding",
    "DePTModel",
    "DePTModelForCausalLM",
    "DePTModelForSeq2SeqLM",
    "DePTModelForSequenceClassification",
    "InputTooLongError",
    "MultiAdapterModel",
    "UnsafeCheckpointError",
    "get_dept_model",
    "infer_task_type",
    "load_adapter",
    "save_adapter",
]
