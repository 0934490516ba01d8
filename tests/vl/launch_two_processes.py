"""Run `dept_vl.cli.train` in each process of a launcher and report what that process saw.

tests/vl/test_cli.py launches it under `accelerate launch --multi_gpu --num_processes 2` (on a CPU machine the
trainer makes an `Accelerator(cpu=True)`, which joins the gloo process group the launcher set up):

    accelerate launch --multi_gpu --num_processes 2 tests/vl/launch_two_processes.py REPORT_DIR -- <cli flags>

REPORT_DIR gets one `process_<index>.json` per process: `{"num_processes": ..., "results": {...}}`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

from dept_vl.cli import train  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    report_dir, separator, *cli_argv = sys.argv[1:]
    assert separator == "--", "usage: launch_two_processes.py REPORT_DIR -- <cli flags>"
    results = train(cli_argv)
    state = PartialState()
    report = {"num_processes": state.num_processes, "results": results}
    Path(report_dir, f"process_{state.process_index}.json").write_text(json.dumps(report))
