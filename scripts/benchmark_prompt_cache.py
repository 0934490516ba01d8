"""Measure decoder-only prefill, `generate` and the eval forward with the prompt KV cache against the frozen model
fed the input alone, the frozen model with a 60-token prefix already in its KV cache (the limit for a prefill that
attends to m prompt keys), HF PEFT prompt tuning (l = 100) and DePT without the cache. Every ratio comes with its
spread over rounds and over --runs fresh processes.

    python scripts/benchmark_prompt_cache.py --output_dir bench_results       # CPU, llama-small, 3 runs: ~10 min quiet
    python scripts/benchmark_prompt_cache.py --model llama-tiny --steps 1 --runs 1 --no_sweeps \
        --output_dir /tmp/smoke                                                   # seconds
    python scripts/benchmark_prompt_cache.py --model llama-1b --device cuda --threads 0 --output_dir out_gpu

Writes prompt_cache.json and prompt_cache.md to --output_dir, and refuses a directory that already holds them
unless --overwrite. See benchmarks/prompt_cache.py for what each method and figure is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks.prompt_cache import PromptCacheSettings, check_output_dir, run, write_results


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(value) for value in text.split(",") if value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = PromptCacheSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.model, help="a decoder-only model shape from benchmarks.throughput")
    parser.add_argument("--workloads", default=",".join(defaults.workloads),
                        help="comma list of benchmarks.throughput workloads (default: short,fixed)")
    parser.add_argument("--output_dir", required=True, help="where prompt_cache.json and prompt_cache.md go")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output_dir")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--new_tokens", type=int, default=defaults.new_tokens, help="tokens per timed generate")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="measured rounds per figure and run")
    parser.add_argument("--runs", type=int, default=defaults.runs,
                        help="process runs, each with --steps rounds; the ratios' spread covers them all")
    parser.add_argument("--isolation", choices=("process", "inline"), default=defaults.isolation,
                        help="each run in a fresh process (default) or all in this one")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="unmeasured rounds first")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads (default 1: the machine may be shared; 0 keeps torch's default)")
    parser.add_argument("--prompt_lengths", type=_ints, default=defaults.prompt_lengths,
                        help="L for the sweep of PEFT PT l=L against DePT m=L")
    parser.add_argument("--rate_batch_sizes", type=_ints, default=defaults.rate_batch_sizes,
                        help="batch sizes for the per-request cost at growing request rates; the first is the "
                             "queue model's service")
    parser.add_argument("--no_sweeps", action="store_true", help="skip the prompt-length and request-rate sweeps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_output_dir(args.output_dir, args.overwrite)
        settings = PromptCacheSettings(
            model=args.model, workloads=tuple(w.strip() for w in args.workloads.split(",") if w.strip()),
            device=args.device, batch_size=args.batch_size, new_tokens=args.new_tokens, warmup=args.warmup,
            steps=args.steps, runs=args.runs, isolation=args.isolation, sweeps=not args.no_sweeps, seed=args.seed, threads=args.threads or None, prompt_lengths=args.prompt_lengths,
            rate_batch_sizes=args.rate_batch_sizes,
        )
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write_results(run(settings), args.output_dir, overwrite=args.overwrite)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
