"""diffdistill: diffusion step distillation (DMD2, BOOT, iCT, CD / Hyper-SD TSCD, DisBack, MSD)."""

from __future__ import annotations

__version__ = "0.1.0"


def load_generator(path: str):
    """Load a teacher or a trained student from a folder; see :class:`diffdistill.generator.Generator`."""
    from .generator import load_generator as _load

    return _load(path)


__all__ = ["load_generator", "__version__"]
