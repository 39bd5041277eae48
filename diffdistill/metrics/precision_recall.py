"""Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour manifolds.

Each set's manifold is the union of balls around its points, the radius of a ball being the distance to
the point's k-th nearest neighbour in its own set (k = 3 in the paper).
``precision = P_fake[x inside the real manifold]`` (quality), ``recall = P_real[x inside the fake
manifold]`` (coverage). Distances are computed in blocks, so memory is ``O(block * N)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_tensor(x, device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(device, torch.float32)


def knn_radii(feats: Tensor, k: int = 3, block: int = 1024) -> Tensor:
    """Distance from each row of ``feats`` ``[N, D]`` to its k-th nearest other row, shape ``[N]``."""
    if feats.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {feats.shape[0]}")
    radii = []
    for start in range(0, feats.shape[0], block):
        d = torch.cdist(feats[start:start + block], feats)  # [b, N]
        # the k+1 smallest include the point itself at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def _coverage(queries: Tensor, points: Tensor, radii: Tensor, block: int) -> float:
    """Fraction of ``queries`` that lie within ``radii[j]`` of some ``points[j]``."""
    inside = 0
    for start in range(0, queries.shape[0], block):
        d = torch.cdist(queries[start:start + block], points)  # [b, M]
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_feats, fake_feats, k: int = 3, block: int = 1024,
                     device: torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall of ``fake_feats`` against ``real_feats`` (both ``[N, D]``).

    Returns ``(precision, recall)`` in ``[0, 1]``: identical sets give ``(1, 1)``, far-apart sets ``(0, 0)``.
    """
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    real, fake = _as_tensor(real_feats, device), _as_tensor(fake_feats, device)
    real_radii, fake_radii = knn_radii(real, k, block), knn_radii(fake, k, block)
    precision = _coverage(fake, real, real_radii, block)
    recall = _coverage(real, fake, fake_radii, block)
    return precision, recall
