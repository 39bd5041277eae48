"""Seed mixing shared by training (per-step batches) and sampling (per-sample noise).

Kept outside :mod:`diffdistill.training` so that sampling never imports training.
"""

from __future__ import annotations


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from several integers (splitmix-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h & (2**63 - 1)


__all__ = ["mix_seed"]
