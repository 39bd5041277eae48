"""Feature extractors for FID: one small interface, local weights only.

A :class:`FeatureExtractor` maps images in ``[-1, 1]`` (``[N, C, H, W]``) to features ``[N, D]`` and
records what makes its numbers comparable: ``name``, ``dim``, ``weights_hash`` (sha256 of its weights)
and ``resize`` (how inputs reach the network's resolution).

- :class:`InceptionV3Features`: the 2015 Inception-v3 of torch-fidelity / torchmetrics (2048-d pool
  features), loaded from a local ``weights-inception-2015-12-05-6726825d.pth`` only.
- :class:`~diffdistill.metrics.digits.DigitsFeatures`: the project's digits classifier ("digits FID").
- :class:`ModuleFeatures`: any ``nn.Module`` a user passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
# torch-hub file names carry the first 8 hex digits of the file's sha256
INCEPTION_SHA256_PREFIX = "6726825d"


def cache_dir() -> Path:
    """Where weights and reference statistics are cached: ``$DIFFDISTILL_CACHE`` or ``~/.cache/diffdistill``."""
    return Path(os.environ.get("DIFFDISTILL_CACHE") or Path.home() / ".cache" / "diffdistill")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Hex sha256 over a module's state dict (names, dtypes, shapes and raw bytes, in key order)."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def to_uint8_range(images: Tensor) -> Tensor:
    """``[-1, 1]`` -> integers ``0..255`` (as EDM: ``x * 127.5 + 128`` truncated, i.e. rounded), uint8."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class FeatureExtractor(nn.Module):
    """Images in ``[-1, 1]``, ``[N, C, H, W]`` -> features ``[N, dim]`` (float32).

    Attributes: ``name`` (network), ``dim`` (feature size), ``weights_hash`` (sha256 of the weights),
    ``resize`` (resize protocol, recorded with every score).
    """

    name: str = "features"
    dim: int = 0
    weights_hash: str = ""
    resize: str = "none"

    def info(self) -> dict:
        """What to record next to a score computed with these features."""
        return {"name": self.name, "dim": self.dim, "weights_sha256": self.weights_hash, "resize": self.resize}


class ModuleFeatures(FeatureExtractor):
    """Wrap any ``nn.Module`` mapping ``[-1, 1]`` images to ``[N, ...]`` (flattened to ``[N, D]``)."""

    def __init__(self, module: nn.Module, name: str | None = None, dim: int | None = None,
                 resize: str = "none") -> None:
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.name = name or type(module).__name__
        self.dim = int(dim or 0)  # 0: set by the first forward
        self.weights_hash = state_dict_sha256(module)
        self.resize = resize

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        feats = self.module(images).reshape(images.shape[0], -1).float()
        self.dim = self.dim or feats.shape[1]
        return feats


def as_feature_extractor(obj: nn.Module) -> FeatureExtractor:
    """A :class:`FeatureExtractor` as is; any other ``nn.Module`` wrapped in :class:`ModuleFeatures`."""
    return obj if isinstance(obj, FeatureExtractor) else ModuleFeatures(obj)


def inception_weights_candidates() -> list[Path]:
    """Where the Inception weights are looked for when no file is given (first hit wins)."""
    torch_hub = Path(os.environ.get("TORCH_HOME") or Path.home() / ".cache" / "torch") / "hub" / "checkpoints"
    return [cache_dir() / INCEPTION_WEIGHTS_NAME, torch_hub / INCEPTION_WEIGHTS_NAME]


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The Inception weights file: ``path`` if given, else the first existing candidate; ``UserError`` if none."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"Inception weights file not found: {path} (expected {INCEPTION_WEIGHTS_NAME}, "
                            f"the torch-fidelity FID network; pass it with --inception-weights FILE)")
        return Path(path)
    for candidate in inception_weights_candidates():
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in inception_weights_candidates())
    raise UserError(f"missing {INCEPTION_WEIGHTS_NAME} (the FID Inception-v3 weights, not downloaded at run time); "
                    f"looked in {looked}; pass it with --inception-weights FILE or put it in $DIFFDISTILL_CACHE")


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` inside libraries that pass ``weights_only=False``.

    torch-fidelity's constructor calls ``torch.load(path, weights_only=False)``; torch honours
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` over the call's argument, so the file is never unpickled.
    """
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ.update({k: v for k, v in saved.items() if v is not None})


class InceptionV3Features(FeatureExtractor):
    """The FID Inception-v3 (TF 2015 graph ported by torch-fidelity), 2048-d pool3 features.

    Inputs ``[-1, 1]`` are quantised to ``0..255`` (grey images repeated to RGB) and resized to 299 by
    torch-fidelity's TF1-compatible bilinear resize (no half-pixel offset; the legacy protocol of
    torch-fidelity and torchmetrics < 1.8, ``antialias=False`` in later torchmetrics).

    Args:
        weights_path: the ``weights-inception-2015-12-05-6726825d.pth`` state dict; default: the cache
            locations of :func:`inception_weights_candidates`. Loaded with ``weights_only=True``.
    """

    name = "inception-v3-2015-torch-fidelity"
    dim = 2048
    resize = "tf1-bilinear-299"

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        path = find_inception_weights(weights_path)  # before the (slow) torch-fidelity import
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = str(path)
        self.weights_hash = file_sha256(path)
        try:
            with _weights_only_torch_load():
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                       feature_extractor_weights_path=str(path))
        except (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError) as err:  # unpicklable content, wrong keys or shapes: name the file
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{path} is not a plain Inception-v3 2015 state dict ({first_line})") from None

    @property
    def is_official(self) -> bool:
        """Whether the weights file's sha256 matches the published file name's hash prefix."""
        return self.weights_hash.startswith(INCEPTION_SHA256_PREFIX)

    def info(self) -> dict:
        return {**super().info(), "weights_file": self.weights_path, "official_weights": self.is_official}

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise UserError(f"Inception features need 1 or 3 channels, got images of shape {tuple(images.shape)}")
        device = next(self.net.parameters()).device
        (feats,) = self.net(to_uint8_range(images).to(device))
        return feats.float()
