"""`dept-train` / `scripts/train_nlp.py`: the official DePT command line, verbatim, plus `--config FILE.yaml`.

    accelerate launch scripts/train_nlp.py --peft_type PROMPT_TUNING_LORA --prefix_length 60 --r 30 \\
        --learning_rate 3e-1 --lora_embedding_lr 5e-3 --task_name sst2 --model_name_or_path t5-base \\
        --do_train --do_eval --do_predict --max_seq_length 256 --max_steps 30000 --output_dir outputs/sst2
"""

from __future__ import annotations

import json
import logging

from dept.arguments import MethodArguments, parse_arguments
from dept.training_args import TrainingArguments
from dept_nlp.arguments import FLAG_ALIASES, DataArguments, ModelArguments
from dept_nlp.pipeline import run


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, method_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, MethodArguments, TrainingArguments), argv, FLAG_ALIASES
    )
    results = run(model_args, data_args, method_args, training_args)
    print(json.dumps(results, indent=2, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
