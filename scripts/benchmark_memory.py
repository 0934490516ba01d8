"""Measure memory: DePT (m = 60, r = 30) against PT (l = 100) and against the limit (the same model on m + s tokens
with no A·B), at t5-base and llama-small dims (s = 256) and at ViT-B/16: activation bytes saved for backward, the
allocator's peak over a training step and over an eval forward.

    python scripts/benchmark_memory.py --output_dir bench_results/memory    # CPU: t5-base, llama-small, vit-b16, ~20 min
    python scripts/benchmark_memory.py --models t5-tiny,llama-tiny,vit-tiny --batch_size 2 --max_length 32 \\
        --output_dir /tmp/memory                                                   # seconds
    python scripts/benchmark_memory.py --device cuda --output_dir out_gpu          # torch.cuda.max_memory_allocated

Writes results.json and results.md to --output_dir (refused if results are there, unless --overwrite). On CPU the
peaks come from torch.profiler's allocator events, on CUDA from torch.cuda.max_memory_allocated; allocation sizes
do not depend on the machine's load. See benchmarks/memory.py for exactly what is counted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks.memory import DEFAULT_MODELS, MODELS, RESULT_FILES, Settings, run_benchmark, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma list from {list(MODELS)}")
    parser.add_argument("--output_dir", required=True, help="where results.json and results.md go")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output_dir")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256, help="s, the input tokens of the text models")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0 keeps torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isolation", choices=("process", "inline"), default="process",
                        help="a fresh process per model (default) or this one")
    args = parser.parse_args(argv)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    try:
        unknown = [name for name in models if name not in MODELS]
        if unknown or not models:
            raise ValueError(f"unknown models {unknown or args.models!r}; choose from {list(MODELS)}")
        existing = [name for name in RESULT_FILES if (Path(args.output_dir) / name).exists()]
        if existing and not args.overwrite:
            raise FileExistsError(f"{args.output_dir} already holds {', '.join(existing)}: pass --overwrite or "
                                  "choose another --output_dir")
        settings = Settings(device=args.device, batch_size=args.batch_size, max_length=args.max_length,
                            seed=args.seed, threads=args.threads or None, isolation=args.isolation)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "scripts/benchmark_memory.py", *(sys.argv[1:] if argv is None else argv)])
    results = run_benchmark(models, settings, command=command)
    paths = write_results(results, args.output_dir, overwrite=args.overwrite)
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
