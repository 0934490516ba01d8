"""Train with DeepSpeed ZeRO on the CPU (DS_ACCELERATOR=cpu), then resume a copy of the run from its first
checkpoint, both in this one process; tests/dept/test_deepspeed_cpu.py launches it under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 1 tests/dept/launch_deepspeed_training.py \
        OUTPUT_DIR --stage 2|3 --model toy|t5 [--args JSON]

Writes OUTPUT_DIR/full (the uninterrupted run) and OUTPUT_DIR/resumed (a copy of `full` cut back to its first
checkpoint, then resumed with resume_from_checkpoint='auto'), and OUTPUT_DIR/report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.dept._toy`

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin  # noqa: E402

from tests.dept._toy import toy_args  # noqa: E402
from tests.dept.deepspeed_runs import build_run  # noqa: E402

_accelerators: list = []


def train(output_dir: Path, stage: int, model_kind: str, overrides: dict) -> dict:
    args = toy_args(output_dir, **overrides)
    # accelerate's state is per process: only the first Accelerator takes the plugin, the second reuses it.
    first = not _accelerators
    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_clipping=1.0, zero3_init_flag=False) if first else None
    accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=args.gradient_accumulation_steps)
    _accelerators.append(accelerator)
    trainer = build_run(model_kind, args, accelerator)
    return {"distributed_type": str(accelerator.distributed_type), **trainer.train(), **trainer.evaluate()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--stage", type=int, choices=(2, 3), required=True)
    parser.add_argument("--model", choices=("toy", "t5"), required=True)
    parser.add_argument("--args", default="{}", help="JSON dict of TrainingArguments overrides.")
    options = parser.parse_args()
    torch.set_num_threads(1)
    overrides = json.loads(options.args)
    output = Path(options.output_dir)

    full = train(output / "full", options.stage, options.model, overrides)
    resumed_dir = output / "resumed"
    checkpoints = sorted((output / "full").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    resumed_dir.mkdir(parents=True)
    shutil.copytree(checkpoints[0], resumed_dir / checkpoints[0].name)  # as if killed right after it
    resumed = train(resumed_dir, options.stage, options.model, {**overrides, "resume_from_checkpoint": "auto"})
    (output / "report.json").write_text(json.dumps({"full": full, "resumed": resumed, "from": checkpoints[0].name}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
