"""Pieces shared by the consistency family (iCT, CD, TSCD): the parameterisation, the losses, iCT's
curriculum and level distribution, the multistep sampler, and the paired-dropout RNG trick.

Notation: sigma space ``x_s = x + s * n``; ``f(x, s)`` is the consistency function (an estimate of the
trajectory's end point), with the boundary condition ``f(x, s_min) = x``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, append_dims, as_sigma_batch, cond_cat
from ..samplers import SampleResult
from ..schedules import karras_sigmas

LOSSES = ("huber", "huber_elementwise", "mse")


# --------------------------------------------------------------------------------------------------
# Parameterisation
def consistency_scalings(sigma: Tensor, sigma_min: float, sigma_data: float) -> tuple[Tensor, Tensor]:
    """iCT's ``c_skip = sd^2 / ((s - s_min)^2 + sd^2)``, ``c_out = sd (s - s_min) / sqrt(s^2 + sd^2)``.

    ``c_skip(s_min) = 1`` and ``c_out(s_min) = 0`` exactly, hence ``f(x, s_min) = x``.
    """
    ds = sigma - sigma_min
    c_skip = 1 / ((ds / sigma_data) ** 2 + 1)  # = sd^2 / (ds^2 + sd^2), written so that it is exactly 1 at ds = 0
    return c_skip, sigma_data * ds / (sigma**2 + sigma_data**2).sqrt()


def consistency_from_denoised(x: Tensor, sigma: Tensor, denoised: Tensor, sigma_min: float, sigma_data: float,
                              inner_sigma_data: float) -> Tensor:
    """The consistency output computed from an x0 prediction ``D(x, s)``.

    iCT writes ``f = c_skip x + c_out F`` on a raw network ``F``. A denoiser has no raw output, so we use
    the raw output that EDM preconditioning implies, ``F = (D - c_skip_edm x) / c_out_edm`` with
    ``c_skip_edm = sd'^2/(s^2 + sd'^2)``, ``c_out_edm = s sd'/sqrt(s^2 + sd'^2)`` (``sd'`` = the inner
    denoiser's sigma_data). With ``sd' = sd`` this gives (``c_out / c_out_edm = (s - s_min) / s``)

        f = c_skip x + (s - s_min) / s * (D - c_skip_edm x),

    an affine map of x and D as in LCM/PCM (``f = c_skip' x + c_out' D``) with ``c_out' = (s - s_min)/s``:
    exactly iCT's ``c_skip x + c_out F`` when ``D`` is an :class:`~diffdistill.denoiser.EDMPrecond` network,
    and ``f ~= D`` for ``s >> s_min`` for any teacher-initialised student (VP / LoRA), so a student copied
    from the teacher starts out as the teacher. ``x, denoised: [B, ...]``, ``sigma: [B]``.
    """
    s = append_dims(sigma, x.ndim)
    c_skip, _ = consistency_scalings(s, sigma_min, sigma_data)
    c_skip_edm = inner_sigma_data**2 / (s**2 + inner_sigma_data**2)
    return c_skip * x + (s - sigma_min) / s * (denoised - c_skip_edm * x)


class ConsistencyDenoiser(Denoiser):
    """A consistency function ``f(x, s)`` on top of any student denoiser (copy / small / lora).

    Args:
        inner: the student denoiser (x0 prediction); its parameters are the trained ones.
        sigma_min: the boundary level where ``f(x, s_min) = x`` (iCT: 0.002); default the inner's.
        sigma_data: ``sd`` in iCT's scalings (0.5 for images in [-1, 1]); default the inner's.

    ``forward(x, s, cond)`` returns ``f(x, s)`` (see :func:`consistency_from_denoised`). Valid for
    ``s >= sigma_min``. :meth:`apply` does the same on the output of another module (e.g. the DDP-wrapped
    inner network), so a method can train through ``accelerate``'s wrapper.
    """

    def __init__(self, inner: Denoiser, sigma_min: Optional[float] = None,
                 sigma_data: Optional[float] = None) -> None:
        super().__init__(inner.sample_shape, inner.sigma_min if sigma_min is None else sigma_min,
                         inner.sigma_max, inner.sigma_data if sigma_data is None else sigma_data,
                         inner.num_classes, inner.sigmas)
        self.inner = inner

    def apply(self, x: Tensor, sigma: Tensor | float, denoised: Tensor) -> Tensor:
        """``f`` from the inner denoiser's output ``denoised = D(x, sigma)``."""
        return consistency_from_denoised(x.float(), as_sigma_batch(sigma, x), denoised, self.sigma_min,
                                         self.sigma_data, self.inner.sigma_data)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        return self.apply(x, sigma, self.inner(x, sigma, cond))

    def null_cond(self, cond: Cond) -> Cond:
        return self.inner.null_cond(cond)


def ddim_jump(x: Tensor, x0: Tensor, sigma: Tensor, sigma_to: Tensor) -> Tensor:
    """Deterministic DDIM from level ``sigma`` to ``sigma_to`` along the prediction ``x0``:
    ``x' = x0 + (s'/s)(x - x0)``; at ``s' = s`` it returns ``x`` (a segment's boundary condition)."""
    ratio = append_dims(sigma_to / sigma, x.ndim)
    return x0 + ratio * (x - x0)


def guided_denoiser(teacher: Denoiser, cond: Cond, w: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, s) -> D_u + w (D_c - D_u)`` with a per-sample scale ``w: [B]`` (both branches in one batch);
    the plain ``D(x, s, cond)`` when unconditional or when every ``w == 1``."""
    if cond is None or bool((w == 1).all()):
        return lambda x, s: teacher(x, s, cond)

    def guided(x: Tensor, s: Tensor) -> Tensor:
        both = cond_cat([cond, teacher.null_cond(cond)])
        d_c, d_u = teacher(torch.cat([x, x]), torch.cat([s, s]), both).chunk(2)
        return d_u + append_dims(w, x.ndim) * (d_c - d_u)
    return guided


def solver_step(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, s: Tensor, s_to: Tensor,
                solver: str = "ddim") -> Tensor:
    """One probability-flow ODE step ``s -> s_to`` with per-sample levels ``[B]``: ``ddim`` (= Euler in
    sigma space) or ``heun`` (EDM's second-order correction, two evaluations)."""
    d = denoise(x, s)
    x_to = ddim_jump(x, d, s, s_to)
    if solver == "heun":
        d_to = denoise(x_to, s_to)
        slope = (x - d) / append_dims(s, x.ndim) + (x_to - d_to) / append_dims(s_to, x.ndim)
        x_to = x + append_dims(s_to - s, x.ndim) * 0.5 * slope
    return x_to


# --------------------------------------------------------------------------------------------------
# Losses: per-sample values [B]
def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant ``c = 0.00054 sqrt(d)`` (0.03 for CIFAR-10, d = 3072)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """iCT's metric over the whole sample: ``sqrt(||a - b||^2 + c^2) - c`` per sample, ``[B]``."""
    d2 = (a.float() - b.float()).pow(2).flatten(1).sum(1)
    return (d2 + c**2).sqrt() - c


def pseudo_huber_elementwise(a: Tensor, b: Tensor, c: float = 1e-3) -> Tensor:
    """PCM's metric: ``mean_elements(sqrt((a - b)^2 + c^2) - c)`` per sample, ``[B]``."""
    d2 = (a.float() - b.float()).pow(2)
    return ((d2 + c**2).sqrt() - c).flatten(1).mean(1)


def consistency_distance(a: Tensor, b: Tensor, kind: str, c: Optional[float] = None) -> Tensor:
    """Per-sample distance ``[B]``: ``huber`` (iCT; ``c`` default ``0.00054 sqrt(d)``),
    ``huber_elementwise`` (PCM; ``c`` default 1e-3) or ``mse`` (mean over elements)."""
    if kind == "huber":
        return pseudo_huber(a, b, ict_huber_c(a[0].numel()) if c is None else c)
    if kind == "huber_elementwise":
        return pseudo_huber_elementwise(a, b, 1e-3 if c is None else c)
    if kind == "mse":
        return (a.float() - b.float()).pow(2).flatten(1).mean(1)
    raise ValueError(f"unknown consistency loss {kind!r}; choose one of {', '.join(LOSSES)}")


# --------------------------------------------------------------------------------------------------
# iCT curriculum and level distribution
def ict_num_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation curriculum ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1`` with
    ``K' = floor(K / (log2 floor(s1 / s0) + 1))``: N doubles every K' steps, from s0 + 1 to s1 + 1."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def ict_sigmas(num_levels: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The Karras grid of ``num_levels`` levels, ascending ``s_0 = s_min < ... < s_{N-1} = s_max``."""
    return karras_sigmas(num_levels, sigma_min, sigma_max, rho).flip(0)


def geometric_sigmas(num_levels: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``num_levels`` ascending levels ``s_min (s_max / s_min)^(i / (num_levels - 1))``, uniform in log sigma
    (= log-SNR), float64."""
    return torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), num_levels, dtype=torch.float64))


def lognormal_level_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """``p(i) ∝ erf((ln s_{i+1} - Pm) / (sqrt2 Ps)) - erf((ln s_i - Pm) / (sqrt2 Ps))``, i = 0 .. N-2.

    The mass a lognormal ``ln s ~ N(Pm, Ps^2)`` puts on each interval of the ascending grid ``sigmas``,
    renormalised to sum to 1 (float64).
    """
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


# --------------------------------------------------------------------------------------------------
# Randomness: the same dropout mask in both passes of a consistency pair
@contextlib.contextmanager
def fixed_rng(seed: int, device: torch.device | str) -> Iterator[None]:
    """Run the body with the global torch RNG (CPU and ``device``'s CUDA) seeded to ``seed``, then restore it.

    Dropout draws its masks from the global RNG; entering this twice with one seed gives the two passes
    of a consistency pair identical masks (iCT: the teacher and student dropout RNGs must match).
    """
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def draw_seed(generator: torch.Generator) -> int:
    """A fresh 62-bit seed from ``generator``."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def set_dropout(net: nn.Module, p: float) -> int:
    """Set ``p`` on every ``nn.Dropout`` of ``net``; returns how many were found."""
    found = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in found:
        m.p = float(p)
    return len(found)


# --------------------------------------------------------------------------------------------------
# Sampling
@torch.no_grad()
def consistency_sample(f: Callable[[Tensor, Tensor | float, Cond], Tensor], z: Tensor, sigma_max: float,
                       taus: Sequence[float] = (), sigma_min: float = 0.002, cond: Cond = None,
                       generator: Optional[torch.Generator] = None) -> SampleResult:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1).

    ``x = f(s_max z, s_max)``; for each ``tau`` in the decreasing ``taus``:
    ``x = f(x + sqrt(tau^2 - s_min^2) z', tau)`` with fresh ``z'``. iCT's CIFAR-10 two-step: ``taus=[0.821]``.
    """
    x = f(sigma_max * z, sigma_max, cond)
    for tau in taus:
        n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = f(x + math.sqrt(max(tau**2 - sigma_min**2, 0.0)) * n, tau, cond)
    return SampleResult(x, 1 + len(taus))

