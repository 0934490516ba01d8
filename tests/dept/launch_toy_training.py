"""Run the toy training of the trainer tests in a process of its own, then evaluate.

tests/reliability/test_trainer_faults.py launches it:
- alone, slowed down by --step_delay, and SIGKILLs it once a checkpoint exists, to test resuming;
- under `torchrun --nproc_per_node 2`, to test multi-process training and evaluation, then (--resume_copy) the
  resume of a copy of the run cut back to its first checkpoint, as if killed right after it, by the same processes
  (each `Trainer` seeds afresh; only `load_state` can bring back the checkpoint's random states).

    python tests/dept/launch_toy_training.py OUTPUT_DIR [--step_delay SECONDS] [--args JSON] [--report DIR]
        [--resume_copy DIR]

--args holds `TrainingArguments` overrides of `tests.dept._toy.toy_args`; --report gets one
`process_<index>.json` per process with what that process saw (process count, eval metrics, the loss of
each of its training forwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.dept._toy`

import torch  # noqa: E402

from dept.checkpoint import complete_checkpoints  # noqa: E402
from tests.dept._toy import LossRecordingModel, toy_args, toy_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--step_delay", type=float, default=0.0, help="Seconds of sleep per training forward.")
    parser.add_argument("--args", default="{}", help="JSON dict of TrainingArguments overrides.")
    parser.add_argument("--report", default=None, help="Directory for one process_<index>.json per process.")
    parser.add_argument("--resume_copy", default=None,
                        help="Then copy the first checkpoint to this directory and resume the run there.")
    options = parser.parse_args()

    torch.set_num_threads(1)  # the same arithmetic as the single-threaded test process
    args = toy_args(options.output_dir, **json.loads(options.args))
    model = LossRecordingModel(step_delay=options.step_delay)
    trainer = toy_trainer(args, model)
    accelerator = trainer.accelerator
    assert accelerator.num_processes == int(os.environ.get("WORLD_SIZE", "1")), "accelerate missed the launcher"
    train_metrics = trainer.train()
    eval_metrics = trainer.evaluate()

    if options.report:
        report = Path(options.report)
        report.mkdir(parents=True, exist_ok=True)
        (report / f"process_{accelerator.process_index}.json").write_text(
            json.dumps(
                {
                    "num_processes": accelerator.num_processes,
                    "distributed_type": str(accelerator.distributed_type),
                    "train": train_metrics,
                    "micro_batch_losses": model.losses,
                    "eval": eval_metrics,
                }
            )
        )
    if options.resume_copy:
        first = complete_checkpoints(Path(options.output_dir))[0]
        if accelerator.is_main_process:
            shutil.copytree(first, Path(options.resume_copy) / first.name)
        accelerator.wait_for_everyone()
        resumed_args = toy_args(options.resume_copy, **{**json.loads(options.args), "resume_from_checkpoint": "auto"})
        resumed = toy_trainer(resumed_args, LossRecordingModel())
        resumed.train()
        resumed.evaluate()
    if torch.distributed.is_initialized():  # a clean exit; gloo may abort at teardown otherwise
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
        # Even after the group is destroyed, gloo's threads sometimes abort the interpreter's teardown on a loaded
        # machine ("terminate called without an active exception", SIGABRT, after every file is written). Skip
        # that teardown: everything this process had to do is done and on disk.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
