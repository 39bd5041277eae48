"""Network architectures written for diffdistill (as opposed to diffusers' UNets, used as they are).

- :mod:`.edm`: EDM's DDPM++ / NCSN++ (:class:`~.edm.SongUNet`) and ADM (:class:`~.edm.DhariwalUNet`), with
  EDM's parameter names so official snapshots load (``diffdistill convert edm``); the denoiser adapter
  around them is :class:`diffdistill.teachers.edm.EDMNetDenoiser`.
"""

from __future__ import annotations

from .edm import NETWORKS, DhariwalUNet, SongUNet

__all__ = ["NETWORKS", "SongUNet", "DhariwalUNet"]
