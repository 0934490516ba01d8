"""Arguments of the vision-language pipeline: the model and the data. The method and training arguments come from
the core, the ViT's from `dept_vl.vision_backbone`."""

from __future__ import annotations

from dataclasses import dataclass, field

from dept.command_line import MethodArguments, RunStages, check_model_name_or_path, config_flag
from dept.training_args import TrainingArguments
from dept_vl.tasks import TaskSources, parse_task_names
from dept_vl.vision_backbone import VisionBackboneArguments


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


ARGUMENT_TYPES = (VLModelArguments, VLDataArguments, MethodArguments, TrainingArguments, VisionBackboneArguments)
"""The flags' dataclasses, in the order `dept_vl.pipeline.run` takes them (`dept-tune` parses the same)."""
