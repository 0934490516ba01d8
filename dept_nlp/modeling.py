"""Which model family a checkpoint belongs to, and how to load it for a text task.

The family comes from the checkpoint's config class, never from a substring of its name:

- `seq2seq`: encoder-decoders (T5, BART): text-to-text.
- `causal`: decoder-only LMs (LLaMA, GPT-2): source then target, loss on the target, generation to predict.
- `cls`: encoders with a masked-LM head (BERT, RoBERTa): a classification or regression head.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

FAMILIES = ("seq2seq", "causal", "cls")


def detect_family(config) -> str:
    """The family of a model config: encoder-decoder, decoder-only (causal LM without a masked-LM head), or
    encoder classifier."""
    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal"
    if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "cls"
    raise ValueError(
        f"Model type {model_type!r} is neither an encoder-decoder, a decoder-only LM nor an encoder classifier; "
        "DePT's text pipeline supports those three families."
    )


def load_tokenizer(model_name_or_path: str, family: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # LLaMA and GPT-2 ship without one; pads are masked, so eos serves
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(model_name_or_path: str, family: str | None = None, *, num_labels: int = 2,
               trust_remote_code: bool = False):
    """Load the base model of a family (detected from its config when `family` is None)."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    family = family or detect_family(config)
    if family == "seq2seq":
        return AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if family == "causal":
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if family == "cls":
        problem = "regression" if num_labels == 1 else "single_label_classification"
        return AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, num_labels=num_labels, problem_type=problem, trust_remote_code=trust_remote_code
        )
    raise ValueError(f"Unknown model family {family!r}: choose one of {FAMILIES}.")
