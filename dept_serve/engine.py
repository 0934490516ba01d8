"""The model side of `dept-serve`: one frozen base, its tokenizer, the loaded adapters, and batch runs.

`ServingEngine` knows nothing of HTTP or asyncio. The server calls it from one thread only (its compute
thread), so loading, unloading and batches never overlap:

    engine = ServingEngine.load("t5-base", {"sst2": "adapters/sst2"})
    rows = [EngineRow("sst2", ids) for ids in engine.encode(engine.adapters["sst2"], ["sentence: a fine film"])]
    engine.generate(rows, max_new_tokens=3, num_beams=1)   # [{"text": "1", "token_ids": [...]}]

Inputs are tokenized as in training (`dept_nlp.preprocess.encode_source`, in the `causal_template` the adapter's
training_task.json records) and are never truncated: an input over its adapter's `max_length` is refused, one
over `max_input_chars` before it is even tokenized. An adapter recorded for another base model than this one's is
refused unless `allow_other_base`. The rows of one batch may name different adapters; `dept.MultiAdapterModel`
routes each row to its own.
"""

from __future__ import annotations

import copy
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from dept import ConfigError, DePTConfig, MultiAdapterModel
from dept.config import read_training_task
from dept_nlp.modeling import load_model, recorded_task_type, resolve_task_type
from dept_nlp.modeling import load_tokenizer as load_text_tokenizer
from dept_nlp.preprocess import CAUSAL_TEMPLATE, check_causal_template, encode_source, pad
from dept_nlp.tasks import TASKS as TEXT_TASKS
from dept_serve.errors import ForbiddenError, InvalidInputError, NotFoundError
from dept_vl.data import open_feature_files, visual_inputs
from dept_vl.features import FeatureStoreError, GridFeatureExtractor, MissingFeaturesError
from dept_vl.pipeline import VLModelArguments, load_vl_base_model
from dept_vl.pipeline import load_tokenizer as load_vl_tokenizer
from dept_vl.vision_backbone import pair_refusal

MODALITIES = ("text", "vl")


@dataclass
class ServedAdapter:
    """What the server knows of a loaded adapter."""

    name: str
    path: Path
    config: DePTConfig
    modality: str
    tasks: list[str] = field(default_factory=list)
    label_words: list[str] | None = None
    image_features: dict | None = None  # backbone settings that turn an uploaded image into its features
    causal_template: str = CAUSAL_TEMPLATE  # decoder-only: the text around the input, as in its training
    loaded_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def endpoint(self) -> str:
        return "score" if self.config.task_type == "cls" else "generate"

    def info(self) -> dict:
        return {"name": self.name, "path": str(self.path), "modality": self.modality, "tasks": self.tasks,
                "task_type": self.config.task_type, "endpoint": f"/v1/{self.endpoint}",
                "num_virtual_tokens": self.config.num_virtual_tokens, "r": self.config.r,
                "max_length": self.config.max_length, "label_words": self.label_words,
                "accepts_images": self.modality == "vl" and self.image_features is not None}


@dataclass
class EngineRow:
    """One input of a batch: its adapter, its token ids, and for VL its (features, boxes)."""

    adapter: str
    input_ids: list[int]
    visual: tuple[np.ndarray, np.ndarray] | None = None
    on_token: Callable[[int], None] | None = None  # streaming: called on the compute thread with each new token


class RowStreamer(BaseStreamer):
    """transformers' streamer for a mixed batch: each row's new tokens go to its own `on_token`, through its
    first eos (a finished row's padding is not passed on). Greedy decoding only, as transformers streams."""

    def __init__(self, rows: list[EngineRow], eos_token_id: int | None):
        self.rows, self.eos_token_id = rows, eos_token_id
        self.finished = [row.on_token is None for row in rows]

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:  # the input (decoder-only) or the decoder's start tokens (seq2seq): nothing new
            return
        for i, token in enumerate(value.tolist()):
            if not self.finished[i]:
                self.rows[i].on_token(token)
                self.finished[i] = token == self.eos_token_id

    def end(self) -> None:
        pass


def same_base(recorded: str, served: str) -> bool:
    """Whether a base model's recorded name (`base_model_name_or_path`) names the served one: the same string,
    the same local directory, or a hub id and a directory of that name (a copy or a hub cache snapshot of it;
    a bare legacy id such as `t5-base` also matches `google-t5/t5-base`). Two other directories never match."""
    if recorded == served:
        return True
    recorded_dir, served_dir = Path(recorded).expanduser(), Path(served).expanduser()
    if _is_dir(recorded_dir) and _is_dir(served_dir):
        return recorded_dir.resolve() == served_dir.resolve()
    (recorded_org, recorded_name), (served_org, served_name) = _hub_name(recorded), _hub_name(served)
    return recorded_name == served_name and (None in (recorded_org, served_org) or recorded_org == served_org)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for this file system, ...
        return False


def _hub_name(name: str) -> tuple[str | None, str]:
    """(organisation or None when unknown, model name) of a hub id, a local copy or a hub cache snapshot."""
    parts = [part for part in Path(name).parts if part not in ("/", ".")]
    for part in parts:
        if part.startswith("models--"):  # huggingface_hub's cache: models--ORG--NAME/snapshots/REVISION
            org, _, model = part[len("models--"):].partition("--")
            return (org, model) if model else (None, org)
    if len(parts) == 2 and not os.path.isabs(name) and not _is_dir(Path(name)):
        return parts[0], parts[1]  # a hub id ORG/NAME
    return None, parts[-1] if parts else name


def _unreadable(path: Path, err: OSError) -> Exception:
    """The refusal of an adapter path the file system will not read: 404 where no such directory can exist
    (a name over the file system's limit, ...), 403 where it is not ours to read."""
    reason = f"{err.strerror} (errno {errno.errorcode.get(err.errno, err.errno)})" if err.errno else str(err)
    message = f"Adapter directory {path} cannot be read: {reason}."
    if err.errno in (errno.EACCES, errno.EPERM):
        return ForbiddenError(message)
    if err.errno in (None, errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
        return NotFoundError(message)
    return InvalidInputError(message)


def _base_settings(adapter_dirs: list[Path], modality: str | None, task_type: str | None,
                   num_labels: int | None, feat_dim: int | None) -> dict:
    """The base model's modality, task_type, label count and feature size, from the flags or the first adapter."""
    record = next((r for r in map(read_training_task, adapter_dirs) if r is not None), None) or {}
    modality = modality or record.get("modality", "text")
    if modality not in MODALITIES:
        raise ConfigError(f"Unknown modality {modality!r}: choose from {list(MODALITIES)}.")
    if modality == "vl":
        feat_dim = feat_dim or record.get("feat_dim")
        if not isinstance(feat_dim, int):
            raise ConfigError("A VL-T5 base needs its feature size: pass --feat_dim, or an --adapter saved by "
                              "dept-train-vl (its training_task.json records feat_dim).")
        return {"modality": modality, "task_type": "seq2seq", "feat_dim": feat_dim}
    task_type = task_type or recorded_task_type(record)
    if num_labels is None:
        tasks = [TEXT_TASKS[name] for name in record.get("task_names", []) if name in TEXT_TASKS]
        num_labels = max(tasks[0].num_labels, 1) if tasks else 2
    return {"modality": modality, "task_type": task_type, "num_labels": num_labels}


class ServingEngine:
    """One frozen base model serving many DePT adapters in mixed batches (see the module docstring).

    Args:
        base_model: the frozen Hugging Face model (T5, LLaMA-style, BERT-style, or VL-T5).
        tokenizer: its tokenizer.
        modality: "text" or "vl".
        task_type: "seq2seq", "causal" or "cls".
        feature_store: for VL, the stored features that a request names by `feature_id`.
        image_features: for VL, the backbone settings used for uploaded images when an adapter records none.
    """

    def __init__(self, base_model, tokenizer, *, modality: str, task_type: str, model_name_or_path: str = "",
                 feature_store=None, image_features: dict | None = None, device: str | torch.device = "cpu",
                 allow_other_base: bool = False):
        self.device = torch.device(device)
        self.multi = MultiAdapterModel(base_model.to(self.device))
        self.tokenizer = tokenizer  # decodes, on the compute thread
        # Requests are encoded on the server's tokenizer thread: a fast tokenizer must not be used by two threads
        # at once, and this copy is used by that thread only.
        self._request_tokenizer = copy.deepcopy(tokenizer)
        # No token spells more characters than the vocabulary's longest entry: the bound of `max_input_chars`.
        self.longest_token_chars = max(map(len, tokenizer.get_vocab()), default=1) or 1
        self.modality, self.task_type = modality, task_type
        self.model_name_or_path = model_name_or_path
        self.allow_other_base = allow_other_base
        self.feature_store = feature_store
        self.image_features = image_features
        self.adapters: dict[str, ServedAdapter] = {}
        self._extractors: dict[tuple, GridFeatureExtractor] = {}

    @classmethod
    def load(cls, model_name_or_path: str, adapters: dict[str, str | Path] | None = None, *,
             modality: str | None = None, task_type: str | None = None, tokenizer_name: str | None = None,
             num_labels: int | None = None, feat_dim: int | None = None, feature_file: str | None = None,
             image_features: dict | None = None, device: str | torch.device | None = None,
             allow_other_base: bool = False) -> ServingEngine:
        """Load the base model and its tokenizer (what it is comes from the flags, else from the first adapter's
        training_task.json), then the adapters (`allow_other_base`: also those recorded for another base)."""
        adapters = adapters or {}
        settings = _base_settings([Path(p) for p in adapters.values()], modality, task_type, num_labels, feat_dim)
        if settings["modality"] == "vl":
            tokenizer = load_vl_tokenizer(VLModelArguments(model_name_or_path, tokenizer_name=tokenizer_name))
            base = load_vl_base_model(model_name_or_path, settings["feat_dim"])
        else:
            settings["task_type"] = resolve_task_type(model_name_or_path, settings["task_type"])
            tokenizer = load_text_tokenizer(tokenizer_name or model_name_or_path)
            base = load_model(model_name_or_path, settings["task_type"], num_labels=settings["num_labels"])
        store = open_feature_files(feature_file) if feature_file else None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine = cls(base.eval(), tokenizer, modality=settings["modality"], task_type=settings["task_type"],
                     model_name_or_path=model_name_or_path, feature_store=store, image_features=image_features,
                     device=device, allow_other_base=allow_other_base)
        for name, path in adapters.items():
            engine.add_adapter(name, path)
        return engine

    @property
    def base_model(self):
        return self.multi.base_model

    # ------------------------------------------------------------------------------------------------ adapters
    def describe(self, name: str, path: str | Path) -> ServedAdapter:
        """Read an adapter's config and training record and check that it fits this server; no tensor is read."""
        path = Path(path)
        try:
            if not path.is_dir():
                raise NotFoundError(f"Adapter directory {path} does not exist.")
            config = DePTConfig.from_pretrained(path)
            record = read_training_task(path) or {}
        except OSError as err:  # FileNotFoundError is a NotFoundError's job; this is a path that cannot be read
            raise _unreadable(path, err) from None
        modality = record.get("modality", "text")
        if modality != self.modality:
            raise InvalidInputError(f"{path} is a {modality} adapter, but this server's base model is "
                                    f"{self.modality}: serve it from a {modality} base.")
        if config.task_type != self.task_type:
            raise InvalidInputError(f"{path} is a {config.task_type!r} adapter, but this server's base model is "
                                    f"a {self.task_type!r} model: it was trained on another base model.")
        self._check_base_name(path, config.base_model_name_or_path or record.get("model_name_or_path"))
        refusal = pair_refusal(str(path), record, "dept-serve") if modality == "vl" else None
        if refusal:
            raise InvalidInputError(refusal)
        if modality == "vl" and record.get("feat_dim") != self.base_model.config.feat_dim:
            raise InvalidInputError(f"{path} reads {record.get('feat_dim')}-dimensional image features, but this "
                                    f"VL-T5 reads {self.base_model.config.feat_dim}-dimensional ones.")
        template = record.get("causal_template") or CAUSAL_TEMPLATE
        try:
            check_causal_template(template)
        except ValueError as err:
            raise InvalidInputError(f"{path}/training_task.json records a causal_template that cannot be used: "
                                    f"{err}") from None
        label_words = record.get("label_words")
        return ServedAdapter(name, path, config, modality, list(record.get("task_names", [])),
                             list(label_words) if isinstance(label_words, list | tuple) else None,
                             (record.get("image_features") or self.image_features) if modality == "vl" else None,
                             causal_template=template)

    def _check_base_name(self, path: Path, recorded: str | None) -> None:
        """Refuse an adapter recorded for another base model (see `same_base`), unless allow_other_base."""
        if self.allow_other_base or not recorded or not self.model_name_or_path:
            return
        if not same_base(recorded, self.model_name_or_path):
            raise InvalidInputError(
                f"{path} was trained on the base model {recorded!r}, but this server serves "
                f"{self.model_name_or_path!r}: an adapter's P, A and B fit only the base they were trained on. "
                "Serve it from that base, or start dept-serve with --allow_other_base if this base is the same "
                "model under another name (a copy, a snapshot).")

    def add_adapter(self, name: str, path: str | Path) -> ServedAdapter:
        """Check, then load an adapter: one for another base model is refused before any compute."""
        adapter = self.describe(name, path)
        self.multi.add_adapter(name, adapter.path)
        self.adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        self.multi.remove_adapter(name)
        del self.adapters[name]

    # ------------------------------------------------------------------------------------------------ inputs
    def max_input_chars(self, adapter: ServedAdapter) -> int:
        """The longest input, in characters, that can fit in the adapter's max_length tokens: max_length times the
        longest vocabulary entry plus one (a space between tokens). A tokenizer that folds a run of whitespace or
        of unknown characters into one token could fit more; such inputs are refused all the same."""
        return adapter.config.max_length * (self.longest_token_chars + 1)

    def check_input_chars(self, adapter: ServedAdapter, texts: list[str]) -> None:
        """Refuse (422), before any tokenizing, an input longer than `max_input_chars`."""
        limit, max_chars = adapter.config.max_length, self.max_input_chars(adapter)
        for i, text in enumerate(texts):
            if len(text) > max_chars:
                raise InvalidInputError(
                    f"inputs[{i}] has {len(text)} characters, more than adapter {adapter.name!r} can take: its "
                    f"max_length is {limit} tokens, and {limit} tokens of this tokenizer hold at most {max_chars} "
                    f"characters (its longest token has {self.longest_token_chars}, plus a space). Shorten it to at "
                    f"most {limit} tokens.", max_length=limit, input_index=i, num_characters=len(text),
                    max_characters=max_chars)

    def encode(self, adapter: ServedAdapter, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as in training; an input over the adapter's max_length is refused (422), one
        over `max_input_chars` before it is tokenized. The server calls this on its tokenizer thread only."""
        self.check_input_chars(adapter, texts)
        encoded = [encode_source(self._request_tokenizer, self.task_type, text, adapter.causal_template)
                   for text in texts]
        limit = adapter.config.max_length
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise InvalidInputError(
                    f"inputs[{i}] has {len(ids)} tokens, but adapter {adapter.name!r} has max_length {limit}: "
                    f"shorten it to at most {limit} tokens.", max_length=limit, input_index=i, num_tokens=len(ids))
        return encoded

    def stored_features(self, feature_ids: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(features, boxes) of each feature id in the server's --feature_file."""
        if self.feature_store is None:
            raise InvalidInputError("This server has no --feature_file, so feature_ids cannot be looked up: send "
                                    "images instead, or start dept-serve with --feature_file.")
        try:
            return [self.feature_store[feature_id] for feature_id in feature_ids]
        except MissingFeaturesError as err:
            raise InvalidInputError(str(err)) from None
        except (FeatureStoreError, ValueError) as err:
            raise InvalidInputError(f"Cannot read the stored features: {err}") from None

    def extractor_for(self, adapter: ServedAdapter) -> GridFeatureExtractor:
        """The backbone that turns an uploaded image into this adapter's features (built once per settings)."""
        settings = adapter.image_features
        if settings is None:
            raise InvalidInputError(
                f"Adapter {adapter.name!r} was trained on stored features and records no backbone, so an image "
                "cannot be turned into its features: send feature_ids, or start dept-serve with --backbone.")
        key = (settings["backbone"], bool(settings.get("pretrained", True)), settings.get("image_size"))
        if key not in self._extractors:
            extractor = GridFeatureExtractor(key[0], pretrained=key[1], image_size=key[2], device=self.device)
            if extractor.feat_dim != self.base_model.config.feat_dim:
                raise InvalidInputError(f"The backbone {key[0]} gives {extractor.feat_dim}-dimensional features, "
                                        f"but this VL-T5 reads {self.base_model.config.feat_dim}-dimensional ones.")
            self._extractors[key] = extractor
        return self._extractors[key]

    def image_features_for(self, adapter: ServedAdapter, images: list[Image.Image]):
        """(features, boxes) of each image through the adapter's backbone (as in its training, from raw images)."""
        return self.extractor_for(adapter)(images)

    # ------------------------------------------------------------------------------------------------ batches
    def _batch(self, rows: list[EngineRow]) -> dict:
        side = "left" if self.task_type == "causal" else "right"  # decoder-only models continue at the right end
        ids = [row.input_ids for row in rows]
        batch = {"input_ids": pad(ids, self.tokenizer.pad_token_id, side),
                 "attention_mask": pad([[1] * len(row) for row in ids], 0, side)}
        if self.modality == "vl":
            batch.update(visual_inputs([[row.visual] for row in rows]))
        return {key: value.to(self.device) for key, value in batch.items()}

    @torch.no_grad()
    def generate(self, rows: list[EngineRow], max_new_tokens: int, num_beams: int, min_new_tokens: int = 0) -> list[dict]:
        """Greedy (or beam) generation for a mixed batch: each row's text and new token ids (through eos).
        `min_new_tokens` (benchmarks) holds the length fixed whatever the adapters answer."""
        generated = self.multi.generate(
            **self._batch(rows), adapter_names=[row.adapter for row in rows], max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id, new_tokens_only=True, **self._streaming(rows))
        return [{"text": self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                 "token_ids": self.new_tokens(ids)} for ids in generated.tolist()]

    def _streaming(self, rows: list[EngineRow]) -> dict:
        """generate's `streamer` when a row streams its tokens."""
        if not any(row.on_token for row in rows):
            return {}
        return {"streamer": RowStreamer(rows, self.tokenizer.eos_token_id)}

    def new_tokens(self, ids: list[int]) -> list[int]:
        """The generated tokens of one row: without the decoder's start token, up to and with the first eos."""
        if self.task_type == "seq2seq":
            ids = ids[1:]
        eos = self.tokenizer.eos_token_id
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    @torch.no_grad()
    def score(self, rows: list[EngineRow]) -> list[dict]:
        """Classifier outputs for a mixed batch, each row through its adapter's head: the label and the
        probabilities, or the score of a regression head."""
        logits = self.multi(**self._batch(rows), adapter_names=[row.adapter for row in rows]).logits.float()
        if logits.shape[-1] == 1:
            return [{"label": None, "probabilities": None, "score": value} for value in logits[:, 0].tolist()]
        outputs = []
        for row, probabilities in zip(rows, torch.softmax(logits, dim=-1).tolist()):
            words = self.adapters[row.adapter].label_words
            labels = words if words and len(words) == len(probabilities) else [str(i) for i in range(len(probabilities))]
            best = max(range(len(probabilities)), key=probabilities.__getitem__)
            outputs.append({"label": labels[best], "probabilities": dict(zip(labels, probabilities)), "score": None})
        return outputs
