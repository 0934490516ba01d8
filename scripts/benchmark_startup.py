"""Measure start-up: the CPU time of each CLI's `--help` against `python -c "import torch"` (see
benchmarks/startup.py), and write results.json and results.md.

    python scripts/benchmark_startup.py --output_dir bench_results/startup --overwrite    # about 2 min, quiet
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks.startup import measure, to_markdown

RESULT_FILES = ("results.json", "results.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where results.json and results.md go")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output_dir")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    existing = [name for name in RESULT_FILES if (output_dir / name).exists()]
    if existing and not args.overwrite:
        print(f"error: {output_dir} already holds {', '.join(existing)}: pass --overwrite or choose another "
              "--output_dir", file=sys.stderr)
        return 2
    command = shlex.join(["python", "scripts/benchmark_startup.py", *(sys.argv[1:] if argv is None else argv)])
    results = measure(rounds=args.rounds)
    results["command"] = command
    markdown = to_markdown(results, command)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULT_FILES[0]).write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / RESULT_FILES[1]).write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
