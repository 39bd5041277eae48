"""Diffusers VP / DDPM UNets behind the sigma-space denoiser contract.

A DDPM-style model sees ``x_t = alpha_t x0 + s_t n`` with ``alpha_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``
at integer timesteps ``t``. In sigma space ``x = x0 + sigma n`` with ``sigma_t = s_t / alpha_t``, so
``x_t = alpha x`` with ``alpha = 1 / sqrt(1 + sigma^2)`` (:func:`schedules.vp_scale`), and any sigma between two
grid points maps to a fractional timestep (log-sigma interpolation, k-diffusion's ``DiscreteSchedule``).
The network's output becomes ``x0``:

- ``epsilon``: ``x0 = (x_t - s_t eps) / alpha_t = x - sigma eps``;
- ``v_prediction`` (Salimans & Ho 2022): ``x0 = alpha_t x_t - s_t v``;
- ``sample``: the output is ``x0``.

Unlike diffusers' schedulers the adapter never clips ``x0`` (``clip_sample``/thresholding are sampler
choices, not part of the model).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, TextCond, append_dims
from ..schedules import sigma_to_t, vp_sigmas

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def unet_config_keys(unet_class: Optional[str] = None) -> list[str]:
    """The config keys (constructor arguments) of ``unet_class``, or of every class in ``UNET_CLASSES``:
    what a small student's ``student.small`` overrides and ``dsm.unet`` may set."""
    import inspect

    import diffusers

    keys: set[str] = set()
    for name in ([unet_class] if unet_class else UNET_CLASSES):
        params = inspect.signature(getattr(diffusers, name).__init__).parameters
        keys |= {k for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD}
    return sorted(keys)


def ddpm_from_config(scheduler: Any):
    """A ``DDPMScheduler`` with the betas of any DDPM-compatible scheduler (or its config dict)."""
    import inspect

    from diffusers import DDPMScheduler

    config = scheduler.config if hasattr(scheduler, "config") else scheduler
    accepted = inspect.signature(DDPMScheduler.__init__).parameters  # LCM / DDIM / Euler keys are not DDPM's
    return DDPMScheduler.from_config({k: v for k, v in dict(config).items() if k in accepted or k.startswith("_")})


def ddim_sigmas(scheduler: Any, steps: int) -> Tensor:
    """Descending sigma-space levels of diffusers' ``DDIMScheduler`` with ``steps`` inference steps.

    ``scheduler`` is a DDIM-compatible scheduler or config. The levels are ``sigma(t)`` for the
    scheduler's ``timesteps`` followed by the final level: 0 when ``set_alpha_to_one`` (``abar = 1``), else
    ``sigma(0)``. :func:`diffdistill.samplers.ddim` on these levels is diffusers' deterministic DDIM
    (exact for ``leading`` / ``trailing`` spacing, where each step goes to the next listed timestep).
    """
    from diffusers import DDIMScheduler

    config = scheduler.config if hasattr(scheduler, "config") else scheduler
    ddim = DDIMScheduler.from_config(dict(config))
    ddim.set_timesteps(steps)
    grid = vp_sigmas(ddim.alphas_cumprod)
    final = 0.0 if ddim.config.set_alpha_to_one else float(grid[0])
    return torch.cat([grid[ddim.timesteps.long()], torch.tensor([final], dtype=grid.dtype)]).float()


def _sample_hw(sample_size: Any) -> tuple[int, int]:
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0]), int(sample_size[1])
    return int(sample_size), int(sample_size)


class VPUNetDenoiser(Denoiser):
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` trained with a DDPM schedule, in sigma space.

    Args:
        unet: the network. ``UNet2DModel`` is unconditional or class-conditional (``cond`` = labels,
            passed as ``class_labels``); ``UNet2DConditionModel`` takes a :class:`TextCond`
            (``encoder_hidden_states``; SDXL's ``added_cond_kwargs`` from ``pooled`` / ``time_ids``).
        scheduler: a DDPM-compatible scheduler or its config: gives ``alphas_cumprod`` and ``prediction_type``.
        num_classes: number of real classes; default the UNet's ``num_class_embeds`` (then there is no
            null label). Label ``num_classes`` is the null (unconditional) label when the UNet has one more
            embedding than real classes.
        sigma_data: data standard deviation (0.5 for images in [-1, 1]).
    """

    def __init__(self, unet: nn.Module, scheduler: Any, num_classes: Optional[int] = None,
                 sigma_data: float = 0.5) -> None:
        name = type(unet).__name__
        if name not in UNET_CLASSES:
            raise ValueError(f"VPUNetDenoiser wraps {' or '.join(UNET_CLASSES)}, got {name}")
        ddpm = ddpm_from_config(scheduler)
        prediction_type = ddpm.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        num_embeds = unet.config.get("num_class_embeds")
        if num_classes is None:
            num_classes = num_embeds
        elif num_embeds is None or num_classes > num_embeds:
            raise ValueError(f"num_classes={num_classes} but the UNet has num_class_embeds={num_embeds}")
        grid = vp_sigmas(ddpm.alphas_cumprod)  # ascending in t, float64
        config = scheduler.config if hasattr(scheduler, "config") else scheduler
        channels = unet.config.in_channels
        super().__init__((channels, *_sample_hw(unet.config.sample_size)), float(grid[0]), float(grid[-1]),
                         sigma_data, num_classes, grid)
        self.unet = unet
        self.scheduler_config = dict(config)
        self.prediction_type = prediction_type
        self.is_text = name == "UNet2DConditionModel"
        self.has_null_class = num_embeds is not None and num_embeds > num_classes
        # Empty-prompt encodings (set by the loader); buffers so they follow .to(device), never saved.
        for field in ("embeds", "pooled", "time_ids"):
            self.register_buffer(f"null_text_{field}", None, persistent=False)

    # ---------------------------------------------------------------------------------------------
    @property
    def null_text(self) -> Optional[TextCond]:
        """The empty-prompt :class:`TextCond` (batch 1), or ``None`` when not set."""
        if self.null_text_embeds is None:
            return None
        return TextCond(self.null_text_embeds, self.null_text_pooled, self.null_text_time_ids)

    @null_text.setter
    def null_text(self, value: Optional[TextCond]) -> None:
        for field in ("embeds", "pooled", "time_ids"):
            t = None if value is None else getattr(value, field)
            setattr(self, f"null_text_{field}", None if t is None else t[:1].detach().clone())

    def null_cond(self, cond: Cond) -> Cond:
        """Null label ``num_classes`` for labels; the empty-prompt encoding for text; ``None`` stays ``None``."""
        if cond is None:
            return None
        if isinstance(cond, TextCond):
            if self.null_text is None:
                raise ValueError("this text-conditional model has no empty-prompt encoding (null_text) set")
            return self.null_text.map(lambda t: t.expand(len(cond), *t.shape[1:]))
        if not self.has_null_class:
            raise ValueError(f"this model has no unconditional class: the UNet has num_class_embeds="
                             f"{self.unet.config.get('num_class_embeds')} for num_classes={self.num_classes} "
                             "(a null label needs num_class_embeds = num_classes + 1)")
        return torch.full_like(cond, self.num_classes)

    # ---------------------------------------------------------------------------------------------
    def _unet_kwargs(self, cond: Cond, batch: int) -> dict:
        """Keyword arguments carrying ``cond`` into the UNet's forward."""
        dtype = self.unet.dtype
        if self.is_text:
            if cond is None:
                cond = self.null_cond(TextCond(torch.empty(batch, 0)))
            if not isinstance(cond, TextCond):
                raise ValueError(f"a UNet2DConditionModel needs a TextCond, got {type(cond).__name__}")
            kwargs: dict = {"encoder_hidden_states": cond.embeds.to(dtype)}
            if self.unet.config.get("addition_embed_type") == "text_time":
                if cond.pooled is None or cond.time_ids is None:
                    raise ValueError("an SDXL UNet needs TextCond.pooled and TextCond.time_ids")
                kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
            return kwargs
        if self.unet.config.get("num_class_embeds") is None:
            return {}  # unconditional model: labels, if any, are ignored
        if cond is None:
            cond = self.null_cond(torch.zeros(batch, dtype=torch.long, device=self.unet.device))
        return {"class_labels": cond}

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        # Coefficients in float64: at large t, x0 = (x_t - s_t eps) / alpha_t amplifies rounding by 1/alpha_t.
        s = append_dims(sigma.double(), x.ndim)
        alpha = 1 / (1 + s**2).sqrt()  # sqrt(abar_t)
        x_t = x.double() * alpha
        t = sigma_to_t(sigma, self.sigmas).float()  # fractional timestep, exact at grid points
        # The network runs in its own dtype (e.g. bf16 teachers); the conversion runs in float64.
        out = self.unet(x_t.to(self.unet.dtype), t, **self._unet_kwargs(cond, x.shape[0])).sample.double()
        if self.prediction_type == "epsilon":
            x0 = x.double() - s * out
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x_t - alpha * s * out  # alpha x_t - s_t v, with s_t = alpha sigma
        else:
            x0 = out
        return x0.float()

    @contextlib.contextmanager
    def capture_bottleneck(self) -> Iterator[list[Tensor]]:
        """Collect the UNet's mid-block output (float32, graph kept) of every forward run inside the block.

        A forward hook on ``unet.mid_block``, so it also works when the forward goes through a DDP wrapper::

            with net.capture_bottleneck() as feats:
                x0 = wrapped_net(x, sigma, cond)
            features = feats[-1]  # [B, C', h, w]
        """
        if getattr(self.unet, "mid_block", None) is None:
            raise ValueError(f"{type(self.unet).__name__} has no mid_block to take bottleneck features from")
        features: list[Tensor] = []

        def hook(_module, _inputs, out):
            features.append((out[0] if isinstance(out, tuple) else out).float())

        handle = self.unet.mid_block.register_forward_hook(hook)
        try:
            yield features
        finally:
            handle.remove()

    def bottleneck(self, x: Tensor, sigma: Tensor | float, cond: Cond = None) -> tuple[Tensor, Tensor]:
        """``(x0, features)``: the denoised sample plus the UNet's mid-block output ``[B, C', h, w]``.

        The features keep their graph (DMD2's GAN head trains through them); returned in float32.
        """
        with self.capture_bottleneck() as features:
            x0 = self(x, sigma, cond)
        return x0, features[-1]

    # ---------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        """JSON-able constructor description: rebuild an identical architecture with :meth:`from_spec`."""
        unet_config = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        return {"class": "VPUNetDenoiser", "unet_class": type(self.unet).__name__, "unet_config": unet_config,
                "scheduler_config": {k: v for k, v in self.scheduler_config.items()},
                "num_classes": self.num_classes, "sigma_data": self.sigma_data}

    @classmethod
    def from_spec(cls, spec: Mapping, **overrides: Any) -> "VPUNetDenoiser":
        """A randomly initialised adapter from :meth:`spec`'s output, UNet config updated by ``overrides``."""
        import diffusers

        unet_cls = spec["unet_class"]
        if unet_cls not in UNET_CLASSES:
            raise ValueError(f"unsupported UNet class {unet_cls!r}")
        unknown = sorted(set(overrides) - set(unet_config_keys(unet_cls)))
        if unknown:  # diffusers' from_config would drop them with a warning and build the full-size network
            import difflib

            close = difflib.get_close_matches(unknown[0], unet_config_keys(unet_cls), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{unet_cls} has no config key '{unknown[0]}'{hint}")
        config = dict(spec["unet_config"])
        n_blocks = len(config.get("down_block_types", ()))
        if "block_out_channels" in overrides and "down_block_types" not in overrides and n_blocks:
            # Fewer levels than the teacher: keep the outermost block types (down: first k, up: last k).
            k = len(overrides["block_out_channels"])
            if k > n_blocks:
                raise ValueError(f"block_out_channels has {k} entries but the UNet has {n_blocks} blocks; "
                                 "also set down_block_types and up_block_types")
            overrides = {**overrides, "down_block_types": list(config["down_block_types"])[:k],
                         "up_block_types": list(config["up_block_types"])[n_blocks - k:]}
        config.update(overrides)
        try:
            unet = getattr(diffusers, unet_cls).from_config(config)
        except Exception as e:  # diffusers raises assorted errors for inconsistent configs
            raise ValueError(f"cannot build {unet_cls} with overrides {overrides}: {e}") from e
        return cls(unet, spec["scheduler_config"], spec.get("num_classes"), spec.get("sigma_data", 0.5))

    def rebuild(self, **overrides: Any) -> "VPUNetDenoiser":
        """A fresh, randomly initialised adapter of the same family and schedule (float32, same device),
        the UNet config updated by ``overrides`` (e.g. ``block_out_channels=[16, 32]``): "small" students."""
        new = self.from_spec(self.spec(), **overrides).to(self.unet.device)
        new.null_text = self.null_text
        return new
