"""DePT adapters on the Hugging Face Hub: find one by repository id, push one, and describe it in a model card.

- `resolve_adapter_dir(name_or_path, revision=, token=, cache_dir=)`: a local directory as it is, otherwise a Hub
  repository id, fetched into (or found in) huggingface_hub's cache with `snapshot_download`. It is the one
  resolver behind `DePTModel.from_pretrained`, `--peft_model_id`, `dept-eval --adapter` and `dept-serve --adapter`.
- `write_model_card(directory, config, ...)`: `README.md` with YAML metadata (`huggingface_hub.ModelCard`): the base
  model, `library_name: dept`, the tags dept, prompt-tuning and the task type, and the run's task and metrics when
  they are known. A README.md that dept did not write is never replaced (see `write_model_card`).
- `upload_adapter(directory, repo_id, ...)`: `HfApi.create_repo`, then one commit of `adapter_config.json`,
  `adapter_model.safetensors` and `README.md`, and nothing else of the directory (no checkpoints, results, logs).

huggingface_hub is imported when one of these runs, never by `import dept`.

    >>> model.push_to_hub("me/dept-sst2", run_dir="outputs/sst2")  # the card takes the run's task and metrics  # doctest: +SKIP
    >>> model = DePTModel.from_pretrained(base, "me/dept-sst2", revision="main")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .adapter_files import OFFICIAL_WEIGHTS_NAME, WEIGHTS_NAME
from .config import CONFIG_NAME, TRAINING_TASK_NAME, DePTConfig
from .errors import UserError

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
RESULTS_NAME = "all_results.json"  # what the training CLIs write: every split's metrics
# The run's record goes too when there is one: dept-eval and dept-serve read its tasks, template and base from it.
UPLOADED_FILES = (CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME, TRAINING_TASK_NAME)
# What a resolved Hub adapter needs locally: ours, an official DePT release, and the run's record if it has one.
DOWNLOADED_FILES = [CONFIG_NAME, WEIGHTS_NAME, OFFICIAL_WEIGHTS_NAME, TRAINING_TASK_NAME]
LIBRARY_NAME = "dept"
PIPELINE_TAGS = {"seq2seq": "text2text-generation", "causal": "text-generation", "cls": "text-classification"}
# Entries of all_results.json that describe a run, not a task metric.
NOT_METRICS = {"loss", "runtime", "samples", "samples_per_second", "steps_per_second"}
SPLITS = {"eval": "validation", "test": "test"}


class AdapterNotFoundError(UserError, FileNotFoundError):
    """Neither a local adapter directory nor a Hub repository that can be reached (or found in the cache)."""


# ------------------------------------------------------------------------------------------------------ resolving


def looks_like_a_local_path(name: str) -> bool:
    """True for names that can only be paths: absolute, relative with ./ ../ ~, or with more than one '/'."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def resolve_adapter_dir(name_or_path: str | Path, *, revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | Path | None = None) -> Path:
    """The local directory of an adapter: `name_or_path` itself when it is a directory, otherwise the snapshot of the
    Hub repository `name_or_path` (at `revision`: a branch, tag or commit; default main), downloaded into
    `cache_dir` (default: huggingface_hub's cache) or found there when offline (`HF_HUB_OFFLINE=1`).

    Raises `AdapterNotFoundError` (a `FileNotFoundError`) naming both places when it is neither.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise AdapterNotFoundError(f"{name} is a file: pass the adapter's directory (with {CONFIG_NAME}) or a Hub "
                                   "repository id such as 'user/adapter'.")
    if looks_like_a_local_path(name):
        raise AdapterNotFoundError(f"Adapter directory {name} does not exist (and it is not a Hub repository id "
                                   "such as 'user/adapter').")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        snapshot = snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir,
                                     allow_patterns=DOWNLOADED_FILES)
    except GatedRepoError:
        raise AdapterNotFoundError(f"{name} is not a local directory, and the Hub repository {name} is gated: "
                                   "accept its terms on the Hub and pass token= (or log in).") from None
    except RevisionNotFoundError:
        raise AdapterNotFoundError(f"{name} is not a local directory, and the Hub repository {name} has no "
                                   f"revision {revision!r}.") from None
    except RepositoryNotFoundError:
        raise AdapterNotFoundError(f"{name} is not a local directory, and no Hub repository {name} can be read "
                                   "(check the id; a private repository needs token=).") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " and the Hub cannot be reached"
        raise AdapterNotFoundError(f"{name} is not a local directory, and the Hub repository {name}{at} is not in "
                                   f"the cache {cache_dir or constants.HF_HUB_CACHE}{offline}. Download it once "
                                   "online, or pass the adapter's local directory.") from None
    except (HfHubHTTPError, OSError) as err:
        raise AdapterNotFoundError(f"{name} is not a local directory, and fetching the Hub repository {name}{at} "
                                   f"failed: {err}") from None
    return Path(snapshot)


# ------------------------------------------------------------------------------------------------------ model card


def run_results(run_dir: str | Path) -> dict[str, Any]:
    """What a training run's directory tells a model card: `task_names` and `modality` from training_task.json,
    `metrics` (split -> name -> value) from all_results.json. Absent files give nothing."""
    run_dir = Path(run_dir)
    details: dict[str, Any] = {}
    task_file, results_file = run_dir / TRAINING_TASK_NAME, run_dir / RESULTS_NAME
    if task_file.is_file():
        record = json.loads(task_file.read_text())
        details.update(task_names=list(record.get("task_names", [])), modality=record.get("modality"))
    if results_file.is_file():
        metrics: dict[str, dict[str, float]] = {}
        for key, value in json.loads(results_file.read_text()).items():
            prefix, _, metric = key.partition("_")
            if prefix in SPLITS and metric not in NOT_METRICS and isinstance(value, (int, float)):
                metrics.setdefault(SPLITS[prefix], {})[metric] = value
        details["metrics"] = metrics
    return details


def model_card(config: DePTConfig, *, repo_id: str | None = None, task_names: Iterable[str] = (),
               metrics: Mapping[str, Mapping[str, float]] | None = None, tags: Iterable[str] = (),
               model_card_data=None):
    """The `huggingface_hub.ModelCard` of an adapter.

    Args:
        config: the adapter's config (sizes, task type, base model).
        repo_id: the Hub repository it goes to (names the model and the loading example).
        task_names: the task(s) it was trained on; metrics: split -> metric -> value, as `run_results` reads them.
        tags: more tags (e.g. a trainer's), after dept, prompt-tuning and the task type.
        model_card_data: a `ModelCardData` or a dict of its fields (language, license, datasets, eval_results, ...)
            that override the generated ones; its tags are added to the generated ones.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base = config.base_model_name_or_path
    hub_base = base if base and not Path(base).exists() and not looks_like_a_local_path(base) else None
    pipeline_tag = PIPELINE_TAGS.get(config.task_type)
    task_names = list(task_names)
    results = [EvalResult(task_type=pipeline_tag or config.task_type, dataset_type=", ".join(task_names),
                          dataset_name=", ".join(task_names), dataset_split=split, metric_type=name,
                          metric_value=value)
               for split, values in (metrics or {}).items() for name, value in values.items()] if task_names else []
    all_tags = list(dict.fromkeys(["dept", "prompt-tuning", config.task_type, *task_names, *tags]))
    fields: dict[str, Any] = dict(base_model=hub_base, library_name=LIBRARY_NAME, pipeline_tag=pipeline_tag,
                                  tags=all_tags, model_name=repo_id or "DePT adapter", eval_results=results or None)
    if model_card_data is not None:
        given = model_card_data.to_dict() if hasattr(model_card_data, "to_dict") else dict(model_card_data)
        given = {key.replace("-", "_"): value for key, value in given.items() if value is not None}
        given.pop("model_index", None)  # to_dict's rendering of eval_results, which ModelCardData takes as such
        if isinstance(model_card_data, ModelCardData) and model_card_data.eval_results:
            given["eval_results"] = model_card_data.eval_results
        fields["tags"] = list(dict.fromkeys([*all_tags, *given.pop("tags", [])]))
        fields.update(given)
    data = ModelCardData(**fields)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_text(config, hub_base or base, repo_id, task_names, metrics)}")


def _card_text(config: DePTConfig, base: str | None, repo_id: str | None, task_names: list[str],
               metrics: Mapping[str, Mapping[str, float]] | None) -> str:
    auto_class = {"seq2seq": "AutoModelForSeq2SeqLM", "causal": "AutoModelForCausalLM",
                  "cls": "AutoModelForSequenceClassification"}.get(config.task_type, "AutoModel")
    m, r, s, d = config.num_virtual_tokens, config.r, config.max_length, config.token_dim
    size = f"{config.num_parameters():,}" if d is not None else "m·d + s·r + r·d"
    lines = [
        f"# DePT adapter{' for ' + ', '.join(task_names) if task_names else ''}",
        "",
        "A [DePT](https://arxiv.org/abs/2309.05173) (Decomposed Prompt Tuning, ICLR 2024) adapter"
        f"{f' for `{base}`' if base else ''}: a prompt P of m vectors in front of the input, and a low-rank update"
        " A·B of the frozen input embeddings, scaled by lora_alpha / sqrt(r).",
        "",
        "| m (P) | r (A·B) | s (max_length) | lora_alpha | task type | trained parameters |",
        "|---|---|---|---|---|---|",
        f"| {m} | {r} | {s} | {config.lora_alpha:g} | {config.task_type} | {size} |",
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto_class}",
        "from dept import DePTModel",
        "",
        f"base = {auto_class}.from_pretrained({base or 'BASE_MODEL'!r})",
        f"model = DePTModel.from_pretrained(base, {repo_id or 'ADAPTER_DIR_OR_REPO_ID'!r})",
        "```",
    ]
    if metrics:
        lines += ["", "## Results", "", "| split | metric | value |", "|---|---|---|"]
        lines += [f"| {split} | {name} | {value:.4g} |" for split, values in metrics.items()
                  for name, value in values.items()]
    return "\n".join(lines) + "\n"


def is_dept_model_card(path: str | Path) -> bool:
    """Whether `path` is a model card that dept wrote (its metadata says `library_name: dept`)."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.library_name == LIBRARY_NAME
    except Exception:  # unreadable metadata: not one of ours
        return False


def write_model_card(directory: str | Path, config: DePTConfig, *, repo_id: str | None = None,
                     run_dir: str | Path | None = None, tags: Iterable[str] = (), model_card_data=None) -> Path | None:
    """Write `directory/README.md`, the adapter's model card, and return its path.

    The task and metrics come from `run_dir` (default: `directory` itself, where the training CLIs write
    training_task.json and all_results.json beside the adapter), then `model_card_data` (see `model_card`).

    A README.md already there is replaced only when dept wrote it (`library_name: dept` in its metadata: it
    describes an earlier save of this adapter). Any other README.md, yours or another tool's, is kept as it is,
    with a warning, and None is returned: delete or rename it to get a DePT model card.
    """
    target = Path(directory) / MODEL_CARD_NAME
    if target.exists() and not is_dept_model_card(target):
        logger.warning(f"Kept {target}: it was not written by dept. Delete or rename it to get a DePT model card.")
        return None
    details = run_results(directory if run_dir is None else run_dir)
    card = model_card(config, repo_id=repo_id, task_names=details.get("task_names", ()),
                      metrics=details.get("metrics"), tags=tags, model_card_data=model_card_data)
    target.write_text(str(card))
    return target


# ------------------------------------------------------------------------------------------------------ upload


def upload_adapter(directory: str | Path, repo_id: str, *, token: str | bool | None = None,
                   private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                   create_pr: bool = False):
    """Push the adapter saved in `directory` to the Hub repository `repo_id` (created if needed): one commit of
    `adapter_config.json`, `adapter_model.safetensors`, `README.md` and the run's `training_task.json` when the
    directory holds one, on `revision` (a branch, created if
    needed; default main). Returns huggingface_hub's `CommitInfo`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    directory = Path(directory)
    files = [name for name in UPLOADED_FILES if (directory / name).is_file()]
    if CONFIG_NAME not in files or WEIGHTS_NAME not in files:
        raise AdapterNotFoundError(f"{directory} holds no saved adapter ({CONFIG_NAME} and {WEIGHTS_NAME}): save "
                                   "it with save_pretrained first.")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name in files]
    return api.create_commit(repo.repo_id, operations=operations, revision=revision, create_pr=create_pr,
                             commit_message=commit_message or "Upload DePT adapter")
