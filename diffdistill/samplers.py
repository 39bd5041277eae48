"""Teacher ODE solvers as plain functions with one signature.

``sampler(denoiser, x, sigmas, cond=None, generator=None) -> SampleResult``: ``x`` is the initial
sample at ``sigmas[0]`` (e.g. ``sigmas[0] * z``), ``sigmas`` a descending list of levels; a final 0 is
appended when missing. Each returns the clean sample and the number of network evaluations (NFE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .denoiser import Cond, Denoiser



@dataclass
class SampleResult:
    """A sampler's output: the final sample and how many network evaluations it took."""

    x: Tensor
    nfe: int


def _with_zero(sigmas: Sequence[float] | Tensor) -> list[float]:
    s = [float(v) for v in sigmas]
    if s[-1] != 0.0:
        s.append(0.0)
    return s


@torch.no_grad()
def euler(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float] | Tensor, cond: Cond = None,
          generator: Optional[torch.Generator] = None) -> SampleResult:
    """Euler on the probability-flow ODE ``dx/ds = (x - D(x, s)) / s`` (EDM Alg. 1 without Heun)."""
    s = _with_zero(sigmas)
    nfe = 0
    for s_cur, s_next in zip(s[:-1], s[1:]):
        x0 = denoiser(x, s_cur, cond)
        nfe += 1
        x = x0 + (s_next / s_cur) * (x - x0)  # x + (s_next - s_cur) * (x - x0) / s_cur
    return SampleResult(x, nfe)


@torch.no_grad()
def heun(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float] | Tensor, cond: Cond = None,
         generator: Optional[torch.Generator] = None) -> SampleResult:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1); the last step to 0 is Euler."""
    s = _with_zero(sigmas)
    nfe = 0
    for s_cur, s_next in zip(s[:-1], s[1:]):
        d_cur = (x - denoiser(x, s_cur, cond)) / s_cur
        nfe += 1
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next, cond)) / s_next
            nfe += 1
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return SampleResult(x, nfe)


@torch.no_grad()
def ddim(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float] | Tensor, cond: Cond = None,
         generator: Optional[torch.Generator] = None, eta: float = 0.0) -> SampleResult:
    """DDIM (Song et al. 2021). In sigma space deterministic DDIM is ``x' = x0 + s' (x - x0) / s``.

    With ``eta > 0`` part of the noise is fresh: ``x' = x0 + sqrt(s'^2 - c^2) eps_hat + c z`` with
    ``c = eta * s' * sqrt(1 - s'^2 / s^2)`` (the sigma-space form of DDIM's eq. 16, VP-exact at eta=0).
    """
    s = _with_zero(sigmas)
    nfe = 0
    for s_cur, s_next in zip(s[:-1], s[1:]):
        x0 = denoiser(x, s_cur, cond)
        nfe += 1
        eps = (x - x0) / s_cur
        c = eta * s_next * max(0.0, 1 - s_next**2 / s_cur**2) ** 0.5
        x = x0 + (s_next**2 - c**2) ** 0.5 * eps
        if c > 0:
            x = x + c * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return SampleResult(x, nfe)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {"euler": euler, "heun": heun, "ddim": ddim}


def heun_steps_for_nfe(nfe: int) -> int:
    """Number of Heun levels whose NFE is ``nfe`` (``2 * steps - 1``)."""
    return (nfe + 1) // 2
