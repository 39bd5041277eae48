"""An exact toy teacher: a Gaussian mixture whose denoiser is known in closed form, plus a small MLP
denoiser for toy students and distribution distances for tests.

For ``p(x0) = sum_k pi_k N(mu_k, s_k^2 I)`` the noisy marginal is ``sum_k pi_k N(mu_k, (s_k^2 + sigma^2) I)``
and the ideal denoiser is ``E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k))`` with
responsibilities ``r_k`` (EDM2's ``toy_example.py`` uses the same construction).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .denoiser import Cond, Denoiser, EDMPrecond


class GaussianMixture:
    """Isotropic Gaussian mixture in any dimension, with exact sampling and log-densities."""

    def __init__(self, means: Sequence[Sequence[float]] | Tensor, stds: Sequence[float] | Tensor,
                 weights: Sequence[float] | Tensor) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        if self.means.ndim != 2 or len(self.stds) != len(self.means) or len(self.weights) != len(self.means):
            raise ValueError("means must be [K, D]; stds and weights must have K entries")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` float32 samples."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float()

    def responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """``r_k(x)`` under the mixture noised to ``sigma``: ``[N, K]``."""
        x = x.double()
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        var = self.stds.to(x.device) ** 2 + sigma**2  # [N or 1, K]
        d2 = ((x[:, None, :] - self.means.to(x.device)[None]) ** 2).sum(-1)  # [N, K]
        logp = self.weights.to(x.device).log() - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.softmax(logp, dim=1)

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Exact ``E[x0 | x0 + sigma n = x]`` for ``x: [N, D]``, ``sigma: [N]``."""
        r = self.responsibilities(x, sigma)  # [N, K]
        s2 = self.stds.to(x.device) ** 2
        gain = s2 / (s2 + sigma.double().reshape(-1, 1) ** 2)  # [N, K]
        mu = self.means.to(x.device)
        per_k = mu[None] + gain[..., None] * (x.double()[:, None, :] - mu[None])  # [N, K, D]
        return (r[..., None] * per_k).sum(1).float()

    def assign(self, x: Tensor) -> Tensor:
        """Nearest component (by responsibility at sigma 0) of each sample."""
        return self.responsibilities(x).argmax(1)

    def mode_weights(self, x: Tensor) -> Tensor:
        """Fraction of samples assigned to each component."""
        return torch.bincount(self.assign(x).cpu(), minlength=len(self.weights)).double() / len(x)

    def mode_means(self, x: Tensor) -> Tensor:
        """Mean of the samples assigned to each component (NaN for an empty component)."""
        k = self.assign(x).cpu()
        return torch.stack([x[k == i].double().mean(0) if (k == i).any() else
                            torch.full((self.dim,), float("nan"), dtype=torch.float64)
                            for i in range(len(self.weights))])


def default_mixture() -> GaussianMixture:
    """The 2-D, unequal-weight mixture used throughout the tests: three modes, weights 0.5/0.3/0.2."""
    return GaussianMixture(means=[[-2.0, 0.0], [2.0, 1.0], [0.5, -2.5]], stds=[0.3, 0.4, 0.25],
                           weights=[0.5, 0.3, 0.2])


class MixtureDenoiser(Denoiser):
    """The exact denoiser of a :class:`GaussianMixture` (unconditional; ``cond`` is ignored)."""

    def __init__(self, mixture: GaussianMixture, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        data_std = float((mixture.weights[:, None] * (mixture.means**2 + mixture.stds[:, None] ** 2)).sum(0).mean().sqrt())
        super().__init__((mixture.dim,), sigma_min, sigma_max, sigma_data=data_std)
        self.mixture = mixture

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        return self.mixture.denoise(x, sigma)


class MLP(nn.Module):
    """Raw network ``F(x_in, c_noise, cond)`` for toy data: sinusoidal noise embedding, SiLU MLP.

    ``num_classes``: adds a label embedding (index ``num_classes`` is the null label) when set.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, emb: int = 32,
                 num_classes: Optional[int] = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "emb": emb, "num_classes": num_classes,
                       "dropout": dropout}
        self.emb = emb
        self.label = nn.Embedding(num_classes + 1, emb) if num_classes else None
        layers: list[nn.Module] = [nn.Linear(dim + emb, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def spec(self) -> dict:
        """Constructor description for student artefacts."""
        return {"class": "toy.MLP", "config": dict(self.config)}

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond = None) -> Tensor:
        half = self.emb // 2
        freqs = torch.exp(torch.arange(half, device=x.device) * (-math.log(1000.0) / half))
        ang = c_noise.reshape(-1, 1) * 100 * freqs  # c_noise = ln(s)/4 spans roughly [-2, 1.1]
        e = torch.cat([ang.sin(), ang.cos()], 1)
        if self.label is not None and cond is not None:
            e = e + self.label(cond)
        return self.net(torch.cat([x, e], 1))


def mlp_denoiser(dim: int = 2, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 **mlp_kwargs) -> EDMPrecond:
    """An EDM-preconditioned :class:`MLP` denoiser for toy students."""
    return EDMPrecond(MLP(dim, **mlp_kwargs), (dim,), sigma_min, sigma_max, sigma_data)


def fit_mlp_denoiser(mixture: GaussianMixture, steps: int = 1000, hidden: int = 128, batch_size: int = 256,
                     lr: float = 2e-3, seed: int = 0) -> EDMPrecond:
    """An :func:`mlp_denoiser` fitted to ``mixture`` by denoising score matching (EDM loss and log-normal
    levels ``ln s ~ N(-1.2, 1.2^2)``), Adam at a constant ``lr``; deterministic given ``seed``.

    Stands in for "a copy of the teacher" when the teacher is the exact (parameter-free) mixture denoiser.
    """
    sd = MixtureDenoiser(mixture).sigma_data
    torch.manual_seed(seed)
    net = mlp_denoiser(mixture.dim, sigma_data=sd, hidden=hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = mixture.sample(batch_size, g)
        s = (torch.randn(batch_size, generator=g) * 1.2 - 1.2).exp()
        x = x0 + s[:, None] * torch.randn(x0.shape, generator=g)
        # EDM weighting (s^2 + sd^2) / (s sd)^2: unit-variance effective training target at every level
        loss = (((s**2 + sd**2) / (s * sd) ** 2)[:, None] * (net(x, s) - x0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``2 E|x - y| - E|x - x'| - E|y - y'|`` (unbiased within-set terms)."""
    x, y = x.double(), y.double()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (len(x) * (len(x) - 1))
    yy = torch.cdist(y, y).sum() / (len(y) * (len(y) - 1))
    return float(2 * xy - xx - yy)


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between equal-size sample sets, averaged over random directions."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    n = min(len(x), len(y))
    px = (x[:n].double() @ d).sort(0).values
    py = (y[:n].double() @ d).sort(0).values
    return float((px - py).abs().mean())


