"""`dept-train-vl` / `scripts/train_vl.py`: train, evaluate and predict VQA, GQA, NLVR2 and COCO captions.

The flags are the text CLI's where they mean the same thing, and `--config FILE.yaml` supplies defaults that
flags on the command line override:

    accelerate launch scripts/train_vl.py --config configs/vl/vqa.yaml --max_steps 2000
    accelerate launch scripts/train_vl.py --tasks vqa,gqa,nlvr,caption --model_name_or_path t5-base \\
        --vqa_dir data/vqa --gqa_dir data/gqa --nlvr_dir data/nlvr2 --caption_file data/dataset_coco.json \\
        --feature_file data/features.h5 --peft_type PROMPT_TUNING_LORA --prefix_length 40 --r 45 \\
        --do_train --do_eval --do_predict --output_dir outputs/vl-multitask

With `--vision_backbone vit_base_patch16_224 --image_dir data/images` (instead of `--feature_file`) the features
come from that ViT inside the model, tuned with visual DePT next to the text adapter (`dept_vl.vision_backbone`).

`main` is the console script (the results as JSON once on stdout and exit status 0, or a one-line message and
status 2; see `dept.command_line.console`); `train` is the same run for Python callers, which returns the results
and raises errors as they are.
"""

from __future__ import annotations

import sys

from dept.command_line import run_command_line, run_console
from dept_vl.arguments import ARGUMENT_TYPES
from dept_vl.pipeline import run


def train(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the flags, train/evaluate/predict and return the results."""
    return run_command_line(ARGUMENT_TYPES, run, argv)


def main(argv: list[str] | None = None) -> int:
    return run_console("dept-train-vl", train, argv)


if __name__ == "__main__":
    sys.exit(main())
