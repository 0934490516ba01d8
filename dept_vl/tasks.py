"""The vision-language tasks of VL-T5 / VL-Adapter, read from their official files into `datasets` rows.

Every task gives rows of one schema, so that tasks mix into one multitask training set:

    task        "vqa" | "gqa" | "nlvr" | "caption"
    source      the text input with VL-T5's task prefix: "vqa: {question}", "gqa: {question}", "nlvr: {sentence}",
                "caption:"
    target      what the model learns to generate
    image_ids   the feature ids of the example's images (two for NLVR2), i.e. the image file stems
    references  {"task", "answers", "example_id", "answer_type"}: what the evaluator scores against (all 10 VQA
                answers, all reference captions, ...), with the task so a multitask evaluation can score each task
                apart; `answer_type` is VQA's ("yes/no", "number", "other"), "" elsewhere

Files and splits (`load_task_splits`):

- vqa (VQAv2): `v2_OpenEnded_mscoco_{train2014,val2014}_questions.json` and `v2_mscoco_*_annotations.json` in
  `vqa_dir`. Train on train2014; val2014 is split by image (shuffled with `data_seed`) into validation and test
  halves, so no image is in both. The target is the official `multiple_choice_answer` (the most common answer),
  or the most common normalised human answer when a file lacks it; the score uses all 10 answers.
- gqa: `{train,val,testdev}_balanced_questions.json` in `gqa_dir` -> train, validation, test.
- nlvr (NLVR2): JSON lines `{train,dev,test1}.json` in `nlvr_dir` -> train, validation, test. The images of
  `split-set-pair-sentence` are `split-set-pair-img0` and `-img1`; the target is "true" / "false".
- caption (COCO, Karpathy split): `dataset_coco.json`. Train on every caption of the `train` and `restval`
  images (one row per caption); validation and test (`val`, `test`) have one row per image, scored against
  all its captions.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dept.extras import LazyModule
from dept_vl.metrics import normalize_vqa_answer

datasets = LazyModule("datasets")  # imported on first use: it costs a third of `import torch` at start-up

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class VLTaskSpec:
    """One task: its name, how its input starts, and the metrics the evaluator reports for it."""

    name: str
    prefix: str
    metrics: tuple[str, ...]
    main_metric: str
    n_images: int = 1


TASKS: dict[str, VLTaskSpec] = {
    "vqa": VLTaskSpec("vqa", "vqa:", ("accuracy",), "accuracy"),
    "gqa": VLTaskSpec("gqa", "gqa:", ("accuracy",), "accuracy"),
    "nlvr": VLTaskSpec("nlvr", "nlvr:", ("accuracy", "consistency"), "accuracy", n_images=2),
    "caption": VLTaskSpec("caption", "caption:", ("bleu4", "cider"), "cider"),
}


def parse_task_names(tasks: str | Iterable[str]) -> list[str]:
    """'vqa,gqa' or ["vqa", "gqa"] -> ["vqa", "gqa"], each checked against `TASKS`."""
    names = [name.strip() for name in (tasks.split(",") if isinstance(tasks, str) else tasks) if name.strip()]
    if not names:
        raise ValueError(f"No task given: pass --tasks with one or more of {sorted(TASKS)}, comma-separated.")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"Unknown vision-language task(s) {unknown}: choose from {sorted(TASKS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks names a task twice: {names}.")
    return names


def _row(task: str, source: str, target: str, image_ids: list[str], answers: list[str], example_id,
         answer_type: str = "") -> dict:
    # answer_type: VQA's "yes/no", "number" or "other", for the official per-type accuracy; "" for other tasks.
    return {
        "task": task,
        "source": source,
        "target": target,
        "image_ids": image_ids,
        "references": {"task": task, "answers": answers, "example_id": str(example_id), "answer_type": answer_type},
    }


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist. Check the directory flag of this task.")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------------------ VQA


def coco_feature_id(image_id: int, subset: str) -> str:
    """VQA's numeric image id -> the COCO file stem that names its features: 100 -> COCO_train2014_000000000100."""
    return f"COCO_{subset}_{int(image_id):012d}"


def vqa_target(annotation: Mapping) -> str:
    """The answer to train on: the official `multiple_choice_answer`, else the most common normalised answer."""
    if annotation.get("multiple_choice_answer"):
        return annotation["multiple_choice_answer"]
    counts = Counter(normalize_vqa_answer(a["answer"]) for a in annotation["answers"])
    return counts.most_common(1)[0][0]


def read_vqa(questions_file: str | Path, annotations_file: str | Path | None) -> list[dict]:
    """Rows of one VQAv2 subset. Without annotations (test-dev / test) the rows have no target."""
    questions = _read_json(Path(questions_file), "VQA questions")
    subset = questions.get("data_subtype")
    if not subset:
        raise ValueError(f"{questions_file} has no 'data_subtype' (e.g. 'train2014'): is it a VQAv2 questions file?")
    annotations = {}
    if annotations_file is not None:
        data = _read_json(Path(annotations_file), "VQA annotations")
        annotations = {a["question_id"]: a for a in data["annotations"]}
    rows = []
    for question in questions["questions"]:
        annotation = annotations.get(question["question_id"])
        if annotations and annotation is None:
            raise ValueError(f"{annotations_file} has no annotation for question_id {question['question_id']}.")
        answers = [a["answer"] for a in annotation["answers"]] if annotation else []
        target = vqa_target(annotation) if annotation else ""
        answer_type = (annotation.get("answer_type") or "") if annotation else ""
        rows.append(_row("vqa", f"vqa: {question['question']}", target,
                         [coco_feature_id(question["image_id"], subset)], answers, question["question_id"],
                         answer_type))
    return rows


def _halves_by_image(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows into two halves by image (shuffled with `seed`), so no image lands in both."""
    images = sorted({row["image_ids"][0] for row in rows})
    random.Random(seed).shuffle(images)
    first = set(images[: len(images) // 2])
    return [r for r in rows if r["image_ids"][0] in first], [r for r in rows if r["image_ids"][0] not in first]


def load_vqa(vqa_dir: str | Path, splits: Iterable[str], seed: int) -> dict[str, list[dict]]:
    vqa_dir = Path(vqa_dir)

    def subset(name: str) -> list[dict]:
        return read_vqa(vqa_dir / f"v2_OpenEnded_mscoco_{name}_questions.json",
                        vqa_dir / f"v2_mscoco_{name}_annotations.json")

    splits = set(splits)
    out = {}
    if "train" in splits:
        out["train"] = subset("train2014")
    if splits & {"validation", "test"}:
        out["validation"], out["test"] = _halves_by_image(subset("val2014"), seed)
    return {split: rows for split, rows in out.items() if split in splits}


# ------------------------------------------------------------------------------------------------------------ GQA

GQA_FILES = {"train": "train_balanced_questions.json", "validation": "val_balanced_questions.json",
             "test": "testdev_balanced_questions.json"}


def read_gqa(path: str | Path) -> list[dict]:
    """Rows of a GQA questions file, `{question_id: {"imageId", "question", "answer", ...}}`."""
    data = _read_json(Path(path), "GQA questions")
    return [_row("gqa", f"gqa: {q['question']}", q.get("answer", ""), [str(q["imageId"])],
                 [q["answer"]] if "answer" in q else [], question_id)
            for question_id, q in data.items()]


def load_gqa(gqa_dir: str | Path, splits: Iterable[str]) -> dict[str, list[dict]]:
    return {split: read_gqa(Path(gqa_dir) / GQA_FILES[split]) for split in splits}


# ---------------------------------------------------------------------------------------------------------- NLVR2

NLVR_FILES = {"train": "train.json", "validation": "dev.json", "test": "test1.json"}


def nlvr_image_ids(identifier: str) -> list[str]:
    """'dev-850-0-1' -> ['dev-850-0-img0', 'dev-850-0-img1']: the pair's images, named as in the release."""
    stem, dash, _sentence = identifier.rpartition("-")
    if not dash:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not of the form split-set_id-pair_id-sentence_id.")
    return [f"{stem}-img0", f"{stem}-img1"]


def read_nlvr(path: str | Path) -> list[dict]:
    """Rows of an NLVR2 JSON-lines file; the target is the label lower-cased ("true" / "false")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NLVR2 data: {path} does not exist. Check --nlvr_dir.")
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_number} is not a JSON line ({err}); NLVR2 files hold one per line.") from None
        label = str(example.get("label", "")).lower()
        rows.append(_row("nlvr", f"nlvr: {example['sentence']}", label, nlvr_image_ids(example["identifier"]),
                         [label] if label else [], example["identifier"]))
    return rows


def load_nlvr(nlvr_dir: str | Path, splits: Iterable[str]) -> dict[str, list[dict]]:
    return {split: read_nlvr(Path(nlvr_dir) / NLVR_FILES[split]) for split in splits}


# ------------------------------------------------------------------------------------------------- COCO captions

KARPATHY_SPLITS = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}


def load_captions(karpathy_file: str | Path, splits: Iterable[str]) -> dict[str, list[dict]]:
    """Karpathy's `dataset_coco.json`: one training row per caption; one evaluation row per image."""
    images = _read_json(Path(karpathy_file), "Karpathy COCO captions")["images"]
    out = {}
    for split in splits:
        rows = []
        for image in images:
            if image["split"] not in KARPATHY_SPLITS[split]:
                continue
            captions = [sentence["raw"].strip() for sentence in image["sentences"]]
            feature_id = Path(image["filename"]).stem
            targets = captions if split == "train" else captions[:1]  # eval: the loss on one, the score on all
            rows += [_row("caption", "caption:", target, [feature_id], captions, image.get("cocoid", image["imgid"]))
                     for target in targets]
        out[split] = rows
    return out


# ---------------------------------------------------------------------------------------------------- all tasks


@dataclass
class TaskSources:
    """Where each task's official files are. Only the tasks being run need theirs."""

    vqa_dir: str | None = None
    gqa_dir: str | None = None
    nlvr_dir: str | None = None
    caption_file: str | None = None

    def required(self, task: str) -> str:
        flag = {"vqa": "vqa_dir", "gqa": "gqa_dir", "nlvr": "nlvr_dir", "caption": "caption_file"}[task]
        value = getattr(self, flag)
        if not value:
            raise ValueError(f"Task {task!r} needs --{flag} (the directory or file of its official data).")
        return value


def load_task_rows(task: str, sources: TaskSources, splits: Iterable[str], seed: int = 42) -> dict[str, list[dict]]:
    """The rows of one task for the given splits (a subset of `SPLITS`)."""
    splits = list(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown}: choose from {SPLITS}.")
    location = sources.required(task)
    if task == "vqa":
        return load_vqa(location, splits, seed)
    if task == "gqa":
        return load_gqa(location, splits)
    if task == "nlvr":
        return load_nlvr(location, splits)
    return load_captions(location, splits)


def load_task_splits(
    task_names: list[str],
    sources: TaskSources,
    splits: Iterable[str],
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> dict[str, datasets.Dataset]:
    """The multitask mixture: per split, the rows of every task concatenated into one `datasets.Dataset`.

    With several tasks this is VL-Adapter's multitask setting: one training set of all tasks (the trainer
    shuffles it), and evaluation sets whose rows the evaluator scores per task. The sample caps apply per task.
    """
    per_split: dict[str, list[dict]] = {split: [] for split in splits}
    for task in task_names:
        for split, rows in load_task_rows(task, sources, splits, seed).items():
            cap = max_train_samples if split == "train" else max_eval_samples
            if not rows:
                raise ValueError(f"Task {task!r} has no {split} examples in its data files.")
            per_split[split] += rows[:cap] if cap else rows
    return {split: datasets.Dataset.from_list(rows) for split, rows in per_split.items()}
