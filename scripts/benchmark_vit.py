"""Visual DePT against VPT-shallow (l = 100) at the same budget: train step time against the measured limit (the
same ViT fed DePT's tokens with no A @ B), peak memory.

    python scripts/benchmark_vit.py --models vit-b16 --output_dir bench_results/vit-b16   # CPU, a few minutes
    python scripts/benchmark_vit.py --models vit-l16 --output_dir bench_results/vit-l16   # CPU, about 5 minutes
    python scripts/benchmark_vit.py --models vit-tiny --steps 1 --output_dir /tmp/vit # seconds
    python scripts/benchmark_vit.py --device cuda --batch_size 64 --steps 10 --warmup 3 --output_dir bench_gpu

Writes results.json and results.md to --output_dir (refused if results are there, unless --overwrite).
See benchmarks/vit.py for what is measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks.throughput import check_output_dir
from benchmarks.vit import MODELS, Settings, run_benchmark, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit-b16,vit-l16", help=f"comma list from {sorted(MODELS)}")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output_dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured train steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU time measures the work alone)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in MODELS]
    try:
        if unknown or not models:
            raise ValueError(f"unknown models {unknown or args.models!r}; choose from {sorted(MODELS)}")
        check_output_dir(args.output_dir, args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = Settings(device=args.device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                        threads=args.threads, seed=args.seed)
    results = run_benchmark(models, settings)
    paths = write_results(results, args.output_dir, overwrite=args.overwrite)
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
