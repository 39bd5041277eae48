"""User-facing errors: the CLI prints their message on one line and exits with status 2."""

import argparse


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong image size): one clear line."""


def positive_int(text: str) -> int:
    """argparse ``type`` for counts (``--steps``, ``--batch-size``, ``--num-samples``): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ``--gamma`` of ``sample`` and ``eval fid / clip`` (see :func:`diffdistill.generator.apply_gamma`)
GAMMA_HELP = ("deterministic (ddim) students, e.g. TSCD: TCD's stochastic sampling in [0, 1] (diffusers "
              "TCDScheduler eta; 0: DDIM, as trained; 1: fresh noise at every step)")
