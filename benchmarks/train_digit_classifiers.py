"""Train the digit classifiers that `diffusekit.metrics` ships, or score the shipped ones.

    python benchmarks/train_digit_classifiers.py            # score the shipped weights on the held-out split
    python benchmarks/train_digit_classifiers.py --train    # retrain both, write src/diffusekit/metrics/weights/

Seeded and run with 1 torch thread: the same torch build on the same CPU writes the same bytes.
Measured (torch 2.13 CPU, 1 thread, shared 2-core machine): digits about 2.5 min, mnist about 2.5 min.
"""

import sys

from diffusekit.metrics.classifier import main

if __name__ == "__main__":
    from diffusekit._utils import run_script

    sys.exit(run_script(main))
