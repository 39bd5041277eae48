"""The :class:`Teacher` bundle: the unguided denoiser plus what turns images and prompts into its inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser, TextCond, module_device
from .text import prompt_cond


@dataclass
class Teacher:
    """A loaded teacher.

    Attributes:
        denoiser: the unguided sigma-space adapter (frozen, eval); wrap with ``CFGDenoiser`` for guidance.
            ``None`` when loaded with ``with_unet=False`` (components only, for a student's artefact).
        kind: ``"unet"`` (pixel or class-conditional latent UNet), ``"sd"`` (SD 1.5-style text-to-image) or
            ``"sdxl"``.
        path: where it was loaded from.
        vae: the ``AutoencoderKL`` of a latent teacher, else ``None``.
        vae_scaling_factor, vae_shift_factor: latents ``z = (E(x) - shift) * scale``.
        text_encoders, tokenizers: CLIP text encoders / tokenizers (``None`` without text).
        num_classes: real classes of a class-conditional teacher, else ``None``.
        image_shape: ``(C, H, W)`` of decoded images.
        meta: the folder's ``diffdistill.json`` (empty when absent).
    """

    denoiser: Optional[Denoiser]
    kind: str
    path: str
    vae: Optional[nn.Module] = None
    vae_scaling_factor: float = 1.0
    vae_shift_factor: float = 0.0
    text_encoders: Optional[list] = None
    tokenizers: Optional[list] = None
    num_classes: Optional[int] = None
    image_shape: tuple = ()
    meta: dict = field(default_factory=dict)
    null_text: Optional[TextCond] = None  # the empty prompt's encoding (SDXL: zeros), text teachers only

    @property
    def device(self) -> torch.device:
        modules = [m for m in (self.denoiser, self.vae, *(self.text_encoders or [])) if m is not None]
        return module_device(modules[0]) if modules else torch.device("cpu")

    @property
    def latent(self) -> bool:
        """Whether the denoiser works on VAE latents."""
        return self.vae is not None

    def to(self, device: torch.device | str) -> "Teacher":
        """Move every module to ``device`` (in place); returns ``self``."""
        for module in [self.denoiser, self.vae, *(self.text_encoders or [])]:
            if module is not None:
                module.to(device)
        return self

    def encode_prompts(self, prompts: Sequence[str]) -> TextCond:
        """CLIP encodings of ``prompts`` as the UNet consumes them (SDXL adds pooled output + time ids)."""
        if not self.text_encoders:
            raise ValueError(f"teacher {self.path} ({self.kind}) is not text-conditional")
        return prompt_cond(prompts, self.tokenizers, self.text_encoders, self.kind == "sdxl", self.image_shape[1:])

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] ``[B, C, H, W]`` to the denoiser's space (identity for pixel teachers).

        Latent teachers use the posterior mean: ``z = (mean(E(x)) - shift) * scale`` (float32).
        """
        if self.vae is None:
            return images.float()
        vae_device = next(self.vae.parameters()).device
        latents = self.vae.encode(images.to(vae_device, self.vae.dtype)).latent_dist.mean
        return ((latents.float() - self.vae_shift_factor) * self.vae_scaling_factor).to(images.device)

    def decode(self, x: Tensor) -> Tensor:
        """Denoiser-space samples to images in [-1, 1] (clamped; identity-then-clamp for pixel teachers)."""
        if self.vae is None:
            return x.float().clamp(-1, 1)
        vae_device = next(self.vae.parameters()).device
        z = x.float() / self.vae_scaling_factor + self.vae_shift_factor
        images = self.vae.decode(z.to(vae_device, self.vae.dtype)).sample
        return images.float().clamp(-1, 1).to(x.device)

    def guided(self, guidance_scale: float) -> Denoiser:
        """The denoiser under classifier-free guidance ``w`` (the plain denoiser when ``w == 1``)."""
        from ..denoiser import CFGDenoiser

        return self.denoiser if guidance_scale == 1.0 else CFGDenoiser(self.denoiser, guidance_scale)
