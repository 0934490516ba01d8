"""Arguments of the text pipeline: the model and the data. The method and training arguments come from the core."""

from __future__ import annotations

from dataclasses import dataclass, field

from dept.command_line import RunStages, check_model_name_or_path, config_flag
from dept_nlp.preprocess import CAUSAL_TEMPLATE, check_causal_template
from dept_nlp.tasks import get_task


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Base model: a hub id (t5-base) or a local directory."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    task_type: str | None = config_flag("task_type", default=None, unset="detected from the model's config")
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the hub. Off unless you ask for it."}
    )

    def __post_init__(self):
        check_model_name_or_path(self.model_name_or_path)


@dataclass
class DataArguments(RunStages):
    task_name: str = field(metadata={"help": "A task of dept_nlp.tasks.TASKS, e.g. sst2, superglue-cb, nq."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Another hub config of the task's dataset (a flag of the official CLI)."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Local training data (json/jsonl/csv/parquet)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data."})
    test_file: str | None = field(default=None, metadata={"help": "Local test data (labels optional)."})
    max_seq_length: int = config_flag("max_seq_length")
    max_target_length: int = field(
        default=20, metadata={"help": "Targets are cut at this many tokens (official: 20; MRQA answers are cut)."}
    )
    generation_max_length: int = field(
        default=20, metadata={"help": "New tokens generated when predicting (official: 20)."}
    )
    num_beams: int = field(default=1, metadata={"help": "Beam size when predicting."})
    causal_template: str = field(
        default=CAUSAL_TEMPLATE,
        metadata={"help": "Decoder-only models: the text before the target; {source} is the input (official)."},
    )
    k_shot_examples: int | None = field(
        default=None, metadata={"help": "Train on K examples, balanced by class, drawn with --seed."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a random subset of N examples (drawn with --data_seed, as official)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Validate on a random subset of N examples (drawn with --data_seed)."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Predict on a random subset of N test examples (drawn with --data_seed)."}
    )
    data_seed: int = field(default=42, metadata={"help": "Seed of the official split shuffles (42 in the paper)."})

    def __post_init__(self):
        super().__post_init__()
        get_task(self.task_name)  # an unknown name is refused here, before any data loads
        local = [self.train_file, self.validation_file, self.test_file]
        if any(local) and self.do_predict and not self.test_file:
            # A validation file is used whole (never split), so without --test_file the test split would silently
            # come from the hub instead of the user's data.
            raise ValueError(
                "--do_predict with local data needs --test_file: a local training or validation file is never "
                "split into a test set. Pass --test_file (labels optional), or drop --do_predict."
            )
        if self.do_train and any(local) and not self.train_file:
            raise ValueError("--do_train with local data needs --train_file.")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.k_shot_examples is not None and self.k_shot_examples < 1:
            raise ValueError(f"--k_shot_examples must be >= 1, got {self.k_shot_examples}.")
        check_causal_template(self.causal_template)
        if self.max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be >= 1, got {self.max_seq_length}.")
