"""Reference statistics: from an ``.npz`` file, an image folder or the digits dataset, cached by content hash.

A :class:`RefStats` holds ``mu`` / ``sigma`` (what FID needs) and, when computed here, a capped subset of
the reference features for precision / recall. Computed statistics are cached under
``cache_dir()/refstats/<sha>.npz``, the hash covering the image content and the feature network
(name, weights sha256, resize), so a changed folder or network never reuses stale numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import UserError
from .features import FeatureExtractor, cache_dir
from .fid import FeatureStats, load_stats, save_stats

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_PR_FEATURES = 10_000  # reference features kept for precision / recall (ADM uses 10k)


@dataclass
class RefStats:
    """Reference ``mu`` ``[D]``, ``sigma`` ``[D, D]`` (float64), optional ``features`` ``[M, D]``, and a source."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    source: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def _extractor_key(extractor: FeatureExtractor) -> str:
    return f"{extractor.name}|{extractor.weights_hash}|{extractor.resize}"


def stats_from_batches(batches: Iterable[Tensor], extractor: FeatureExtractor,
                       max_features: int = MAX_PR_FEATURES) -> tuple[FeatureStats, np.ndarray]:
    """Stream image batches ``[B, C, H, W]`` in ``[-1, 1]`` through ``extractor``; keep ``max_features`` features."""
    device = next(extractor.parameters(), torch.empty(0)).device
    stats, kept, n_kept = None, [], 0
    for images in batches:
        feats = extractor(images.to(device)).double().cpu()
        stats = stats or FeatureStats(feats.shape[1])
        stats.update(feats)
        if n_kept < max_features:
            kept.append(feats[: max_features - n_kept].float())
            n_kept += kept[-1].shape[0]
    if stats is None or stats.count < 2:
        raise UserError("need at least 2 reference images for statistics")
    return stats, torch.cat(kept).numpy()


def _cached(key: str, compute, source: dict) -> RefStats:
    path = cache_dir() / "refstats" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        data = load_stats(path)
        return RefStats(data["mu"], data["sigma"], data.get("features"), {**source, "cache": str(path)})
    stats, feats = compute()
    save_stats(path, stats.mu, stats.sigma, features=feats, count=np.int64(stats.count))
    return RefStats(stats.mu, stats.sigma, feats, {**source, "cache": str(path)})


def digits_ref_stats(extractor: FeatureExtractor, resolution: int = 16, batch_size: int = 512) -> RefStats:
    """Statistics of all 1,797 scikit-learn digits rendered at ``resolution`` (the quickstart's reference)."""
    from .digits import load_digits_images

    images, _ = load_digits_images(resolution)
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    source = {"kind": "dataset", "name": "digits", "resolution": resolution, "num_images": int(images.shape[0])}
    return _cached(f"digits|{digest}|{_extractor_key(extractor)}",
                   lambda: stats_from_batches(images.split(batch_size), extractor), source)


def list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursively), sorted by relative path."""
    if not directory.is_dir():
        raise UserError(f"reference image folder not found: {directory}")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise UserError(f"{directory} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); need at least 2")
    return files


def _image_batches(files: list[Path], batch_size: int) -> Iterable[Tensor]:
    """RGB images in ``[-1, 1]``; a batch ends early where the image size changes."""
    from PIL import Image

    batch: list[Tensor] = []
    for path in tqdm(files, desc="reference images", leave=False):
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        x = torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0
        if batch and (len(batch) == batch_size or batch[0].shape != x.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(x)
    if batch:
        yield torch.stack(batch)


def folder_ref_stats(directory: str | Path, extractor: FeatureExtractor, batch_size: int = 64) -> RefStats:
    """Statistics of every image in a folder, cached by a hash of the file names and bytes."""
    directory = Path(directory)
    files = list_images(directory)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    source = {"kind": "images", "path": str(directory), "num_images": len(files)}
    return _cached(f"folder|{digest.hexdigest()}|{_extractor_key(extractor)}",
                   lambda: stats_from_batches(_image_batches(files, batch_size), extractor), source)


def npz_ref_stats(path: str | Path) -> RefStats:
    """Statistics from an ``.npz`` with ``mu`` and ``sigma`` (e.g. EDM's fid-refs); no precision / recall."""
    data = load_stats(path)
    return RefStats(data["mu"], data["sigma"], data.get("features"), {"kind": "npz", "path": str(path)})


def resolve_ref_stats(extractor: FeatureExtractor, ref_stats: str | None = None,
                      ref_images: str | None = None, ref_dataset: str | None = None,
                      resolution: int = 16) -> RefStats:
    """The reference named by exactly one of the three CLI options (default: the digits dataset)."""
    given = [x for x in (ref_stats, ref_images, ref_dataset) if x]
    if len(given) > 1:
        raise UserError("give only one of --ref-stats, --ref-images, --ref-dataset")
    if ref_stats:
        ref = npz_ref_stats(ref_stats)
    elif ref_images:
        ref = folder_ref_stats(ref_images, extractor)
    else:
        if (ref_dataset or "digits") != "digits":
            raise UserError(f"unknown --ref-dataset {ref_dataset!r}; the embedded dataset is 'digits'")
        ref = digits_ref_stats(extractor, resolution)
    if extractor.dim and ref.dim != extractor.dim:
        raise UserError(f"reference statistics are {ref.dim}-d but the {extractor.name} features are "
                        f"{extractor.dim}-d: compute them with the same feature network")
    return ref
