"""diffdistill: diffusion step distillation (DMD2, BOOT, iCT, CD / Hyper-SD TSCD, DisBack, MSD)."""

from __future__ import annotations

__version__ = "0.1.0"


def load_generator(path, device=None, guidance_scale=None, sampler: str = "heun", steps=None):
    """Load a teacher or a trained student from a folder; see :func:`diffdistill.generator.load_generator`."""
    from .generator import load_generator as _load

    return _load(path, device=device, guidance_scale=guidance_scale, sampler=sampler, steps=steps)


__all__ = ["load_generator", "__version__"]
