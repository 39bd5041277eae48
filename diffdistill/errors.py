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
