"""Fréchet distance between Gaussian fits of two feature sets, and streaming feature statistics.

``FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017), in float64.

The trace of the matrix square root is computed from a *symmetric* eigendecomposition, which runs on
the GPU and needs no ``scipy.linalg.sqrtm``: ``S1 S2`` is similar to the symmetric PSD matrix
``M = S1^(1/2) S2 S1^(1/2)`` (``S1 S2 = S1^(1/2) M S1^(-1/2)``), so the eigenvalues of
``(S1 S2)^(1/2)`` are the square roots of the (real, non-negative) eigenvalues of ``M``.

Statistics are accumulated as float64 sums (``sum x``, ``sum x x^T``, count), so images and features
never need to be held in memory, and saved / loaded as ``.npz`` with keys ``mu`` and ``sigma`` (the
format of EDM's published ``fid-refs``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

ArrayLike = np.ndarray | Tensor


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _as_f64(a: ArrayLike, device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a).to(device, torch.float64)


def _psd_sqrt(s: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix: ``V diag(sqrt(max(l, 0))) V^T`` from ``eigh``."""
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)  # symmetrise: round-off makes S slightly asymmetric
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike, device: torch.device | None = None) -> float:
    """``tr((S1 S2)^(1/2))`` for PSD ``S1, S2``, as ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` in float64."""
    device = device or _default_device()
    s1, s2 = _as_f64(sigma1, device), _as_f64(sigma2, device)
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    evals = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(evals.clamp(min=0).sqrt().sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     device: torch.device | None = None) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (the FID formula), float64.

    Args:
        mu1, mu2: means, shape ``[D]`` (numpy or torch).
        sigma1, sigma2: covariances, shape ``[D, D]`` (symmetric positive semi-definite).
        device: where the eigendecompositions run; default CUDA when present, else CPU.
    Returns:
        ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` as a Python float (>= 0 up to round-off).
    """
    device = device or _default_device()
    m1, m2 = _as_f64(mu1, device), _as_f64(mu2, device)
    s1, s2 = _as_f64(sigma1, device), _as_f64(sigma2, device)
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.numel(), m1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(m1.shape)} vs {tuple(m2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    mean_term = float((m1 - m2).square().sum())
    return mean_term + float(torch.trace(s1) + torch.trace(s2)) - 2.0 * trace_sqrt_product(s1, s2, device)


class FeatureStats:
    """Streaming mean / covariance of features in float64: ``sum x``, ``sum x x^T`` and the count.

    ``update`` takes ``[N, D]`` batches; ``mu`` and ``sigma`` use the unbiased covariance
    ``(sum x x^T - n mu mu^T) / (n - 1)`` (as EDM, pytorch-fid and torchmetrics do).
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, feats: Tensor) -> None:
        """Add a batch of features ``[N, D]``."""
        x = torch.as_tensor(feats).detach().to("cpu", torch.float64).reshape(-1, self.dim)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x

    @property
    def mu(self) -> np.ndarray:
        return (self.sum / self.count).numpy()

    @property
    def sigma(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError("at least 2 samples are needed for a covariance")
        mu = self.sum / self.count
        return ((self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)).numpy()


def feature_moments(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of features ``[N, D]`` in float64 (unbiased covariance)."""
    x = torch.as_tensor(np.asarray(feats) if not isinstance(feats, Tensor) else feats)
    stats = FeatureStats(x.shape[-1])
    stats.update(x)
    return stats.mu, stats.sigma


def fid_from_features(feats1: ArrayLike, feats2: ArrayLike) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]`` (Gaussian fits in float64)."""
    mu1, sigma1 = feature_moments(feats1)
    mu2, sigma2 = feature_moments(feats2)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def save_stats(path: str | Path, mu: ArrayLike, sigma: ArrayLike, **extra: ArrayLike) -> None:
    """Write ``mu`` and ``sigma`` (float64) to ``path`` as ``.npz`` (EDM fid-refs keys) plus optional arrays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # per process: concurrent writers do not clash
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: a half-written cache file is never read back


def load_stats(path: str | Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` with keys ``mu`` ``[D]`` and ``sigma`` ``[D, D]`` (EDM fid-refs format).

    Returns a dict with ``mu``, ``sigma`` and any extra arrays stored in the file. Never unpickles
    (``allow_pickle=False``); a missing or malformed file raises :class:`UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference statistics file not found: {path} (expected an .npz with keys mu and sigma)")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read {path} as .npz statistics: {err}") from None
    if "mu" not in out or "sigma" not in out:
        raise UserError(f"{path} lacks the keys mu and sigma (has: {', '.join(sorted(out)) or 'none'})")
    mu, sigma = out["mu"], out["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    out["mu"], out["sigma"] = mu.astype(np.float64), sigma.astype(np.float64)
    return out
