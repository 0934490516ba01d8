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

import json
import logging
from pathlib import Path

from dept.command_line import MethodArguments
from dept.config import TRAINING_TASK_NAME, ConfigError
from dept.errors import FlagError
from dept.trainer import Trainer
from dept.training_args import TrainingArguments
from dept_vl.arguments import VLDataArguments, VLModelArguments
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
from dept_vl.modeling import build_vl_model, load_tokenizer, trainable_parameter_report
from dept_vl.tasks import load_task_splits
from dept_vl.vision_backbone import (
    TASK_FILE_KEY,
    VisionBackboneArguments,
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
