"""Evaluate saved DePT adapters on tasks: the same as the `dept-eval` console script.

    python scripts/evaluate.py --model_name_or_path t5-base --adapter outputs/sst2 --task sst2 --split test \
        --output_dir eval/sst2
"""

import sys

from dept_eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
