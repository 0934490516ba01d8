"""`dept-train` / `scripts/train_nlp.py`: the official DePT command line, verbatim, plus `--config FILE.yaml`.

    accelerate launch scripts/train_nlp.py --peft_type PROMPT_TUNING_LORA --prefix_length 60 --r 30 \\
        --learning_rate 3e-1 --lora_embedding_lr 5e-3 --task_name sst2 --model_name_or_path t5-base \\
        --do_train --do_eval --do_predict --max_seq_length 256 --max_steps 30000 --output_dir outputs/sst2

`main` is the console script (the results as JSON once on stdout and exit status 0, or a one-line message and
status 2; see `dept.command_line.console`); `train` is the same run for Python callers, which returns the results
and raises errors as they are.
"""

from __future__ import annotations

import sys

from dept.command_line import MethodArguments, run_command_line, run_console
from dept.training_args import TrainingArguments
from dept_nlp.arguments import DataArguments, ModelArguments
from dept_nlp.pipeline import run


def train(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the flags, train/evaluate/predict and return the results."""
    return run_command_line((ModelArguments, DataArguments, MethodArguments, TrainingArguments), run, argv)


def main(argv: list[str] | None = None) -> int:
    return run_console("dept-train", train, argv)


if __name__ == "__main__":
    sys.exit(main())
