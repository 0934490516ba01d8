"""Start-up: the CPU time of each command line's `--help` against `python -c "import torch"`.

Every command runs in a fresh interpreter; its CPU time is user + system of that child process
(`resource.getrusage(RUSAGE_CHILDREN)`), which a loaded machine inflates far less than wall time. The commands
are interleaved, round after round, after one warm-up round (bytecode caches written), and each figure is the
median over the rounds. Each CLI's `--help` is its console script's entry point (`dept_nlp.cli:main`, ...)
called with `--help`, as `dept-train --help` runs it.

Beside the CLIs, the table gives the import that bounds them (row `bound: import dept`: the core every CLI loads
at its top, torch, transformers' cache classes and accelerate among it), and what a run adds once its flags are
parsed, which `--help` no longer pays (rows `after parsing: ...`): transformers' T5, which VL-T5 subclasses
(`dept_vl.model`, imported when a VL checkpoint is read), and timm (imported when a backbone is built).

    from benchmarks.startup import measure, to_markdown
    results = measure(rounds=7)
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import entry_points

TARGET = 1.5  # the CLIs' --help against `import torch` (issue 24)
REFERENCE = ("import torch", "import torch")
CLIS = ("dept-train", "dept-train-vl", "dept-train-vision", "dept-eval", "dept-serve", "dept-tune")
BOUNDS = {
    "bound: import dept": "import dept",
    "after parsing: + transformers' T5 (VL-T5)": "import dept, transformers.models.t5.modeling_t5",
    "after parsing: + timm": "import dept, timm",
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli_code(script: str) -> str:
    """Python code that runs console script `script` with `--help`, as its installed wrapper does."""
    (entry,) = entry_points(group="console_scripts", name=script)
    module, function = entry.value.split(":")
    return f"import sys; from {module} import {function}; sys.exit({function}(['--help']))"


def commands() -> dict[str, str]:
    """name -> Python code, the reference first."""
    return {REFERENCE[0]: REFERENCE[1], **{f"{cli} --help": cli_code(cli) for cli in CLIS}, **BOUNDS}


def cpu_seconds(code: str) -> float:
    """User + system CPU time of a fresh `python -c code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **OFFLINE}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(rounds: int = 7, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
            ) -> dict:
    """Median CPU seconds of each command over `rounds` interleaved rounds, and its ratio to `import torch`."""
    codes = commands()
    started, load_before = time.perf_counter(), os.getloadavg()
    for code in codes.values():  # warm-up: bytecode caches, the page cache
        cpu_seconds(code)
    samples: dict[str, list[float]] = {name: [] for name in codes}
    for index in range(rounds):
        for name, code in codes.items():
            samples[name].append(cpu_seconds(code))
        log(f"round {index + 1}/{rounds}: " + ", ".join(f"{n.split()[0]} {s[-1]:.2f}" for n, s in samples.items()))
    reference = statistics.median(samples[REFERENCE[0]])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append({"command": name, "code": codes[name], "cpu_s_median": median, "cpu_s_min": min(values),
                     "cpu_s_max": max(values), "ratio": median / reference, "samples": values,
                     "met": median / reference <= TARGET if name.endswith("--help") else None})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "rounds": rounds,
        "wall_time_s": time.perf_counter() - started, "target": TARGET, "rows": rows,
    }


def to_markdown(results: dict, command: str) -> str:
    load = ", ".join(f"{value:.2f}" for value in results["load_average_before"])
    load_after = ", ".join(f"{value:.2f}" for value in results["load_average_after"])
    lines = [
        "# Start-up: `--help` of each CLI against `python -c \"import torch\"` (CPU time)",
        "",
        f"{results['date']} · Python {results['python']} · {results['platform']} · {results['cpu_count']} CPUs · "
        f"load average (1, 5, 15 min) {load} before, {load_after} after · {results['wall_time_s']:.0f} s",
        "",
        f"Command: `{command}`",
        "",
        f"User + system CPU seconds of a fresh process, median of {results['rounds']} interleaved rounds after a "
        f"warm-up round (min-max beside it). Target: each CLI's `--help` ≤ {results['target']}× `import torch`. "
        "The `bound` row is the import every CLI loads at its top; the `after parsing` rows add what a run imports "
        "once its flags are parsed, which `--help` does not pay (see benchmarks/startup.py).",
        "",
        "| command | CPU s (median) | min-max | × import torch | target met |",
        "|---|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        met = {True: "yes", False: "no", None: ""}[row["met"]]
        lines.append(f"| `{row['command']}` | {row['cpu_s_median']:.2f} | {row['cpu_s_min']:.2f}-"
                     f"{row['cpu_s_max']:.2f} | {row['ratio']:.2f}× | {met} |")
    return "\n".join(lines) + "\n"
