"""The one contract every teacher and student satisfies: a denoiser in sigma space.

``D(x, sigma, cond) -> x0_hat`` with ``x = x0 + sigma * noise`` (EDM / k-diffusion convention), float32
output. Adapters in :mod:`diffdistill.teachers` put diffusers VP, flow-matching and EDM networks behind it;
classifier-free guidance is a wrapper (:class:`CFGDenoiser`), not a flag.

Conditions (``cond``) are ``None`` (unconditional), a ``LongTensor[B]`` of class labels, or a
:class:`TextCond` holding text-encoder outputs. The helpers :func:`cond_cat` and :func:`cond_take` let
methods batch and slice any of them without knowing which.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

Cond = Any  # None | LongTensor[B] | TextCond


@dataclass
class TextCond:
    """Text conditioning as the UNet consumes it (already encoded).

    ``embeds``: ``[B, L, D]`` encoder hidden states. ``pooled`` / ``time_ids``: SDXL's extra inputs
    (``text_embeds`` and ``time_ids`` of ``added_cond_kwargs``), ``None`` for SD 1.5.
    """

    embeds: Tensor
    pooled: Optional[Tensor] = None
    time_ids: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def map(self, fn) -> "TextCond":
        """Apply ``fn`` to every tensor field (``None`` stays ``None``)."""
        return TextCond(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                           for f in fields(self)})


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditions along the batch axis (``None`` stays ``None``)."""
    if conds[0] is None:
        return None
    if isinstance(conds[0], TextCond):
        return TextCond(**{f.name: (None if getattr(conds[0], f.name) is None
                                    else torch.cat([getattr(c, f.name) for c in conds]))
                           for f in fields(TextCond)})
    return torch.cat(list(conds))


def cond_take(cond: Cond, index: Tensor | slice) -> Cond:
    """Select batch entries ``index`` of a condition."""
    if cond is None:
        return None
    if isinstance(cond, TextCond):
        return cond.map(lambda t: t[index])
    return cond[index]


def cond_to(cond: Cond, device: torch.device | str) -> Cond:
    """Move a condition to ``device``."""
    if cond is None:
        return None
    if isinstance(cond, TextCond):
        return cond.map(lambda t: t.to(device))
    return cond.to(device)


def as_sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return ``sigma`` as a float32 tensor of shape ``[B]`` on ``x``'s device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so ``t`` broadcasts against a tensor of rank ``ndim``."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


class Denoiser(nn.Module):
    """Base class: ``forward(x, sigma, cond) -> x0`` in sigma space, float32.

    Subclasses implement :meth:`denoise` and may override :meth:`null_cond` (the unconditional
    counterpart of a condition, used by classifier-free guidance).

    Attributes:
        sample_shape: ``(C, H, W)`` (or ``(D,)`` for toy data) of one sample in the denoiser's space.
        sigma_min, sigma_max: the smallest and largest noise levels the model was trained on.
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1] by EDM's convention).
        num_classes: number of class labels for class-conditional models, else ``None``.
        sigmas: the model's own discrete grid of noise levels, ascending (``None`` if continuous).
    """

    def __init__(self, sample_shape: Sequence[int], sigma_min: float, sigma_max: float,
                 sigma_data: float = 0.5, num_classes: Optional[int] = None,
                 sigmas: Optional[Tensor] = None) -> None:
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.num_classes = num_classes
        # The grid is a buffer so it follows .to(device) but is not trained nor saved.
        self.register_buffer("sigmas", None if sigmas is None else sigmas.float(), persistent=False)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond = None) -> Tensor:
        sigma = as_sigma_batch(sigma, x)
        return self.denoise(x, sigma, cond).float()

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def null_cond(self, cond: Cond) -> Cond:
        """The unconditional condition matching ``cond``'s batch (class label ``num_classes``)."""
        if cond is None:
            return None
        if isinstance(cond, Tensor) and self.num_classes is not None:
            return torch.full_like(cond, self.num_classes)
        raise ValueError(f"{type(self).__name__} has no unconditional counterpart for {type(cond).__name__}")

    def sigma_grid(self, n: int = 1000) -> Tensor:
        """The model's own ascending grid, or a log-uniform grid of ``n`` levels when it has none."""
        if self.sigmas is not None:
            return self.sigmas
        return torch.logspace(torch.log10(torch.tensor(self.sigma_min)), torch.log10(torch.tensor(self.sigma_max)), n)


class CFGDenoiser(Denoiser):
    """Classifier-free guidance around a conditional denoiser.

    ``D_w(x, s, c) = D(x, s, null) + w * (D(x, s, c) - D(x, s, null))``; ``w = 1`` is the plain
    conditional model (one evaluation), ``w = 0`` the unconditional one. Both branches run as one batch.
    """

    def __init__(self, inner: Denoiser, guidance_scale: float) -> None:
        super().__init__(inner.sample_shape, inner.sigma_min, inner.sigma_max, inner.sigma_data,
                         inner.num_classes, inner.sigmas)
        self.inner = inner
        self.guidance_scale = float(guidance_scale)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        w = self.guidance_scale
        if cond is None or w == 1.0:
            return self.inner(x, sigma, cond)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([cond, self.inner.null_cond(cond)]))
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + w * (d_cond - d_uncond)

    def null_cond(self, cond: Cond) -> Cond:
        return self.inner.null_cond(cond)


class EDMPrecond(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1) around a raw network ``F(x_in, c_noise, cond)``.

    ``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s), cond)`` with
    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``,
    ``c_noise = ln(s) / 4``. Used for networks trained here (the toy MLP, small students).
    """

    def __init__(self, net: nn.Module, sample_shape: Sequence[int], sigma_min: float = 0.002,
                 sigma_max: float = 80.0, sigma_data: float = 0.5, num_classes: Optional[int] = None) -> None:
        super().__init__(sample_shape, sigma_min, sigma_max, sigma_data, num_classes)
        self.net = net

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        sd = self.sigma_data
        s = append_dims(sigma, x.ndim)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise, cond).float()

    def spec(self) -> dict:
        """JSON-able constructor description (the raw network must have ``spec()`` too)."""
        inner = getattr(self.net, "spec", None)
        if inner is None:
            raise ValueError(f"the raw network {type(self.net).__name__} has no spec()")
        return {"class": "EDMPrecond", "net": inner(), "sample_shape": list(self.sample_shape),
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data,
                "num_classes": self.num_classes}
