"""Latents of an image dataset under a teacher's VAE, encoded once and cached by content hash.

Latent teachers (SD, SDXL) train on ``z = (mean(E(x)) - shift) * scale`` of each real image. Encoding the
same folder in every run (and every epoch) repeats the VAE's most expensive pass, so ``data.cache_latents``
encodes the whole dataset once into one safetensors file whose name is a SHA-256 of everything the
latents depend on: every image's bytes (in dataset order) and the preprocessing (resolution, channels), the
VAE's weights and its scaling/shift factors. Any change gives a new key, so a stale cache is never read.
The folder is ``$DIFFDISTILL_CACHE`` or ``$XDG_CACHE_HOME/diffdistill/latents`` (``~/.cache/...``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError


def cache_dir() -> Path:
    """Where cached latents live (created on first write)."""
    if os.environ.get("DIFFDISTILL_CACHE"):
        return Path(os.environ["DIFFDISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffdistill" / "latents"


def latent_key(dataset: Any, teacher: Any) -> str:
    """SHA-256 of the images (file bytes, or tensors for in-memory data), the preprocessing and the VAE."""
    h = hashlib.sha256()
    h.update(f"{dataset.resolution}|{dataset.channels}|{len(dataset)}|".encode())
    for f in getattr(dataset, "files", []):
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    if not hasattr(dataset, "files"):
        h.update(dataset.images.numpy().tobytes())
    h.update(f"{teacher.vae_scaling_factor}|{teacher.vae_shift_factor}|".encode())
    for name, t in sorted(teacher.vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def cached_latents(dataset: Any, teacher: Any, device: torch.device, batch_size: int = 32,
                   write: bool = True) -> Tensor:
    """The latents of every image of ``dataset`` under ``teacher``'s VAE ``[N, C, h, w]`` (float32, CPU).

    Read from the cache when present; otherwise encoded (``teacher.encode_images``, the posterior mean) and,
    with ``write``, saved atomically for the next run."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    if getattr(teacher, "vae", None) is None:
        raise UserError("data.cache_latents is for latent teachers (with a VAE); this teacher works in pixels")
    path = cache_dir() / f"{latent_key(dataset, teacher)}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["latents"]
        except Exception:  # noqa: BLE001 - a damaged cache file is re-encoded, never trusted
            pass
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding latents"):
        images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(start, min(start + batch_size, len(dataset)))])
        out.append(teacher.encode_images(images.to(device, torch.float32)).float().cpu())
    latents = torch.cat(out)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"latents": latents.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return latents


__all__ = ["cached_latents", "latent_key", "cache_dir"]
