"""Rectified-flow / flow-matching velocity networks behind the sigma-space denoiser contract.

Flow matching interpolates ``x_t = (1 - t) x0 + t n`` for ``t`` in ``[0, 1]`` and trains ``v = n - x0``.
Dividing by ``1 - t``: ``x_t / (1 - t) = x0 + t / (1 - t) n``, so ``sigma = t / (1 - t)``,
``t = sigma / (1 + sigma)`` and ``x_t = x / (1 + sigma)`` (:func:`schedules.flow_t`). From the velocity,
``x0 = x_t - t v`` (since ``x_t - t (n - x0) = x0 (1 - t) + t x0 = x0``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, TextCond, append_dims
from ..schedules import flow_sigma


class FlowMatchingDenoiser(Denoiser):
    """A velocity network ``v = net(x_t, timestep, cond)`` in sigma space.

    Args:
        net: the velocity network. Called as ``net(x_t, timestep, cond)`` (``cond`` passed positionally,
            e.g. a ``UNet2DModel``'s ``class_labels``); with a :class:`TextCond` it is called like diffusers'
            SD3 transformer: ``net(hidden_states=x_t, timestep=..., encoder_hidden_states=embeds,
            pooled_projections=pooled)``. An output with ``.sample`` or a tuple is unwrapped.
        sample_shape: ``(C, H, W)`` of one sample.
        timestep_scale: ``timestep = t * timestep_scale`` (diffusers SD3 / Flux: 1000; 1 for nets trained on
            ``t`` in [0, 1]).
        t_min, t_max: the flow times the net was trained on; ``sigma_min/max = t / (1 - t)`` of them.
        sigma_data: data standard deviation.
        num_classes: number of classes of a class-conditional net (label ``num_classes`` = null label).
    """

    def __init__(self, net: nn.Module, sample_shape: Sequence[int], timestep_scale: float = 1000.0,
                 t_min: float = 1e-3, t_max: float = 0.999, sigma_data: float = 0.5,
                 num_classes: Optional[int] = None) -> None:
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        super().__init__(sample_shape, float(flow_sigma(torch.tensor(t_min, dtype=torch.float64))),
                         float(flow_sigma(torch.tensor(t_max, dtype=torch.float64))), sigma_data, num_classes)
        self.net = net
        self.timestep_scale = float(timestep_scale)

    def _net_dtype(self, x: Tensor):
        p = next(self.net.parameters(), None)
        return x.dtype if p is None else p.dtype

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The raw network's velocity at flow time ``t`` (``[B]``), in the network's dtype."""
        timestep = t * self.timestep_scale
        if isinstance(cond, TextCond):
            out = self.net(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond.embeds.to(x_t.dtype),
                           pooled_projections=None if cond.pooled is None else cond.pooled.to(x_t.dtype))
        else:
            out = self.net(x_t, timestep, cond)
        out = getattr(out, "sample", out)
        return out[0] if isinstance(out, tuple) else out

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        s = append_dims(sigma.double(), x.ndim)
        t = s / (1 + s)  # flow time of sigma
        x_t = x.double() / (1 + s)  # (1 - t) x0 + t n
        v = self.velocity(x_t.to(self._net_dtype(x)), (sigma.double() / (1 + sigma.double())).float(), cond)
        return (x_t - t * v.double()).float()  # x0 = x_t - t v
