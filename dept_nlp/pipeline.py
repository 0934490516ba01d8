"""One text run, top to bottom: data, model, method, the shared trainer, result files.

    >>> from dept_nlp.pipeline import run
    >>> results = run(model_args, data_args, method_args, training_args)  # the CLI fills these  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dept.command_line import MethodArguments
from dept.config import TRAINING_TASK_NAME, ConfigError
from dept.methods import LoraSettings, count_trainable_parameters, prepare_model
from dept.trainer import Trainer
from dept.training_args import TrainingArguments
from dept_nlp.arguments import DataArguments, ModelArguments
from dept_nlp.data_files import load_task_datasets, split_is_shuffled, subsample
from dept_nlp.evaluate import TextEvaluator
from dept_nlp.modeling import load_model, load_tokenizer, resolve_task_type
from dept_nlp.preprocess import TextCollator, tokenize_rows
from dept_nlp.sampling import STSB_K_SHOT_THRESHOLD, k_shot_sample
from dept_nlp.tasks import get_task

logger = logging.getLogger(__name__)



def needed_splits(data_args: DataArguments) -> tuple[str, ...]:
    # Training evaluates on the validation split it has: the hub's when the training data come from the hub, else
    # only a --validation_file (as --do_predict with local data needs --test_file). Without one it evaluates nothing.
    validate_training = data_args.do_train and (data_args.validation_file is not None or data_args.train_file is None)
    wanted = {"train": data_args.do_train, "validation": validate_training or data_args.do_eval,
              "test": data_args.do_predict}
    return tuple(split for split, needed in wanted.items() if needed)


def load_splits(data_args: DataArguments, seed: int):
    """The task's formatted splits, with the k-shot and debugging cuts applied."""
    data = load_task_datasets(
        data_args.task_name, dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file, validation_file=data_args.validation_file, test_file=data_args.test_file,
        seed=data_args.data_seed, splits=needed_splits(data_args),
    )
    task = get_task(data_args.task_name)
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
            "test": data_args.max_predict_samples}
    for split in data:  # the official order: the debugging cut first, then the k-shot sample
        data[split] = subsample(data[split], caps[split], data_args.data_seed,
                                already_shuffled=split_is_shuffled(task, split, files[split] is not None))
    if "train" in data and data_args.k_shot_examples:
        threshold = STSB_K_SHOT_THRESHOLD if task.is_regression else None
        data["train"] = k_shot_sample(data["train"], data_args.k_shot_examples, seed, score_threshold=threshold)
    return data


def build_model(model_args: ModelArguments, method_args: MethodArguments, task, max_length: int, seed: int):
    """(tokenizer, task_type, model ready to train with the chosen method)."""
    task_type = resolve_task_type(model_args.model_name_or_path, model_args.task_type,
                                  trust_remote_code=model_args.trust_remote_code)
    if task_type == "cls" and task.is_extractive_qa:
        raise ConfigError(f"{task.name} needs a generated answer: use an encoder-decoder or decoder-only model.")
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path,
                               trust_remote_code=model_args.trust_remote_code)
    base = load_model(model_args.model_name_or_path, task_type, num_labels=max(task.num_labels, 1),
                      trust_remote_code=model_args.trust_remote_code)
    dept_config = method_args.dept_config(max_length, task_type, model_args.model_name_or_path, seed)
    model = prepare_model(base, method_args.peft_type, dept_config=dept_config, tokenizer=tokenizer,
                          peft_model_id=method_args.peft_model_id, lora=LoraSettings(r=method_args.lora_r))
    return tokenizer, task_type, model


def run(model_args: ModelArguments, data_args: DataArguments, method_args: MethodArguments,
        training_args: TrainingArguments, on_evaluate=None) -> dict[str, float]:
    task = get_task(data_args.task_name)
    data = load_splits(data_args, training_args.seed)
    tokenizer, task_type, model = build_model(model_args, method_args, task, data_args.max_seq_length,
                                           training_args.seed)
    logger.info("Trainable parameters: %s", count_trainable_parameters(model))
    tokenized = {
        split: tokenize_rows(rows, tokenizer, task_type, data_args.max_seq_length, data_args.max_target_length, split,
                             causal_template=data_args.causal_template)
        for split, rows in data.items()
    }
    evaluator = TextEvaluator(task, tokenizer, task_type, data_args.generation_max_length, data_args.num_beams,
                              max_target_length=data_args.max_target_length)
    trainer = Trainer(
        model, training_args, collate_fn=TextCollator(tokenizer, task_type), evaluator=evaluator,
        train_dataset=tokenized.get("train"), eval_dataset=tokenized.get("validation"),
        test_dataset=tokenized.get("test"), on_evaluate=on_evaluate,
    )
    logger.info("Running %s with %s on %d process(es).", task.name, method_args.peft_type,
                trainer.accelerator.num_processes)
    results: dict[str, float] = {}
    if data_args.do_train:
        results.update(trainer.train())
        if trainer.accelerator.is_main_process:
            write_task_file(training_args.output_dir, task, model_args, task_type,
                            data_args.causal_template if task_type == "causal" else None)
    if data_args.do_eval:
        results.update(trainer.evaluate(tokenized["validation"], split="eval"))
    if data_args.do_predict:
        results.update(trainer.predict(tokenized["test"], split="test")[1])
    return results


def write_task_file(output_dir: str, task, model_args: ModelArguments, task_type: str,
                    causal_template: str | None = None) -> None:
    record = {"task_names": [task.name], "modality": "text", "label_words": task.label_words,
              "model_name_or_path": model_args.model_name_or_path, "task_type": task_type,
              "causal_template": causal_template}
    Path(output_dir, TRAINING_TASK_NAME).write_text(json.dumps(record, indent=2) + "\n")
