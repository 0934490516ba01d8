"""Adapter files: ours (adapter_config.json + adapter_model.safetensors) and the official DePT release
(adapter_config.json + a pickled adapter_model.bin, read with weights_only=True)."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import CONFIG_NAME, DePTConfig
from .errors import UserError

WEIGHTS_NAME = "adapter_model.safetensors"
OFFICIAL_WEIGHTS_NAME = "adapter_model.bin"
# Official key -> our key.
OFFICIAL_KEYS = {
    "prompt_embeddings": "prompt_embeddings",
    "prompt_encoder.lora_embedding_A": "lora_embedding_A",
    "prompt_encoder.lora_embedding_B": "lora_embedding_B",
}


class UnsafeCheckpointError(UserError, ValueError):
    """A pickle that holds more than tensors, refused by torch's weights_only loader."""


class DamagedAdapterError(UserError, ValueError):
    """An adapter weights file that is truncated, corrupt, or holds something other than an adapter's tensors."""


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of `tensors`, with the metadata in sorted key order.

    safetensors keeps the metadata in a Rust HashMap, whose order changes from one save to the next, so
    identical tensors would give files with other bytes (and another sha256). The header is rewritten with the
    same keys sorted: same length, same offsets, and identical bytes for identical tensors.
    """
    data = save(tensors, metadata=metadata)
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return data[:8] + text.ljust(header_length) + data[8 + header_length :]


def save_adapter(save_directory: str | Path, config: DePTConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the config and the tensors; the weights file appears only once it is complete."""
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    handle, tmp_name = tempfile.mkstemp(prefix=".adapter_model.", suffix=".tmp", dir=path)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(safetensors_bytes(tensors, {"format": "pt", "peft_type": "DEPT"}))
        os.replace(tmp_name, path / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    config.save_pretrained(path)
    return path


def is_official_checkpoint(directory: str | Path) -> bool:
    path = Path(directory)
    return (path / OFFICIAL_WEIGHTS_NAME).is_file() and not (path / WEIGHTS_NAME).is_file()


def load_official_weights(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official DePT `adapter_model.bin` and rename its keys to ours.

    A pickle that holds more than tensors is refused (`UnsafeCheckpointError`); a truncated or corrupt file, or
    one that holds anything but a dict of the official tensors, is named as damaged (`DamagedAdapterError`).
    """
    try:
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Refusing to load {weights_path}: it holds objects other than tensors, which could run code. "
            "Only plain tensor checkpoints are loaded (torch.load with weights_only=True rejected this one: "
            f"{_unpickler_reason(err)})."
        ) from None
    except Exception as err:  # torch reports a damaged file as RuntimeError, EOFError, KeyError, ... by its format
        what = "it is empty (0 bytes)" if Path(weights_path).stat().st_size == 0 else \
            f"{type(err).__name__}: {_first_line(err) or 'it ends too soon'}"
        raise _damaged(weights_path, what, OFFICIAL_FIX) from None
    if not isinstance(raw, dict):
        raise _damaged(weights_path, f"it holds a {type(raw).__name__}, not a dict of tensors", OFFICIAL_FIX)
    unknown = sorted(map(str, set(raw) - set(OFFICIAL_KEYS)))
    if unknown or "prompt_embeddings" not in raw:
        raise DamagedAdapterError(
            f"{weights_path} is not an official DePT checkpoint: expected keys {sorted(OFFICIAL_KEYS)}, "
            f"found {sorted(map(str, raw))}."
        )
    not_tensors = sorted(f"{key} ({type(value).__name__})" for key, value in raw.items()
                         if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise _damaged(weights_path, f"these entries are not tensors: {', '.join(not_tensors)}", OFFICIAL_FIX)
    return {OFFICIAL_KEYS[key]: value.float() for key, value in raw.items()}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _unpickler_reason(err: BaseException) -> str:
    """The reason in torch's weights-only refusal, without its advice to load the file unsafely."""
    reason = (str(err).partition("WeightsUnpickler error:")[2] or str(err)).strip().partition("\n\n")[0]
    return " ".join(reason.split()).partition(". ")[0].rstrip(".")


OFFICIAL_FIX = "Download or copy the checkpoint again."
OUR_FIX = ("Copy the adapter again, or save it again from its training run (its checkpoint-* directories hold the "
           "same parameters).")


def _damaged(weights_path: str | Path, what: str, fix: str = OUR_FIX) -> DamagedAdapterError:
    return DamagedAdapterError(f"{weights_path} is damaged ({what}). {fix}")


def load_adapter(directory: str | Path) -> tuple[DePTConfig, dict[str, torch.Tensor], str]:
    """Config and tensors of a saved adapter, ours or official, plus a label naming the source for messages."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"Adapter directory {path} does not exist.")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: is it a DePT adapter directory?")
    config = DePTConfig.from_pretrained(path)
    if (path / WEIGHTS_NAME).is_file():
        return config, load_weights(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME)
    if (path / OFFICIAL_WEIGHTS_NAME).is_file():
        return config, load_official_weights(path / OFFICIAL_WEIGHTS_NAME), str(path / OFFICIAL_WEIGHTS_NAME)
    raise FileNotFoundError(
        f"{path} has {CONFIG_NAME} but no weights: expected {WEIGHTS_NAME} (ours) or {OFFICIAL_WEIGHTS_NAME} "
        "(official DePT)."
    )


def load_weights(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an `adapter_model.safetensors`; a truncated or corrupt file is named as damaged."""
    try:
        return load_file(weights_path)
    except SafetensorError as err:
        raise _damaged(weights_path, f"truncated or corrupt: {err}") from None
