"""Non-image datasets: 2-D toy samples from a Gaussian mixture, and prompt files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError
from ..toy import GaussianMixture, default_mixture


class Toy2DDataset(Dataset):
    """``size`` fixed samples of a :class:`GaussianMixture` (default: :func:`toy.default_mixture`), seeded.

    Yields ``(x [D], label)`` with ``label = -1`` (unlabelled: the exact toy teacher is unconditional).
    """

    def __init__(self, size: int = 10000, mixture: Optional[GaussianMixture] = None, seed: int = 0) -> None:
        if size < 1:
            raise UserError(f"toy dataset size must be positive, got {size}")
        self.mixture = mixture or default_mixture()
        self.samples = self.mixture.sample(size, torch.Generator().manual_seed(seed))
        self.num_classes = None
        self.channels = None
        self.resolution = None
        self.sample_shape = (self.mixture.dim,)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.samples[i], torch.tensor(-1)


class PromptDataset(Dataset):
    """Prompts from a text file, one per line (surrounding whitespace stripped, blank lines skipped)."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"prompt file {p} does not exist")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"prompt file {p} is not UTF-8 text") from None
        self.prompts = [line.strip() for line in lines if line.strip()]
        if not self.prompts:
            raise UserError(f"prompt file {p} has no prompts (one prompt per line)")
        self.num_classes = None
        self.channels = None
        self.resolution = None
        self.sample_shape = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]
