"""One vision-language run, top to bottom: tasks, features, VL-T5, method, the shared trainer, result files.

    >>> from dept_vl.pipeline import run
    >>> results = run(model_args, data_args, method_args, training_args)  # the CLI fills these  # doctest: +SKIP

The flags mean what they mean in the text pipeline (`--peft_type`, `--max_seq_length`, `--do_train`, ...), and
the run writes the same files (the trainer's result files, `predictions_<split>.jsonl`, the adapter), plus
`training_task.json` for `dept-eval`. With `--vision_backbone` the image features come from a ViT inside the
model, tuned with visual DePT next to the text adapter (`dept_vl.vision_backbone`); its adapter is saved in
`vision_adapter/`.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from dept.command_line import MethodArguments, RunStages, check_model_name_or_path, config_flag
from dept.config import TRAINING_TASK_NAME, ConfigError
from dept.errors import FlagError
from dept.model import DePTModel
from dept.trainer import Trainer
from dept.training_args import TrainingArguments
from dept_vl.data import (
    VLCollator,
    VLImageCollator,
    build_feature_sources,
    check_features_cover,
    check_images_load,
    feature_dim,
    parse_per_task,
    tokenize_vl_rows,
)
from dept_vl.evaluate import VLEvaluator
from dept_vl.features import ImagePixels
from dept_vl.model import VISUAL_MODULE, VLT5Config, VLT5ForConditionalGeneration, prepare_vl_model
from dept_vl.tasks import TASKS, TaskSources, load_task_splits, parse_task_names
from dept_vl.vision_backbone import (
    TASK_FILE_KEY,
    VisionBackboneArguments,
    VLT5WithVisionBackbone,
    attach_vision_backbone,
    backbone_record,
    check_backbone_weights,
    check_pair_flags,
    check_vision_flags,
    create_vision_backbone,
    vit_transform,
)

logger = logging.getLogger(__name__)

TASK_FILE = TRAINING_TASK_NAME  # what the adapter was trained on, for dept-eval's checks


@dataclass
class VLModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A T5 checkpoint (t5-base) or a saved VL-T5; the visual layers are added if missing."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    train_visual_embedding: bool = field(
        default=True, metadata={"help": "Train the visual projection with the method (as VL-Adapter does)."}
    )
    visual_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the visual projection (DePT/PT); default lora_embedding_lr."}
    )

    def __post_init__(self):
        check_model_name_or_path(self.model_name_or_path)


@dataclass
class VLDataArguments(RunStages):
    tasks: str = field(metadata={"help": "vqa, gqa, nlvr, caption, or several comma-separated (one multitask adapter)."})
    vqa_dir: str | None = field(default=None, metadata={"help": "Directory of the VQAv2 question/annotation JSONs."})
    gqa_dir: str | None = field(default=None, metadata={"help": "Directory of GQA's *_balanced_questions.json."})
    nlvr_dir: str | None = field(default=None, metadata={"help": "Directory of NLVR2's train/dev/test1.json."})
    caption_file: str | None = field(default=None, metadata={"help": "Karpathy's dataset_coco.json."})
    feature_file: str | None = field(
        default=None, metadata={"help": "Region features (.h5/.npy/npz dir) for every task, or task=path,...; join files with +."}
    )
    image_dir: str | None = field(
        default=None, metadata={"help": "Raw images (features on the fly with --backbone), or task=dir,..."}
    )
    backbone: str = field(default="resnet50", metadata={"help": "timm backbone for features on the fly."})
    pretrained: bool = field(default=True, metadata={"help": "Use the backbone's pretrained weights."})
    image_size: int | None = field(default=None, metadata={"help": "Backbone input size (default: its own)."})
    max_seq_length: int = config_flag("max_seq_length", default=64)
    max_target_length: int = field(default=32, metadata={"help": "Longest target in tokens."})
    generation_max_length: int = field(default=20, metadata={"help": "New tokens generated when predicting."})
    num_beams: int = field(default=1, metadata={"help": "Beam size when predicting (VL-T5 captions: 5)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cut each task's training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cut each task's validation and test."})
    data_seed: int = field(default=42, metadata={"help": "Seed of the VQA val2014 validation/test split."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be >= 1, got {self.max_seq_length}.")
        self.task_names = parse_task_names(self.tasks)
        self.sources = TaskSources(self.vqa_dir, self.gqa_dir, self.nlvr_dir, self.caption_file)

    def needed_splits(self) -> tuple[str, ...]:
        wanted = {"train": self.do_train, "validation": self.do_train or self.do_eval, "test": self.do_predict}
        return tuple(split for split, needed in wanted.items() if needed)


# --------------------------------------------------------------------------------------------------- the model


def load_vl_base_model(model_name_or_path: str, feat_dim: int) -> VLT5ForConditionalGeneration:
    """A T5 checkpoint with fresh visual layers for `feat_dim` features, or a saved VL-T5 checked against it."""
    config = AutoConfig.from_pretrained(model_name_or_path)
    if isinstance(config, VLT5Config) and config.feat_dim != feat_dim:
        raise ConfigError(
            f"{model_name_or_path} is a VL-T5 for {config.feat_dim}-dimensional features, but the features are "
            f"{feat_dim}-dimensional: use features from the backbone it was trained with."
        )
    n_images = max(TASKS[name].n_images for name in TASKS)
    return VLT5ForConditionalGeneration.from_pretrained(model_name_or_path, feat_dim=feat_dim, n_images=n_images)


def build_vl_model(model_args: VLModelArguments, method_args: MethodArguments, tokenizer, feat_dim: int,
                   max_length: int, seed: int):
    """The VL-T5 model ready to train with the chosen method (the one switch of `dept.methods`)."""
    base = load_vl_base_model(model_args.model_name_or_path, feat_dim)
    dept_config = method_args.dept_config(max_length, "seq2seq", model_args.model_name_or_path, seed)
    model = prepare_vl_model(base, method_args.peft_type, dept_config=dept_config, tokenizer=tokenizer,
                             peft_model_id=method_args.peft_model_id, lora_r=method_args.lora_r,
                             train_visual_embedding=model_args.train_visual_embedding)
    if model_args.visual_lr is not None and isinstance(model, DePTModel):
        # The trainer asks for the groups with the two DePT rates only; this fixes the modules' own rate.
        model.optimizer_param_groups = functools.partial(model.optimizer_param_groups, modules_lr=model_args.visual_lr)
    elif model_args.visual_lr is not None:
        raise ConfigError(f"--visual_lr applies to DePT and prompt tuning, not to --peft_type {method_args.peft_type}.")
    return model


def trainable_parameter_report(model) -> dict[str, int]:
    """Trainable parameters by part: DePT's prompt P and A, B (when present), the visual projection, the ViT's
    P and A, B when it is tuned inside the model (`vision_prompt`, `vision_lora_embedding`), the rest."""
    if isinstance(model, VLT5WithVisionBackbone):
        text = trainable_parameter_report(model.vl_model)
        report = {k: v for k, v in text.items() if k not in ("total", "other")} | model.vision_parameter_report()
        parts = sum(report.values())
        report["total"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        report["other"] = report["total"] - parts
        return report
    if isinstance(model, DePTModel):
        counts = model.num_trainable_parameters()
        report = {"prompt": counts["prompt"], "lora_embedding": counts["lora_embedding"]}
    else:
        report = {}
    trainable = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    report[VISUAL_MODULE] = sum(n for name, n in trainable if f"{VISUAL_MODULE}." in name)
    report["total"] = sum(n for _, n in trainable)
    report["other"] = report["total"] - sum(v for k, v in report.items() if k != "total")
    return report


# --------------------------------------------------------------------------------------------------- the data


def load_tokenizer(model_args: VLModelArguments):
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        raise ConfigError(f"The tokenizer of {model_args.model_name_or_path} has no pad token; T5's tokenizers do.")
    return tokenizer


def build_vl_eval_components(task_name: str, tokenizer, model=None, *, max_length: int, split: str,
                             data_args: VLDataArguments):
    """(dataset, collate_fn, evaluator) to evaluate an adapter on one split of one task, for `dept-eval`.

    Args:
        task_name: one of `dept_vl.tasks.TASKS`.
        tokenizer: the base model's tokenizer.
        model: if given, its visual feature size is checked against the features' size.
        max_length: the adapter's s (inputs are cut there).
        split: "validation" or "test" (or "train").
        data_args: where the task files and features are (`--vqa_dir ... --feature_file/--image_dir`), and the
            generation settings (`generation_max_length`, `num_beams`, `max_eval_samples`).
    """
    rows = load_task_splits([task_name], data_args.sources, [split], data_args.data_seed,
                            max_eval_samples=data_args.max_eval_samples)[split]
    sources = build_feature_sources([task_name], data_args.feature_file, data_args.image_dir, data_args.backbone,
                                    data_args.pretrained, data_args.image_size)
    check_features_cover(rows, sources, split)
    check_images_load({split: rows}, sources)
    if model is not None:
        expected = _model_feat_dim(model)
        found = feature_dim(sources[task_name], rows[0]["image_ids"][0])
        if expected is not None and expected != found:
            raise ConfigError(f"The model reads {expected}-dimensional features, but {task_name}'s are {found}-d.")
    dataset = tokenize_vl_rows(rows, tokenizer, max_length, data_args.max_target_length, split)
    evaluator = VLEvaluator([task_name], tokenizer, data_args.generation_max_length, data_args.num_beams)
    return dataset, VLCollator(tokenizer, sources), evaluator


def _model_feat_dim(model) -> int | None:
    for module in model.modules():
        if isinstance(module, VLT5ForConditionalGeneration):
            return module.config.feat_dim
    return None


# --------------------------------------------------------------------------------------------------- the run


def run(model_args: VLModelArguments, data_args: VLDataArguments, method_args: MethodArguments,
        training_args: TrainingArguments, vision_args: VisionBackboneArguments | None = None,
        on_evaluate=None) -> dict[str, float]:
    """One run; with `vision_args.vision_backbone` the features come from that ViT inside the model, tuned with
    the text adapter (`dept_vl.vision_backbone`), else from `--feature_file` / `--image_dir` as they are."""
    vision = vision_args if vision_args is not None and vision_args.vision_backbone else None
    if vision is not None:
        check_vision_flags(vision, data_args)
    check_pair_flags(method_args.peft_model_id, vision_args)
    task_names = data_args.task_names
    data = load_task_splits(task_names, data_args.sources, data_args.needed_splits(), data_args.data_seed,
                            data_args.max_train_samples, data_args.max_eval_samples)
    if vision is None:
        sources, feat_dim = open_feature_sources(task_names, data, data_args)
    else:
        vit = create_vision_backbone(vision.vision_backbone, data_args.pretrained, data_args.image_size,
                                     seed=training_args.seed)
        check_backbone_weights(vit, method_args.peft_model_id)
        sources, feat_dim = open_image_sources(task_names, data, data_args, vit), vit.num_features

    tokenizer = load_tokenizer(model_args)
    model = build_vl_model(model_args, method_args, tokenizer, feat_dim, data_args.max_seq_length, training_args.seed)
    if vision is None:
        collate_fn = VLCollator(tokenizer, sources)
    else:
        model = attach_vision_backbone(model, vit, vision, method_args.peft_model_id, training_args.seed)
        collate_fn = VLImageCollator(tokenizer, sources, n_regions=model.n_regions)
    logger.info("Trainable parameters: %s", trainable_parameter_report(model))
    tokenized = {
        split: tokenize_vl_rows(rows, tokenizer, data_args.max_seq_length, data_args.max_target_length, split)
        for split, rows in data.items()
    }
    evaluator = VLEvaluator(task_names, tokenizer, data_args.generation_max_length, data_args.num_beams)
    trainer = Trainer(
        model, training_args, collate_fn=collate_fn, evaluator=evaluator,
        train_dataset=tokenized.get("train"), eval_dataset=tokenized.get("validation"),
        test_dataset=tokenized.get("test"), on_evaluate=on_evaluate,
    )
    results: dict[str, float] = {}
    if data_args.do_train:
        results.update(trainer.train())
        if trainer.accelerator.is_main_process:
            write_task_file(training_args.output_dir, task_names, model_args, feat_dim, trainable_parameter_report(model),
                            image_features(data_args) if vision is None else None,
                            backbone_record(model, vision, data_args.pretrained) if vision is not None else None)
            if method_args.peft_type == "FULL":  # the output is a whole model: make it loadable with its tokenizer
                tokenizer.save_pretrained(training_args.output_dir)
    if data_args.do_eval:
        results.update(trainer.evaluate(tokenized["validation"], split="eval"))
    if data_args.do_predict:
        results.update(trainer.predict(tokenized["test"], split="test")[1])
    return results


def open_feature_sources(task_names: list[str], data: dict, data_args: VLDataArguments) -> tuple[dict, int]:
    """Each task's stored (or frozen on-the-fly) features, checked to cover the data, and their one size."""
    sources = build_feature_sources(task_names, data_args.feature_file, data_args.image_dir, data_args.backbone,
                                    data_args.pretrained, data_args.image_size)
    for split, rows in data.items():
        check_features_cover(rows, sources, split)
    check_images_load(data, sources)
    feat_dims = {task: feature_dim(sources[task]) for task in task_names}
    if len(set(feat_dims.values())) != 1:
        raise ConfigError(f"The tasks' features differ in size {feat_dims}: one model needs one feature size.")
    return sources, next(iter(feat_dims.values()))


def open_image_sources(task_names: list[str], data: dict, data_args: VLDataArguments, vit) -> dict:
    """Each task's images, preprocessed for `vit` as grid features are, checked to cover the data and to load."""
    image_dirs = parse_per_task(data_args.image_dir, task_names, "image_dir")
    missing = [task for task in task_names if task not in image_dirs]
    if missing:
        raise FlagError(f"No images for task(s) {missing}: --vision_backbone reads them from --image_dir.")
    transform = vit_transform(vit)
    opened = {path: ImagePixels(path, transform) for path in set(image_dirs.values())}
    sources = {task: opened[image_dirs[task]] for task in task_names}
    for split, rows in data.items():
        check_features_cover(rows, sources, split)
    check_images_load(data, sources)
    return sources


def image_features(data_args: VLDataArguments) -> dict | None:
    """The backbone settings that made the training features from raw images (`--image_dir`), so that a server
    turns an uploaded image into the same features; None when the features came from files."""
    if not data_args.image_dir:
        return None
    return {"backbone": data_args.backbone, "pretrained": data_args.pretrained, "image_size": data_args.image_size}


def write_task_file(output_dir: str, task_names: list[str], model_args: VLModelArguments, feat_dim: int,
                    trainable: dict[str, int], features: dict | None = None,
                    vision_backbone: dict | None = None) -> None:
    record = {"task_names": task_names, "modality": "vl", "model_name_or_path": model_args.model_name_or_path,
              "feat_dim": feat_dim, "trainable_parameters": trainable}
    if features is not None:
        record["image_features"] = features
    if vision_backbone is not None:  # the ViT tuned inside the model, its adapter in vision_adapter/
        record[TASK_FILE_KEY] = vision_backbone
    Path(output_dir, TASK_FILE).write_text(json.dumps(record, indent=2) + "\n")
