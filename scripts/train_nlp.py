"""Train, evaluate and predict a text task with DePT or a baseline. See `dept_nlp/cli.py` for the flags."""

import sys

from dept_nlp.cli import main

if __name__ == "__main__":
    sys.exit(main())
