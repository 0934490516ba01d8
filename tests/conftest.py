"""Fixtures and helpers shared by more than one test directory: tiny models and tokenizers, DePT attached to them,
tiny data (text in each task's hub schema, a synthetic VL set, image folders), a tiny study, and a free port.

Each directory's own conftest.py holds what only its tests use. The model and data builders are the demos'
(`scripts/tiny_models.py`, `scripts/synthetic_vl_data.py`), imported from their files: scripts/ stays a folder of
scripts, not a package. Test modules import the helpers from here; fixtures that save something to disk are
session-scoped (one copy per test worker), and tests only read what they save.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import importlib.util
import json
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    BertForSequenceClassification,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    T5ForConditionalGeneration,
)

from dept import DePTConfig, get_dept_model  # noqa: E402
from dept.command_line import IGNORED_FLAGS  # noqa: E402
from dept_nlp.tasks import SPLITS, TaskSpec, get_task  # noqa: E402
from dept_vl.data import task_file_paths  # noqa: E402
from dept_vl.features import GridFeatureExtractor, extract_to_h5  # noqa: E402
from dept_vl.tasks import SPLITS as VL_SPLITS  # noqa: E402
from dept_vl.tasks import TASKS as VL_TASKS  # noqa: E402
from dept_vl.tasks import TaskSources, load_task_splits  # noqa: E402

torch.set_num_threads(1)  # the suite runs two workers on two cores

REPO_ROOT = Path(__file__).resolve().parent.parent


def import_script(name: str) -> ModuleType:
    """A module of scripts/ (a folder of scripts, not a package), imported from its file as `name`; not through
    sys.path, where scripts/evaluate.py would hide the `evaluate` library. It is registered under a prefixed name
    for the same reason."""
    module_name = f"_dept_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before running it, as an import does (its dataclasses look it up)
        spec.loader.exec_module(module)
    return sys.modules[module_name]


_tiny_models = import_script("tiny_models")
build_word_tokenizer = _tiny_models.build_word_tokenizer
save_tiny_model = _tiny_models.save_tiny_model
tiny_t5_config = _tiny_models.tiny_t5_config
tiny_llama_config = _tiny_models.tiny_llama_config
tiny_gpt2_config = _tiny_models.tiny_gpt2_config
tiny_bert_config = _tiny_models.tiny_bert_config
synthetic_vl_data = import_script("synthetic_vl_data")  # tests/vl/test_synthetic.py tests the module itself
make_synthetic_vl_dataset = synthetic_vl_data.make_synthetic_vl_dataset

SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"
OFFICIAL_CHECKPOINTS = SHARED_REFERENCE / "dept-official-checkpoints"
T5_TOKENIZER_DIR = SHARED_REFERENCE / "t5-tokenizer"


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook
def pytest_collection_modifyitems(config, items):
    """The multi-process tests first (a stable sort): xdist hands tests out in this order, so the longest runs
    start early and the two workers finish together. On an xdist worker under --dist loadgroup, each
    `xdist_group` test's node id gets its group name (see `_name_the_xdist_group`)."""
    items.sort(key=lambda item: item.get_closest_marker("multiprocess") is None)
    if getattr(config.option, "loadgroup", False):  # set on xdist workers only
        for item in items:
            _name_the_xdist_group(item)


def _name_the_xdist_group(item) -> None:
    """--dist loadgroup sends the tests whose node ids end in the same `@group` to one worker. pytest-xdist 3.8
    appends it by setting `item._nodeid`, which pytest 9.2 no longer reads (the id lives in `item._id`): the groups
    were lost, each test went its own way, and a module-scoped run ran once per worker. Append it here where xdist
    could not (idempotent: an id that already ends in its group is left alone)."""
    names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                    for mark in item.iter_markers("xdist_group")})
    suffix = "@" + "_".join(names)
    if not names or item.nodeid.endswith(suffix) or not hasattr(item, "_id"):
        return
    item._id = type(item._id).parse(item.nodeid + suffix)


@pytest.fixture(autouse=True)
def _no_mixed_precision_left_behind():
    """accelerate keeps one AcceleratorState per process. A test that trains in bf16 (HF's or TRL's Trainer with
    bf16=True) leaves it at bf16, and a later plain `Accelerator()` of that test worker would then run under bf16
    autocast (our Trainer resets such a state itself: `dept.trainer.new_accelerator`): a later test's result would
    depend on which tests ran before it on the same worker. Reset the state after such a test."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None and state.AcceleratorState._shared_state.get("_mixed_precision", "no") != "no":
        state.AcceleratorState._reset_state()


def flags_the_method_reads(argv: list[str], peft_type: str) -> list[str]:
    """`argv` without the flags (and their values) that `peft_type`'s method ignores (`IGNORED_FLAGS`): a baseline
    is given only the flags its method reads, as a user would."""
    ignored, kept, skip = IGNORED_FLAGS[peft_type], [], False
    for word in argv:
        if skip and not word.startswith("--"):
            continue
        skip = word.startswith("--") and word[2:] in ignored
        if not skip:
            kept.append(word)
    return kept


@pytest.fixture
def network_cut(monkeypatch):
    """The hub offline and no socket able to connect: what passes under it never reached the network."""
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def free_port() -> int:
    """A free TCP port for a multi-process launch, so concurrent test workers never share a rendezvous port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------ float32 tolerances

# FLOAT32_PATHS: one float32 result computed along two paths (another summation order, a recomputed forward, another
# CPU's kernels) differs in its last bits. float32 keeps 24 bits (eps 1.2e-7); a few hundred roundings stay well
# within rtol 1e-5, and an element near zero that sums terms as large as the tensor's largest value gets an atol of
# 1e-5 of that value. A real fault (a lost gradient, a step taken twice, a wrong scale) is orders of magnitude larger.
# A test that proves bit-identity (the same path, e.g. a reloaded adapter) compares exactly instead.


def float32_paths(expected) -> dict[str, float]:
    """assert_close (or numpy's assert_allclose) tolerances for two float32 computation paths of `expected`, a
    tensor or an array (see FLOAT32_PATHS); the scale is its largest finite magnitude (generate's scores hold -inf)."""
    expected = torch.as_tensor(expected).detach()
    finite = expected[torch.isfinite(expected)]
    return {"rtol": 1e-5, "atol": 1e-5 * (finite.abs().max().item() if finite.numel() else 0.0)}


# ------------------------------------------------------------------------------------ tiny models and tokenizers

CORPUS = [
    "Classify this text is postive or not:",
    "the movie was great and the actors were wonderful",
    "a dull and boring film with terrible acting",
    "question: what color is the sky? context: the sky is blue today",
    "sentence1: a man is playing a guitar . sentence2: a person plays music",
    "true false yes no 0 1 2 3 4 5 red green blue circle square triangle",
]
TASK_TYPES = {"t5": "seq2seq", "llama": "causal", "gpt2": "causal", "bert": "cls"}


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


@pytest.fixture(scope="session")
def _t5_base_dims_prototype():
    config = tiny_t5_config(32128, d_model=768, d_kv=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)
    return _seeded(lambda: T5ForConditionalGeneration(config))


@pytest.fixture
def t5_base_dims_model(_t5_base_dims_prototype):
    """A T5 with t5-base's d and vocabulary (random weights, one thin layer): what official adapters need. Each test
    gets its own copy of one model built per session (its 25M random weights take seconds to draw)."""
    return copy.deepcopy(_t5_base_dims_prototype)


# ------------------------------------------------------------------------------------ DePT on a tiny model


def attach(kind: str, model, tokenizer, **overrides):
    """Attach DePT with small sizes and a non-zero B, so A @ B really changes the embeddings."""
    options = dict(num_virtual_tokens=5, r=3, max_length=24, prompt_init="text", task_type=TASK_TYPES[kind])
    options.update(overrides)
    dept_model = get_dept_model(model, DePTConfig(**options), tokenizer=tokenizer)
    with torch.no_grad():
        dept_model.prompt_encoder.lora_embedding_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return dept_model


def base_forward(kind: str, base, inputs_embeds, attention_mask, position_ids=None):
    """Run the frozen base on given embeddings, with the extra inputs each kind needs for logits."""
    if kind == "t5":
        decoder_input_ids = torch.zeros(inputs_embeds.shape[0], 3, dtype=torch.long)
        return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    decoder_input_ids=decoder_input_ids).logits
    return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids).logits


def dept_forward(kind: str, dept_model, batch):
    if kind == "t5":
        decoder_input_ids = torch.zeros(batch["input_ids"].shape[0], 3, dtype=torch.long)
        return dept_model(**batch, decoder_input_ids=decoder_input_ids).logits
    return dept_model(**batch).logits


# Adapters of different m and r, vanilla prompt tuning (r = 0), and an update without a prompt (m = 0): what a bank
# and a server must mix in one batch.
ADAPTER_SIZES = {
    "long_prompt": dict(num_virtual_tokens=6, r=2, max_length=24),
    "short_prompt": dict(num_virtual_tokens=2, r=5, max_length=16),
    "prompt_tuning": dict(num_virtual_tokens=4, r=0, max_length=24),
    "update_only": dict(num_virtual_tokens=0, r=3, max_length=20),
}


def put_in_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes], commit: str, refs=("main",)) -> Path:
    """Lay `files` out as huggingface_hub caches a download: blobs named by hash, the snapshot's files linked to
    them, and each ref naming the commit."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


# ------------------------------------------------------------------------------------ text in each task's hub schema
# Tiny data in each task's real hub schema, as local files or as an in-memory hub DatasetDict:
#
#     paths = write_task_fixture("rte", tmp_path)  # {"train_file": ..., "validation_file": ..., "test_file": ...}
#     splits = load_task_datasets("rte", **paths)  # never touches the hub
#
# Labels cycle through the classes (row i has class i % num_classes), and each row's text carries a cue word for
# its class, so a tiny model can learn the tasks.

CUE_WORDS = ("red", "green", "blue")  # the cue of class 0, 1, 2
FILE_FORMATS = ("jsonl", "json", "csv", "parquet")


def hub_row(task_name: str, index: int, labeled: bool = True) -> dict[str, Any]:
    """Row `index` of a task in its hub schema; `labeled=False` gives the hub's unlabeled marker instead."""
    task = get_task(task_name)
    classes = task.num_labels if task.num_labels > 1 else len(CUE_WORDS)  # regression/QA: cues vary anyway
    cue = CUE_WORDS[index % classes]
    text = f"example {index} is {cue}"
    row: dict[str, Any] = {name: f"{name} of {text}" for name in task.schema}
    if task.name == "superglue-wsc.fixed":
        words = ["Mark", "told", "Pete", "that", "he", "was", cue, "."]
        row.update(text=" ".join(words), span1_text="Mark", span1_index=0, span2_text="he", span2_index=4)
    if task.is_extractive_qa:
        row.update(context=f"The answer of example {index} is {cue} today.", answers=[cue, f"{cue} today"])
        if not labeled:
            row["answers"] = []
        return row
    row[task.label_column] = _raw_label(task, index) if labeled else task.unlabeled_value
    if "idx" not in row and task.label_column == "label":
        row["idx"] = index  # GLUE/SuperGLUE carry an idx column; it is not required
    return row


def _raw_label(task: TaskSpec, index: int) -> Any:
    if task.is_regression:
        return (index % 11) * 0.5  # 0.0 .. 5.0
    return task.raw_labels[index % task.num_labels]


def hub_rows(task_name: str, count: int, start: int = 0, labeled: bool = True) -> list[dict[str, Any]]:
    return [hub_row(task_name, index, labeled) for index in range(start, start + count)]


def hub_dataset_dict(task_name: str, sizes: Mapping[str, int]) -> datasets.DatasetDict:
    """An in-memory stand-in for `datasets.load_dataset(hub_path, hub_config)`: `sizes` maps hub split -> rows.

    Row numbers run on across splits, so every row of the DatasetDict has different text.
    """
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = datasets.Dataset.from_list(hub_rows(task_name, size, start=start))
        start += size
    return datasets.DatasetDict(splits)


def write_task_fixture(
    task_name: str,
    directory: str | Path,
    n_train: int = 8,
    n_val: int = 4,
    n_test: int = 4,
    *,
    file_format: str = "jsonl",
    labeled_test: bool = True,
) -> dict[str, Path]:
    """Write train/validation/test files in the task's hub schema; return them as `load_task_datasets` kwargs.

    `labeled_test=False` writes the test split with the hub's unlabeled marker (-1, "" or no answers).
    MRQA cannot be written as CSV (its answers are lists).
    """
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}; got {file_format!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    paths, start = {}, 0
    for split in SPLITS:
        rows = hub_rows(task_name, sizes[split], start=start, labeled=labeled_test or split != "test")
        path = directory / f"{task_name}_{split}.{file_format}"
        write_rows(rows, path)
        paths[f"{split}_file"] = path
        start += sizes[split]
    return paths


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows as .jsonl, .json (an array), .csv or .parquet, chosen by the suffix."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        if any(isinstance(value, list) for row in rows for value in row.values()):
            raise ValueError(f"{path}: CSV cannot hold the list columns of these rows.")
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"Unsupported suffix {suffix!r}")


def text_train_argv(model_dir, output_dir, task_name, files, steps=4, **extra) -> list[str]:
    """dept-train's flags for a short DePT run (m = 4, r = 2) on local files, best checkpoint kept at the end."""
    flags = {
        "model_name_or_path": model_dir, "task_name": task_name, "output_dir": str(output_dir),
        "peft_type": "PROMPT_TUNING_LORA", "prefix_length": 4, "r": 2, "max_seq_length": 64,
        "learning_rate": 0.3, "lora_embedding_lr": 0.01, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4, "max_steps": steps, "eval_steps": steps, "save_steps": steps,
        "warmup_steps": 0, "weight_decay": 1e-5, "save_total_limit": 1, "report_to": "none", "seed": 7,
        "generation_max_length": 6, **{k: str(v) for k, v in files.items()}, **extra,
    }
    argv = ["--do_train", "--do_eval", "--do_predict", "--load_best_model_at_end", "--save_strategy", "steps",
            "--evaluation_strategy", "steps"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


# ------------------------------------------------------------------------------------ a tiny study (dept-tune)

TUNE_TASK = "sst2"


def write_tiny_task(directory: Path) -> list[str]:
    """A 2-layer T5 with a word tokenizer, and sst2 files whose rows carry a class cue, under `directory`; returns
    the training flags of a short run (8 steps, evaluated every 2)."""
    files = write_task_fixture(TUNE_TASK, directory / "data", n_train=16, n_val=8, n_test=8)
    rows = hub_rows(TUNE_TASK, 32)
    texts = [get_task(TUNE_TASK).format_example(row)[0] for row in rows]
    model_dir = save_tiny_model("seq2seq", directory / "model", texts)
    flags = {
        "model_name_or_path": model_dir, "task_name": TUNE_TASK, "output_dir": directory / "study",
        "prefix_length": 4, "r": 2, "max_seq_length": 32, "generation_max_length": 4,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "max_steps": 8, "eval_steps": 2,
        "save_steps": 2, "logging_steps": 2, "warmup_steps": 0, "report_to": "none", "seed": 0,
        **files,
    }
    argv = ["--do_predict"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> list[str]:
    """`write_tiny_task`'s flags, written once per session; each test gives its own --output_dir after them."""
    return write_tiny_task(tmp_path_factory.mktemp("tiny-task"))


# ------------------------------------------------------------------------------------ vision-language data


@dataclass
class VLFixture:
    """A synthetic dataset, its stored features, and a tiny T5 checkpoint with a tokenizer of its words."""

    root: Path
    feature_file: Path
    model_dir: Path

    def argv(self, tasks: str, output_dir: str | Path, *extra: str) -> list[str]:
        """A full training command line for a short run (flags in `extra` come last and win)."""
        data = [word for flag, path in task_file_paths(self.root).items() for word in (f"--{flag}", path)]
        return [
            "--tasks", tasks, *data, "--feature_file", str(self.feature_file),
            "--model_name_or_path", str(self.model_dir), "--output_dir", str(output_dir),
            "--peft_type", "PROMPT_TUNING_LORA", "--prefix_length", "4", "--r", "4", "--prompt_init", "vocab",
            "--max_seq_length", "24", "--max_target_length", "24", "--generation_max_length", "12",
            "--learning_rate", "0.3", "--lora_embedding_lr", "0.01",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
            "--report_to", "none", "--seed", "0", "--do_train", "--do_eval", "--do_predict", *extra,
        ]


def build_vl_fixture(directory: Path, n_images: int = 20) -> VLFixture:
    """`synthetic_vl_data` images with annotations in each official schema, their features from a random-weight
    resnet18 at 64 px (a 2 x 2 grid of 512-d regions), and a tiny T5 with a tokenizer of the data's words."""
    root = directory / "data"
    make_synthetic_vl_dataset(root, n_images=n_images, seed=0, image_size=64)
    torch.manual_seed(0)
    feature_file = directory / "features.h5"
    extract_to_h5(root, feature_file, GridFeatureExtractor("resnet18", pretrained=False, image_size=64),
                  progress=False)

    sources = TaskSources(**task_file_paths(root))
    texts = ["true false"]
    for split_rows in (load_task_splits([task], sources, VL_SPLITS) for task in VL_TASKS):
        for rows in split_rows.values():
            texts += list(rows["source"]) + list(rows["target"])
            texts += [answer for reference in rows["references"] for answer in reference["answers"]]
    model_dir = directory / "t5"
    tokenizer = build_word_tokenizer(texts, model_dir)
    torch.manual_seed(0)
    T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))).save_pretrained(model_dir)
    return VLFixture(root, feature_file, model_dir)


@pytest.fixture(scope="session")
def vl_fixture(tmp_path_factory) -> VLFixture:
    """The VL fixture of 20 images, built once per session (tests copy what they change)."""
    return build_vl_fixture(tmp_path_factory.mktemp("vl"))


# ------------------------------------------------------------------------------------ image folders (dept-train-vision)

IMAGE_CLASSES = ("blue", "green", "red")  # imagefolder sorts class folders by name
VISION_MODEL_FLAGS = ["--model_name_or_path", "vit_tiny_patch16_224", "--pretrained", "false",
                      "--model_kwargs", "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"]


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 40) -> Path:
    """Noisy images whose dominant colour is the class, one subfolder per class (grayscale and RGBA among them)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for channel, name in zip((2, 1, 0), IMAGE_CLASSES, strict=True):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                pixels[..., channel] = rng.integers(160, 256, size=(size, size), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if index == 0:
                    image = image.convert("RGBA")  # other modes become RGB
                image.save(folder / f"{index}.png")
    return root
