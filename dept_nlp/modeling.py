"""Load the base model and tokenizer of a text task, for each `task_type` (`dept.config.infer_task_type` tells it
from the checkpoint's config, never from a substring of its name):

- `seq2seq`: encoder-decoders (T5, BART): text-to-text.
- `causal`: decoder-only LMs (LLaMA, GPT-2): source then target, loss on the target, generation to predict.
- `cls`: encoders with a masked-LM head (BERT, RoBERTa): a classification or regression head.
"""

from __future__ import annotations

import transformers  # its Auto classes are imported on first use: they load the names of every model

from dept.config import TASK_TYPES, ConfigError, infer_task_type
from dept.errors import refusing_remote_code

REMOTE_CODE_HINT = ("pass --trust_remote_code (dept-train) to run it, only if you trust that code; dept-eval and "
                    "dept-serve never run a model's own code.")


def recorded_task_type(training_task: dict | None) -> str | None:
    """The task type an adapter's `training_task.json` records (files from before the word was `task_type` call
    it `model_family`), or None."""
    training_task = training_task or {}
    return training_task.get("task_type") or training_task.get("model_family")


def load_config(model_name_or_path: str, *, trust_remote_code: bool = False):
    """The base model's config (no weights are read); a model with its own code is refused unless trusted."""
    with refusing_remote_code(model_name_or_path, REMOTE_CODE_HINT):
        return transformers.AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)


def resolve_task_type(model_name_or_path: str, task_type: str | None = None, training_task: dict | None = None,
                      trust_remote_code: bool = False) -> str:
    """`task_type` when given (the flag), else the one the adapter was trained with, else detected from the base
    model's config."""
    task_type = task_type or recorded_task_type(training_task)
    if task_type:
        return task_type
    return infer_task_type(load_config(model_name_or_path, trust_remote_code=trust_remote_code))


def load_tokenizer(model_name_or_path: str, *, trust_remote_code: bool = False):
    """The tokenizer, right-padded, with eos as its pad token when it has none (the same for every task type)."""
    with refusing_remote_code(model_name_or_path, REMOTE_CODE_HINT):
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # LLaMA and GPT-2 ship without one; pads are masked, so eos serves
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(model_name_or_path: str, task_type: str | None = None, *, num_labels: int = 2,
               trust_remote_code: bool = False):
    """Load the base model of a task type (detected from its config when `task_type` is None)."""
    with refusing_remote_code(model_name_or_path, REMOTE_CODE_HINT):
        return _load_model(model_name_or_path, task_type, num_labels, trust_remote_code)


def _load_model(model_name_or_path: str, task_type: str | None, num_labels: int, trust_remote_code: bool = False):
    config = transformers.AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    task_type = task_type or infer_task_type(config)
    if task_type == "seq2seq":
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if task_type == "causal":
        return transformers.AutoModelForCausalLM.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if task_type == "cls":
        problem = "regression" if num_labels == 1 else "single_label_classification"
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, num_labels=num_labels, problem_type=problem, trust_remote_code=trust_remote_code
        )
    raise ConfigError(f"Unknown task_type {task_type!r}: choose one of {TASK_TYPES}.")
