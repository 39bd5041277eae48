"""FID of a generator: batched, class-balanced generation + feature extraction, on one or many processes.

Global sample ``i`` has label ``i mod num_classes`` (class-balanced over the whole set, as papers do for
class-conditional models). Samples are cut into batches of ``batch_size``; batch ``b`` is drawn by
process ``b mod P`` of ``P`` (accelerate) and each round's features are gathered in batch order, so the
numbers do not depend on the number of processes. Only feature statistics (float64 sums) plus a capped
subset of features stay in memory.

Seeding: a generator whose ``sample`` takes ``offset`` (``diffdistill.generator.Generator``) seeds
every sample from ``(seed, global index)`` and is given ``offset = first index of the batch`` (then
samples do not depend on the batch size either, and match ``diffdistill sample`` with the same seed);
any other generator gets the labels explicitly and seed ``seed * 1_000_003 + b`` for batch ``b``.
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..denoiser import module_device
from .features import FeatureExtractor, as_feature_extractor
from .fid import FeatureStats, frechet_distance
from .precision_recall import precision_recall
from .reference import MAX_PR_FEATURES, RefStats, npz_ref_stats

SEED_STRIDE = 1_000_003  # batch b of run seed s uses seed s * SEED_STRIDE + b: distinct across runs


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of global batch ``batch_index`` in a run seeded with ``seed``."""
    return seed * SEED_STRIDE + batch_index


def balanced_labels(start: int, stop: int, num_classes: int | None) -> Tensor | None:
    """Labels of global samples ``start..stop-1``: ``i mod num_classes`` (``None`` if unconditional)."""
    if not num_classes:
        return None
    return torch.arange(start, stop) % num_classes


def _sampler(generator: Any, steps: int, seed: int, batch_size: int, num_classes: int | None):
    """``draw(b, start, stop) -> images`` for global batch ``b`` (see the module docstring on seeding)."""
    if "offset" in inspect.signature(generator.sample).parameters:
        # labels=None: the generator's own default is i mod num_classes over global indices
        return "per-sample", lambda b, start, stop: generator.sample(
            stop - start, steps=steps, labels=None, seed=seed, batch_size=batch_size, offset=start)
    return "per-batch", lambda b, start, stop: generator.sample(
        stop - start, steps=steps, labels=balanced_labels(start, stop, num_classes), seed=batch_seed(seed, b),
        batch_size=batch_size)


def _gather_round(accelerator: Any, feats: Tensor, batch_size: int, dim: int) -> Tensor:
    """Gather one round's per-process feature batches (ragged) in process order, i.e. global batch order."""
    device = accelerator.device
    padded = torch.zeros(batch_size, dim, device=device)
    padded[: feats.shape[0]] = feats.to(device)
    counts = accelerator.gather(torch.tensor([feats.shape[0]], device=device)).cpu()
    gathered = accelerator.gather(padded).reshape(-1, batch_size, dim).cpu()
    return torch.cat([gathered[p, : int(n)] for p, n in enumerate(counts)])


def evaluate_fid(generator: Any, extractor: FeatureExtractor | nn.Module,
                 ref_stats: RefStats | str | Path, num_samples: int, steps: int | None = None,
                 batch_size: int = 64, seed: int = 0, accelerator: Any = None, progress: bool = True,
                 max_pr_features: int = MAX_PR_FEATURES) -> dict:
    """Generate ``num_samples`` images and score them against ``ref_stats``.

    Args:
        generator: has ``sample(num_samples, steps=, labels=, seed=, batch_size=[, offset=]) -> [N, C, H, W]``
            in ``[-1, 1]``, ``num_classes`` (int or None), ``default_steps`` and ``nfe(steps)``.
        extractor: a :class:`FeatureExtractor` or any ``nn.Module`` (wrapped).
        ref_stats: a :class:`RefStats` or the path of an ``.npz`` with ``mu`` and ``sigma``.
        num_samples: generated images (papers: 50,000).
        steps: sampling steps; ``None`` uses ``generator.default_steps``.
        batch_size: images per generation batch (per process).
        seed: run seed (batch seeds derive from it, see :func:`batch_seed`).
        accelerator: an ``accelerate.Accelerator`` to split the work over processes, or ``None``.
        progress: show a tqdm bar (main process only).
        max_pr_features: generated features kept for precision / recall (k = 3).
    Returns:
        A JSON-ready dict: ``fid``, ``precision``, ``recall`` (``None`` without reference features),
        ``num_samples``, ``steps``, ``nfe``, ``seed``, ``batch_size``, ``num_classes``, ``features``
        (network name, dim, weights sha256, resize), ``reference``, ``wall_seconds``, ``seconds_per_image``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
    extractor = as_feature_extractor(extractor)
    ref = npz_ref_stats(ref_stats) if isinstance(ref_stats, (str, Path)) else ref_stats
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else module_device(extractor)
    steps = generator.default_steps if steps is None else steps
    num_classes = getattr(generator, "num_classes", None)
    num_batches = math.ceil(num_samples / batch_size)
    seeding, draw = _sampler(generator, steps, seed, batch_size, num_classes)
    stats, kept, n_kept = FeatureStats(ref.dim), [], 0
    gen_seconds, local_count = 0.0, 0
    t_start = time.perf_counter()
    bar = tqdm(total=num_samples, desc=f"FID {steps} steps", disable=not progress or rank != 0)
    with torch.no_grad():
        for round_start in range(0, num_batches, world):
            b = round_start + rank
            start, stop = b * batch_size, min((b + 1) * batch_size, num_samples)
            feats = torch.zeros(0, ref.dim)
            if start < num_samples:
                t0 = time.perf_counter()
                images = draw(b, start, stop)
                if images.is_cuda:
                    torch.cuda.synchronize(images.device)
                gen_seconds += time.perf_counter() - t0
                local_count += stop - start
                feats = extractor(images.to(device)).float()
                if feats.shape[1] != ref.dim:
                    raise ValueError(f"features are {feats.shape[1]}-d, reference statistics {ref.dim}-d")
            round_feats = _gather_round(accelerator, feats, batch_size, ref.dim) if world > 1 else feats.cpu()
            stats.update(round_feats)
            if n_kept < max_pr_features:
                kept.append(round_feats[: max_pr_features - n_kept])
                n_kept += kept[-1].shape[0]
            bar.update(round_feats.shape[0])
    bar.close()
    fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    precision = recall = None
    if ref.features is not None and n_kept > 3 and ref.features.shape[0] > 3:
        n = min(n_kept, ref.features.shape[0])  # equal set sizes, as in Kynkäänniemi et al.
        precision, recall = precision_recall(ref.features[:n], torch.cat(kept)[:n].numpy(), k=3)
    return {
        "fid": fid,
        "precision": precision,
        "recall": recall,
        "precision_recall_k": 3,
        "num_samples": stats.count,
        "steps": steps,
        "nfe": generator.nfe(steps),
        "seed": seed,
        "seeding": seeding,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "class_balanced": bool(num_classes),
        "features": extractor.info(),
        "reference": {**ref.source, "dim": ref.dim},
        "num_processes": world,
        "wall_seconds": time.perf_counter() - t_start,
        "seconds_per_image": gen_seconds / max(local_count, 1),
    }


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars / arrays inside a result dict -> plain Python for ``json.dump``."""
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
