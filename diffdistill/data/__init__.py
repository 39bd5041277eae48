"""Datasets: digits (the embedded default), image folders, 2-D toy mixtures and prompt files.

Image and toy datasets yield ``(sample, label)`` (label ``-1`` when unlabelled), prompt datasets yield
strings. Each has ``num_classes``, ``channels``, ``resolution`` and ``sample_shape`` attributes.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

from torch.utils.data import Dataset

from ..errors import UserError
from .digits_text import CaptionedDigitsDataset
from .images import DigitsDataset, ImageFolderDataset
from .other import PromptDataset, Toy2DDataset

DATASETS = ("digits", "folder", "toy2d", "prompts")


def build_dataset(data_cfg: Any, split: str = "all") -> Dataset:
    """The dataset a :class:`diffdistill.config.DataConfig` names (``split`` applies to digits only)."""
    name = data_cfg.name
    if name == "digits":  # with captions (digits_text): text teachers condition on them, class teachers on labels
        return CaptionedDigitsDataset(data_cfg.resolution, split, data_cfg.channels or 1)
    if name == "toy2d":
        return Toy2DDataset()
    if name in ("folder", "prompts") and not data_cfg.path:
        raise UserError(f"data.path must be set for data.name={name} "
                        f"({'an image folder' if name == 'folder' else 'a text file with one prompt per line'})")
    if name == "folder":
        return ImageFolderDataset(data_cfg.path, data_cfg.resolution, data_cfg.channels)
    if name == "prompts":
        from ..paths import resolve_path

        return PromptDataset(resolve_path(data_cfg.path))  # a shipped configs/... prompt file from any folder
    close = difflib.get_close_matches(str(name), DATASETS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown data.name {name!r}{hint} (choose {', '.join(DATASETS)})")


def training_prompts(data_cfg: Any) -> Optional[list[str]]:
    """The text conditions of ``data_cfg``: a prompt file's lines, or a captioned image folder's captions (one per
    image, so repeated captions keep their frequency); ``None`` for data without text."""
    if data_cfg.name == "prompts":
        return list(build_dataset(data_cfg))
    if data_cfg.name == "folder":
        return build_dataset(data_cfg).captions
    return None


__all__ = ["training_prompts", "DigitsDataset", "ImageFolderDataset", "Toy2DDataset", "PromptDataset", "build_dataset", "DATASETS"]
