"""Thin launch script: ``python train/train.py --config FILE [...]`` is ``diffdistill train --config FILE [...]``.

Works under ``accelerate launch train/train.py ...`` and ``torchrun --nproc_per_node N train/train.py ...``.
"""

import sys

from diffdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
