"""DePT: Decomposed Prompt Tuning (ICLR 2024).

    >>> from transformers import T5Config, T5ForConditionalGeneration
    >>> from dept import DePTConfig, get_dept_model
    >>> hf_model = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2,
    ...                                                d_kv=16))  # or T5ForConditionalGeneration.from_pretrained("t5-base")
    >>> config = DePTConfig(num_virtual_tokens=60, r=30, max_length=256, prompt_init="vocab")
    >>> model = get_dept_model(hf_model, config)
    >>> model.num_trainable_parameters()   # m*d = 60*32 for P, s_max*r + r*d = 256*30 + 30*32 for A and B
    {'prompt': 1920, 'lora_embedding': 8640, 'dept': 10560, 'total': 10560}
"""

from .adapter_files import UnsafeCheckpointError, load_adapter, save_adapter
from .bank import AdapterBank
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
    "AdapterBank",
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

# Imported on first use, so that `import dept` loads neither transformers' Trainer nor TRL.
_LAZY = {
    "DePTTrainer": "dept.hf_trainer",
    "DePTSeq2SeqTrainer": "dept.hf_trainer",
    "DePTSFTTrainer": "dept.trl_trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dept' has no attribute {name!r}")
