"""Noise schedules and parameterisation conversions, as pure functions.

Sigma space: ``x = x0 + sigma * n``. A VP model sees ``x_t = alpha_t x0 + s_t n`` with
``alpha_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``, hence ``sigma = s_t / alpha_t`` and
``x_t = x / sqrt(1 + sigma^2)``. Flow matching: ``x_t = (1 - t) x0 + t n`` so ``sigma = t / (1 - t)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's grid (Karras et al. 2022, eq. 5): ``n`` levels, descending from sigma_max to sigma_min."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` for each discrete timestep (ascending in t)."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def sigma_to_t(sigma: Tensor, grid: Tensor) -> Tensor:
    """Fractional timestep of ``sigma`` on an ascending discrete ``grid``: linear in ``log sigma``.

    Exact at grid points; clamped to ``[0, len(grid) - 1]`` outside the grid (k-diffusion's
    ``DiscreteSchedule.sigma_to_t``).
    """
    log_grid = grid.double().log()
    log_s = sigma.double().clamp(min=1e-12).log().to(log_grid.device)
    idx = torch.searchsorted(log_grid, log_s).clamp(1, len(grid) - 1)
    lo, hi = log_grid[idx - 1], log_grid[idx]
    w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
    return (idx - 1 + w).to(sigma.device)


def t_to_sigma(t: Tensor, grid: Tensor) -> Tensor:
    """Inverse of :func:`sigma_to_t`: interpolate ``log sigma`` between neighbouring grid points."""
    t = t.double().clamp(0, len(grid) - 1)
    lo = t.floor().long().clamp(max=len(grid) - 2)
    w = t - lo
    log_grid = grid.double().log().to(t.device)
    return (log_grid[lo] * (1 - w) + log_grid[lo + 1] * w).exp().float()


def vp_scale(sigma: Tensor) -> Tensor:
    """``alpha = 1 / sqrt(1 + sigma^2)``: multiply a sigma-space sample by it to get the VP input."""
    return 1 / (1 + sigma**2).sqrt()


def eps_to_x0(x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """Sigma space: ``x0 = x - sigma * eps``."""
    return x - sigma * eps


def x0_to_eps(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """Sigma space: ``eps = (x - x0) / sigma``."""
    return (x - x0) / sigma


def v_to_x0(x_t: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    """VP v-prediction (Salimans & Ho 2022): ``x0 = alpha x_t - s v`` on the VP sample ``x_t``."""
    alpha = vp_scale(sigma)
    return alpha * x_t - alpha * sigma * v


def x0_to_score(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """Tweedie: ``grad log p_sigma(x) = (x0 - x) / sigma^2``."""
    return (x0 - x) / sigma**2


def flow_sigma(t: Tensor) -> Tensor:
    """Flow matching time to sigma: ``sigma = t / (1 - t)``."""
    return t / (1 - t)


def flow_t(sigma: Tensor) -> Tensor:
    """Sigma to flow matching time: ``t = sigma / (1 + sigma)``."""
    return sigma / (1 + sigma)


def quantile_range(grid: Tensor, lo: float = 0.02, hi: float = 0.98) -> tuple[float, float]:
    """The sigmas at the ``lo`` and ``hi`` quantiles of a discrete ascending grid's indices."""
    n = len(grid)
    return float(grid[int(math.floor(lo * (n - 1)))]), float(grid[int(math.ceil(hi * (n - 1)))])


def timestep_levels(grid: Tensor, steps: int) -> list[float]:
    """``steps`` descending sigmas at evenly spaced discrete timesteps from the top: ``T-1, T-1-T/k, ...``.

    DMD2's 4-step SDXL student uses timesteps 999, 749, 499, 249, which this returns for ``T=1000, k=4``.
    """
    n = len(grid)
    return [float(grid[n - 1 - (i * n) // steps]) for i in range(steps)]
