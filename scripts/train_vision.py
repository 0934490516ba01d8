"""Train, evaluate and predict image classification with visual DePT or a baseline.

See `dept_vl/image_classification.py` for the flags.
"""

import sys

from dept_vl.image_classification import main

if __name__ == "__main__":
    sys.exit(main())
