"""``python -m diffdistill`` == ``diffdistill`` (so torchrun / accelerate launch -m work)."""

import sys

from .cli import main

sys.exit(main())
