"""Thin launch script: ``python eval/fid.py --checkpoint PATH ...`` is ``diffdistill eval fid --checkpoint PATH ...``.

Works under ``accelerate launch eval/fid.py ...`` to split generation over processes.
"""

import sys

from diffdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "fid", *sys.argv[1:]]))
