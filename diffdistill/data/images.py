"""Image datasets: scikit-learn's handwritten digits (the embedded default) and a user's image folder.

Every image dataset yields ``(image, label)``: ``image`` a float32 ``[C, H, W]`` tensor in [-1, 1] and
``label`` a 0-dim LongTensor (``-1`` when the data is unlabelled). Attributes ``num_classes``
(``None`` when unlabelled), ``channels``, ``resolution`` and ``sample_shape`` describe the data;
``captions`` is the list of each image's caption for captioned data (``None`` otherwise).

Captioned folders follow the conventions users already have:

- ``metadata.jsonl`` at the folder's top (Hugging Face ``imagefolder``): one JSON object per line with
  ``file_name`` (relative to the folder) and ``text``; other keys are ignored;
- sidecar captions: ``cat.png`` + ``cat.txt`` (UTF-8, the whole file is the caption), as kohya / SD
  fine-tuning scripts use.

When a folder has ``metadata.jsonl``, ``.txt`` files are not read. Every image needs exactly one non-empty
caption and every caption an image: a missing, empty, duplicated or orphan caption is one error line.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
TEST_EVERY = 5  # digits: every 5th image (index % 5 == 0) is held out as the test split


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``([1797, 1, 8, 8] in [-1, 1], [1797] labels)``, read once per process."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), bilinearly resized to ``resolution``.

    Pixel values 0..16 map linearly to [-1, 1]. ``split``: ``"all"``, ``"train"`` (4 of every 5 images)
    or ``"test"`` (every 5th image, index % 5 == 0) — a fixed split for the evaluation classifier.
    ``channels=3`` repeats the grey channel (for RGB teachers).
    """

    def __init__(self, resolution: int = 16, split: str = "all", channels: int = 1) -> None:
        if split not in ("all", "train", "test"):
            raise UserError(f"digits split must be all, train or test, got {split!r}")
        if channels not in (1, 3):
            raise UserError(f"data.channels must be 1 or 3, got {channels}")
        if resolution < 1:
            raise UserError(f"data.resolution must be positive, got {resolution}")
        images, labels = _digits()  # [N, 1, 8, 8], [N]
        index = torch.arange(len(labels))
        keep = {"all": index >= 0, "train": index % TEST_EVERY != 0, "test": index % TEST_EVERY == 0}[split]
        images, labels = images[keep], labels[keep]
        if resolution != 8:  # bilinear interpolation is a convex combination: values stay in [-1, 1]
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                   antialias=resolution < 8)
        self.images = images.expand(-1, channels, -1, -1).contiguous()
        self.labels = labels
        self.num_classes = 10
        self.channels = channels
        self.resolution = resolution
        self.sample_shape = (channels, resolution, resolution)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]


def _channels_of(mode: str) -> int:
    return 1 if mode in GREY_MODES else 3


class ImageFolderDataset(Dataset):
    """Images under ``path``: resized (shorter side to ``resolution``, bicubic) and centre-cropped.

    Labels come from the first-level sub-folder names, sorted (``class_names``); a flat folder is
    unlabelled (label ``-1``). ``channels``: 1 (grey) or 3 (RGB) converts every image; ``None`` takes the
    first image's channel count and requires every image to match it.
    """

    def __init__(self, path: str | os.PathLike, resolution: int, channels: Optional[int] = None) -> None:
        from PIL import Image

        root = Path(path)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist")
        if channels not in (None, 1, 3):
            raise UserError(f"data.channels must be 1 or 3, got {channels}")
        if resolution < 1:
            raise UserError(f"data.resolution must be positive, got {resolution}")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"image folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        top = [p for p in files if p.parent == root]
        nested = [p for p in files if p.parent != root]
        if top and nested:
            raise UserError(f"image folder {root} mixes images at its top level ({top[0].name}) with class "
                            f"sub-folders ({nested[0].relative_to(root).parts[0]}/); put every image in a class "
                            "sub-folder, or none")
        self.class_names = sorted({p.relative_to(root).parts[0] for p in nested})
        index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = torch.tensor([index[p.relative_to(root).parts[0]] if nested else -1 for p in files])
        expected = channels
        for p in files:  # reads headers only: catches unreadable files and channel mismatches up front
            try:
                with Image.open(p) as im:
                    mode = im.mode
            except Exception as e:
                raise UserError(f"cannot read image {p} ({type(e).__name__})") from None
            if expected is None:
                expected, first = _channels_of(mode), p
            elif channels is None and _channels_of(mode) != expected:
                raise UserError(f"image {p} has {_channels_of(mode)} channel(s) but {first.name} has {expected}; "
                                "set data.channels (1 or 3) to convert every image")
        self.files = files
        self.captions: Optional[list[str]] = read_captions(root, files)
        self.num_classes = len(self.class_names) or None
        self.channels = expected
        self.resolution = resolution
        self.sample_shape = (expected, resolution, resolution)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Tensor:
        """Image ``i`` as ``[C, R, R]`` float32 in [-1, 1]."""
        from PIL import Image

        path, r = self.files[i], self.resolution
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                w, h = im.size
                scale = r / min(w, h)
                nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
                im = im.resize((nw, nh), Image.BICUBIC)
                left, top = (nw - r) // 2, (nh - r) // 2
                im = im.crop((left, top, left + r, top + r))
                array = np.asarray(im, dtype=np.float32)
        except Exception as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__})") from None
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.load(i), self.labels[i]


def read_captions(root: Path, files: list[Path]) -> Optional[list[str]]:
    """The caption of each of ``files`` from ``root/metadata.jsonl`` or sidecar ``.txt`` files; ``None`` when
    the folder has neither. Anything inconsistent is a :class:`UserError` naming the file."""
    meta = root / "metadata.jsonl"
    if meta.is_file():
        return _jsonl_captions(meta, root, files)
    sidecars = {p.with_suffix(""): p for p in root.rglob("*.txt") if p.is_file()}
    if not sidecars:
        return None
    images = {p.with_suffix(""): p for p in files}
    orphans = sorted(set(sidecars) - set(images))
    if orphans:
        raise UserError(f"caption {sidecars[orphans[0]]} has no image next to it (same name, an image extension)")
    captions = []
    for p in files:
        txt = sidecars.get(p.with_suffix(""))
        if txt is None:
            raise UserError(f"image {p} has no caption: the folder uses sidecar captions, so add {p.with_suffix('.txt')}")
        try:
            text = txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"caption {txt} is not UTF-8 text") from None
        if not text:
            raise UserError(f"caption {txt} is empty")
        captions.append(text)
    return captions


def _jsonl_captions(meta: Path, root: Path, files: list[Path]) -> list[str]:
    by_name: dict[str, str] = {}
    image_names = {p.relative_to(root).as_posix() for p in files}
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{meta} is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{meta} line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise UserError(f"{meta} line {n} needs \"file_name\" and \"text\" keys")
        name, text = str(row["file_name"]).replace("\\", "/"), row["text"]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{meta} line {n} has an empty caption for {name}")
        if name in by_name:
            raise UserError(f"{meta} line {n} captions {name} a second time")
        if name not in image_names:
            raise UserError(f"{meta} line {n} names {name}, which is not an image in {root}")
        by_name[name] = text.strip()
    captions = []
    for p in files:
        name = p.relative_to(root).as_posix()
        if name not in by_name:
            raise UserError(f"image {p} has no caption in {meta} (add a line with \"file_name\": \"{name}\")")
        captions.append(by_name[name])
    return captions
