"""A tiny text task for studies: a 2-layer T5 with a word tokenizer, and sst2 files whose rows carry a class cue."""

from __future__ import annotations

from pathlib import Path

from dept_nlp.tasks import get_task
from tests.conftest import save_tiny_model
from tests.nlp.fixtures import hub_rows, write_task_fixture

TASK = "sst2"


def write_tiny_task(directory: Path) -> list[str]:
    """Model and data under `directory`; returns the training flags of a short run (1 thread, 8 steps)."""
    files = write_task_fixture(TASK, directory / "data", n_train=16, n_val=8, n_test=8)
    rows = hub_rows(TASK, 32)
    texts = [get_task(TASK).format_example(row)[0] for row in rows]
    model_dir = save_tiny_model("seq2seq", directory / "model", texts)
    flags = {
        "model_name_or_path": model_dir, "task_name": TASK, "output_dir": directory / "study",
        "prefix_length": 4, "r": 2, "max_seq_length": 32, "generation_max_length": 4,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "max_steps": 8, "eval_steps": 2,
        "save_steps": 2, "logging_steps": 2, "warmup_steps": 0, "report_to": "none", "seed": 0,
        **files,
    }
    argv = ["--do_predict"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv
