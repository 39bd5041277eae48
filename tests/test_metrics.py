"""Fréchet distance, streaming statistics, .npz round trip and precision/recall: parity and invariants."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from diffdistill.errors import UserError
from diffdistill.metrics import (
    FeatureStats,
    fid_from_features,
    frechet_distance,
    load_stats,
    precision_recall,
    save_stats,
)
from diffdistill.metrics.fid import feature_moments


def _random_gaussian(dim, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=dim), a @ a.T + 0.5 * np.eye(dim)  # well-conditioned SPD


def _scipy_fid(mu1, s1, mu2, s2):
    """The pytorch-fid / EDM formula with scipy.linalg.sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_frechet_matches_scipy_sqrtm(dim):
    mu1, s1 = _random_gaussian(dim, 0)
    mu2, s2 = _random_gaussian(dim, 1)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    # torch inputs give the same number
    assert frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))) == pytest.approx(ours, rel=1e-12)


def test_frechet_matches_torchmetrics_compute_fid():
    from torchmetrics.image.fid import _compute_fid

    mu1, s1 = _random_gaussian(64, 2)
    mu2, s2 = _random_gaussian(64, 3)
    tm = float(_compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(tm, rel=1e-6)


class _Identity(nn.Module):
    """A custom torchmetrics 'feature network': the inputs are already features."""

    num_features = 16

    def forward(self, x):
        return x


def test_fid_from_features_matches_torchmetrics_metric():
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 16, generator=g, dtype=torch.float64)
    fake = 1.3 * torch.randn(400, 16, generator=g, dtype=torch.float64) + 0.2
    metric = FrechetInceptionDistance(feature=_Identity())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_fid_invariants_self_symmetric_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    y = torch.randn(2000, 8, generator=g, dtype=torch.float64) * 1.2
    assert abs(fid_from_features(x, x)) < 1e-8
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-9)
    shifts = [fid_from_features(x, x + s) for s in (0.1, 0.3, 1.0)]
    assert shifts[0] < shifts[1] < shifts[2]
    assert shifts[2] == pytest.approx(8 * 1.0**2, rel=1e-6)  # a pure shift adds ||delta||^2 exactly


def test_fid_of_halves_is_small_and_shrinks_with_n():
    g = torch.Generator().manual_seed(2)
    values = []
    for n in (400, 4000):
        x = torch.randn(n, 8, generator=g, dtype=torch.float64)
        values.append(fid_from_features(x[: n // 2], x[n // 2:]))
    # expected bias ~ d(d+3)/(2 n_half) for Gaussians: ~0.22 at 400, ~0.022 at 4000
    assert values[0] < 0.5 and values[1] < 0.06 and values[1] < values[0] / 3


def test_streaming_stats_match_numpy():
    x = np.random.default_rng(3).normal(size=(1000, 12)) * 3 + 1
    stats = FeatureStats(12)
    for chunk in np.array_split(x, 7):
        stats.update(torch.from_numpy(chunk))
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    _mu, sigma = feature_moments(x)
    np.testing.assert_allclose(sigma, stats.sigma, rtol=1e-12)


def test_npz_round_trip_is_exact(tmp_path):
    mu, sigma = _random_gaussian(32, 4)
    save_stats(tmp_path / "ref.npz", mu, sigma)
    data = load_stats(tmp_path / "ref.npz")
    assert data["mu"].dtype == np.float64 and np.array_equal(data["mu"], mu) and np.array_equal(data["sigma"], sigma)
    # a file written the EDM way (np.savez(f, mu=..., sigma=...)) loads too
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma)
    assert np.allclose(load_stats(tmp_path / "edm.npz")["mu"], mu, atol=1e-6)


def test_npz_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(UserError, match="lacks the keys mu and sigma"):
        load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", mu=np.array([{"x": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(UserError, match="cannot read"):
        load_stats(tmp_path / "obj.npz")  # object arrays would need unpickling: refused


def test_precision_recall_sanity():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 4, generator=g)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    # a generator that covers only half of a two-mode dataset: high precision, recall ~ 1/2
    real = torch.cat([torch.randn(300, 2, generator=g) - 10, torch.randn(300, 2, generator=g) + 10])
    fake = torch.randn(300, 2, generator=g) - 10
    p, r = precision_recall(real, fake)
    assert p > 0.9 and 0.4 < r < 0.6
