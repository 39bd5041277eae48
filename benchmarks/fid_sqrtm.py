"""The FID matrix square root three ways: agreement and time (prints a table; not a test).

    PYTHONPATH=. python benchmarks/fid_sqrtm.py [--dim 2048] [--samples 1000 10000]   # from the repo root

- ours: ``sum sqrt(eigvalsh(S1^(1/2) S2 S1^(1/2)))`` (two symmetric eigendecompositions, GPU when present);
- scipy: ``trace(sqrtm(S1 S2))`` (EDM, pytorch-fid, clean-fid);
- torchmetrics: ``sum sqrt(eigvals(S1 S2))`` (a general, non-symmetric eigendecomposition).

Covariances come from ``samples`` correlated Gaussian features (rank-deficient when samples < dim, as
with few generated images), so the comparison includes the ill-conditioned case.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg
import torch

from diffdistill.metrics import frechet_distance
from diffdistill.metrics.fid import feature_moments


def _features(n: int, dim: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)  # correlated features, like network activations
    return np.abs(rng.normal(size=(n, dim)) @ mix + shift)  # non-negative, like post-ReLU pool features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    print(f"{'samples':>8} {'ours':>14} {'scipy sqrtm':>14} {'torchmetrics':>14} {'rel(ours,scipy)':>16} "
          f"{'t ours':>8} {'t scipy':>8} {'t tm':>8}")
    for n in args.samples:
        mu1, s1 = feature_moments(_features(n, args.dim, 0.0, 0))
        mu2, s2 = feature_moments(_features(n, args.dim, 0.1, 1))
        t0 = time.perf_counter()
        ours = frechet_distance(mu1, s1, mu2, s2)
        t1 = time.perf_counter()
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
        t2 = time.perf_counter()
        from torchmetrics.image.fid import _compute_fid

        tm = float(_compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
        t3 = time.perf_counter()
        print(f"{n:>8} {ours:>14.6f} {ref:>14.6f} {tm:>14.6f} {abs(ours - ref) / abs(ref):>16.2e} "
              f"{t1 - t0:>8.2f} {t2 - t1:>8.2f} {t3 - t2:>8.2f}")


if __name__ == "__main__":
    main()
