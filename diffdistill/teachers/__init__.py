"""Teachers: adapters that put diffusers networks behind the sigma-space denoiser contract, and loaders.

- :class:`VPUNetDenoiser`: DDPM-schedule UNets (epsilon / v / sample prediction), pixel or latent,
  unconditional, class-conditional or text-conditional (SD 1.5, SDXL).
- :class:`FlowMatchingDenoiser`: velocity networks with ``x_t = (1 - t) x0 + t n``.
- :func:`load_teacher` -> :class:`Teacher`: the denoiser plus VAE / text encoders from a folder or Hub id.
- :func:`save_teacher_folder`: write diffdistill's own teacher folder atomically.
"""

from __future__ import annotations

from .bundle import Teacher
from .flow import FlowMatchingDenoiser
from .loader import load_teacher, resolve_teacher_path, save_teacher_folder
from .vp import VPUNetDenoiser, ddim_sigmas, ddpm_from_config

__all__ = ["Teacher", "load_teacher", "save_teacher_folder", "resolve_teacher_path", "VPUNetDenoiser",
           "FlowMatchingDenoiser", "ddim_sigmas", "ddpm_from_config"]
