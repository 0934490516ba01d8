"""The DePT configuration: one dataclass, a JSON round trip, and validation at construction; the detector of a
model's `task_type`; and the reader of an adapter's `training_task.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

CONFIG_NAME = "adapter_config.json"
TRAINING_TASK_NAME = "training_task.json"  # what an adapter was trained on: written by the training CLIs
TASK_TYPES = ("seq2seq", "causal", "cls")
PROMPT_INITS = ("text", "vocab", "random")
OFFICIAL_INIT_TEXT = "Classify this text is postive or not:"  # sic: the official default, typo included


class ConfigError(UserError, ValueError):
    """An adapter config that cannot describe a valid DePT adapter, or settings that cannot run together."""


def infer_task_type(model_or_config) -> str:
    """The `task_type` of a Hugging Face model, or of its config before any weights load (never from its name).

    A model says it by its head class: encoder-decoder -> "seq2seq", `...ForSequenceClassification` -> "cls",
    `...ForCausalLM` / `...LMHeadModel` -> "causal". A config (no head yet) by its architecture: encoder-decoder,
    decoder-only (a causal LM without a masked-LM head, so BERT is not one), or an encoder classifier.
    """
    is_model = hasattr(model_or_config, "config")
    config = model_or_config.config if is_model else model_or_config
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if is_model:
        name = type(model_or_config).__name__
        if name.endswith("ForSequenceClassification"):
            return "cls"
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
    else:
        name = f"model type {getattr(config, 'model_type', type(config).__name__)!r}"
        # here, not at the top: the mappings import every model's name (a tenth of `import torch`)
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        )

        model_type = getattr(config, "model_type", None)
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return "causal"
        if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            return "cls"
    raise ConfigError(
        f"Cannot tell how to put a prompt into {name}: DePT supports encoder-decoders (e.g. "
        "T5ForConditionalGeneration), decoder-only LMs (…ForCausalLM) and encoder classifiers "
        "(…ForSequenceClassification)."
    )


@dataclass
class DePTConfig:
    """Configuration of a DePT adapter.

    DePT replaces a length-`l` soft prompt by a shorter prompt P (m x d) plus a position-wise low-rank
    update A @ B (A: s x r, B: r x d) of the frozen input embeddings, scaled by `lora_alpha / sqrt(r)`.

    Args:
        num_virtual_tokens: m, the number of prompt vectors put in front of the input.
        r: rank of the embedding update. `r=0` is vanilla prompt tuning.
        max_length: s, the longest input (in real tokens) the update covers; the tokenizer truncates here.
        lora_alpha: scale numerator; the update is multiplied by `lora_alpha / sqrt(r)`.
        prompt_init: "text" (embeddings of `prompt_init_text`, tiled or cut to m), "vocab" (embeddings of
            random vocabulary tokens) or "random" (normal noise at the embedding table's scale).
        prompt_init_text: the text for `prompt_init="text"`.
        task_type: "seq2seq" (T5-style encoder-decoder), "causal" (decoder-only) or "cls" (encoder classifier).
        base_model_name_or_path: the base model the adapter was trained on, for reloading.
        token_dim: d, the base model's embedding width; set when attached, checked when loaded.
        vocab_size: the base model's vocabulary size; set when attached, checked when loaded.
        base_model_type: the base model's `config.model_type`; set when attached, checked when loaded.
        init_seed: seed of the random initialisation of P, A and B.
    """

    num_virtual_tokens: int = field(
        default=60, metadata={"help": "m: the number of prompt vectors (P is m x d); 0 trains A @ B alone."}
    )
    r: int = field(
        default=30, metadata={"help": "Rank of the position-wise embedding update A @ B; 0 is vanilla prompt tuning."}
    )
    max_length: int = field(
        default=256,
        metadata={"help": "s: the longest input in real tokens; longer inputs are truncated here, and A has s rows."},
    )
    lora_alpha: float = field(default=8.0, metadata={"help": "A @ B is scaled by lora_alpha / sqrt(r) (official: 8)."})
    prompt_init: str = field(
        default="text",
        metadata={"help": "How P starts: 'text' (the embeddings of prompt_init_text, tiled or cut to m), 'vocab' "
                          "(embeddings of random vocabulary tokens) or 'random' (noise; on a ViT, VPT's uniform "
                          "initialisation).", "choices": list(PROMPT_INITS)},
    )
    prompt_init_text: str = field(
        default=OFFICIAL_INIT_TEXT, metadata={"help": "The text whose embeddings P starts from with prompt_init text."}
    )
    task_type: str = field(
        default="seq2seq",
        metadata={"help": "Where the prompt goes: 'seq2seq' (encoder-decoder), 'causal' (decoder-only) or 'cls' "
                          "(encoder classifier).", "choices": list(TASK_TYPES)},
    )
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model of the adapter."})
    token_dim: int | None = field(default=None, metadata={"help": "d of the base model (set on attach)."})
    vocab_size: int | None = field(default=None, metadata={"help": "Vocabulary size of the base model."})
    base_model_type: str | None = field(default=None, metadata={"help": "config.model_type of the base model."})
    init_seed: int = field(default=0, metadata={"help": "Seed for initialising P, A and B."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("num_virtual_tokens", "r", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"DePTConfig.{name} must be an integer, got {value!r}.")
        if self.num_virtual_tokens < 0 or self.r < 0:
            raise ConfigError(
                f"num_virtual_tokens and r must be >= 0, got num_virtual_tokens={self.num_virtual_tokens}, r={self.r}."
            )
        if self.max_length <= 0:
            raise ConfigError(f"max_length must be positive, got {self.max_length}.")
        if self.num_virtual_tokens == 0 and self.r == 0:
            raise ConfigError("num_virtual_tokens=0 with r=0 trains nothing: set one of them above 0.")
        if self.r > self.max_length:
            raise ConfigError(
                f"r={self.r} is larger than max_length={self.max_length}: A (max_length x r) would be rank-deficient."
            )
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be a positive finite number, got {self.lora_alpha!r}.")
        if self.prompt_init not in PROMPT_INITS:
            raise ConfigError(f"prompt_init must be one of {PROMPT_INITS}, got {self.prompt_init!r}.")
        if self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}.")
        if self.token_dim is not None and self.token_dim <= 0:
            raise ConfigError(f"token_dim must be positive, got {self.token_dim}.")

    @classmethod
    def field_help(cls, name: str) -> str:
        """The help text of a field: the one source of the help of every command-line flag that sets it."""
        return cls.__dataclass_fields__[name].metadata["help"]

    @property
    def scaling(self) -> float:
        """lora_alpha / sqrt(r), the official DePT scale of A @ B (0 when r = 0)."""
        return self.lora_alpha / math.sqrt(self.r) if self.r > 0 else 0.0

    def num_parameters(self, token_dim: int | None = None) -> int:
        """The DePT budget m*d + s*r + r*d (no head)."""
        d = token_dim if token_dim is not None else self.token_dim
        if d is None:
            raise ConfigError("token_dim is unknown: pass it, or attach the config to a model first.")
        return self.num_virtual_tokens * d + self.max_length * self.r + self.r * d

    def link_base_config(self, base_config) -> None:
        """Answer, for the attributes DePTConfig does not define, from the base model's config `base_config`.

        transformers' `Trainer` and TRL read `model.config` as the base model's Hugging Face config (a PEFT model's
        `config` is its base's), while a DePT model's `config` is this adapter config: linked, it serves both
        (`config.get_text_config()`, `config.pad_token_id`, ... are the base's). Nothing of the base's is saved.
        """
        self.__dict__["_base_config"] = base_config

    def __getattr__(self, name: str):
        # Called only for names that are neither fields nor methods of DePTConfig.
        base = self.__dict__.get("_base_config")
        if base is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def to_dict(self) -> dict:
        return {"peft_type": "DEPT", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> DePTConfig:
        data = dict(data)
        peft_type = data.pop("peft_type", "DEPT")
        if peft_type != "DEPT":
            raise ConfigError(
                f"peft_type {peft_type!r} is not a DePT adapter config. Official DePT checkpoints "
                "(peft_type PROMPT_TUNING_LORA) load with DePTConfig.from_official_dict or DePTModel.from_pretrained."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown DePTConfig keys {unknown}. Valid keys: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_official_dict(cls, data: dict) -> DePTConfig:
        """Read the adapter_config.json written by the official DePT code (peft_type PROMPT_TUNING_LORA)."""
        task_types = {"SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal", "SEQ_CLS": "cls"}
        inits = {"TEXT": "text", "SAMPLE_VOCAB": "vocab", "RANDOM": "random"}
        try:
            return cls(
                num_virtual_tokens=int(data["num_virtual_tokens"]),
                r=int(data.get("r", 0)),
                max_length=int(data["max_length"]),
                lora_alpha=float(data.get("lora_alpha", 8.0)),
                prompt_init=inits.get(data.get("prompt_tuning_init", "TEXT"), "random"),
                prompt_init_text=data.get("prompt_tuning_init_text") or OFFICIAL_INIT_TEXT,
                task_type=task_types[data.get("task_type", "SEQ_2_SEQ_LM")],
                base_model_name_or_path=data.get("base_model_name_or_path"),
                token_dim=data.get("token_dim"),
            )
        except KeyError as err:
            raise ConfigError(f"Official DePT adapter config lacks the key {err}.") from None

    def save_pretrained(self, save_directory: str | Path) -> Path:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / CONFIG_NAME
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DePTConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: is this a saved DePT adapter directory?")
        data = _read_json_object(path)
        if data.get("peft_type") == "PROMPT_TUNING_LORA":
            return cls.from_official_dict(data)
        return cls.from_dict(data)


def read_training_task(directory: str | Path) -> dict | None:
    """An adapter's `training_task.json`: its `task_names`, `modality` and what else its training CLI recorded
    (the evaluation and serving CLIs check tasks and base models against it); None when there is none, as in an
    official DePT checkpoint."""
    path = Path(directory) / TRAINING_TASK_NAME
    if not path.is_file():
        return None
    record = _read_json_object(path)
    if not isinstance(record.get("task_names"), list):
        raise ConfigError(f"{path} should hold an object with a 'task_names' list, as the training CLIs write it.")
    return record


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data
