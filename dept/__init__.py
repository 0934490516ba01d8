"""DePT: Decomposed Prompt Tuning (ICLR 2024).

    >>> from dept import DePTConfig, get_dept_model
    >>> model = get_dept_model(hf_model, DePTConfig(num_virtual_tokens=60, r=30, max_length=256), tokenizer)
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
