"""Train, evaluate and predict a vision-language task with DePT or a baseline. See `dept_vl/cli.py` for the flags."""

import sys

from dept_vl.cli import main

if __name__ == "__main__":
    sys.exit(main())
