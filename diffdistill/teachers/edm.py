"""EDM-preconditioned networks (:mod:`diffdistill.networks.edm`) behind the denoiser contract, and their folder.

``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s), labels)`` with EDM's scalings (Karras et al.
2022, Table 1): ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 +
sd^2)``, ``c_noise = ln(s) / 4``. The adapter's state dict is EDM's ``EDMPrecond`` state dict (``model.*``).
Labels: class ids ``[B]`` become one-hot vectors; id ``num_classes`` (the null label of classifier-free
guidance) is the all-zero vector, which is what EDM's label dropout trains.

EDM networks have no discrete grid: noise levels come from EDM's Karras grid (``sigma_grid``), between the
folder's ``sigma_min`` / ``sigma_max`` (0.002 / 80, the range EDM samples and DMD2 trains on).

Teacher folder (written by ``diffdistill convert edm`` or :func:`save_edm_folder`)::

    edm.json            {"format": 1, "class": "EDMNetDenoiser", "network": "DhariwalUNet" | "SongUNet",
                         "network_kwargs": {...EDM's constructor arguments...}, "img_resolution": 64,
                         "img_channels": 3, "label_dim": 1000, "sigma_min": 0.002, "sigma_max": 80.0,
                         "sigma_data": 0.5, "weights": "model.safetensors" | null, "source": {...}}
    model.safetensors   the adapter's state dict (float32)

``"weights": null`` names an architecture only (no file): the network is freshly initialised (seeded by the
run's ``train.seed``). Methods that train a student from data alone (iCT) start from it; distillation
methods refuse such a teacher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser, append_dims
from ..errors import UserError
from ..networks.edm import NETWORKS
from ..schedules import karras_sigmas

EDM_FILE = "edm.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1
_PRECOND_KEYS = ("img_resolution", "in_channels", "out_channels", "label_dim")


class EDMNetDenoiser(Denoiser):
    """EDM preconditioning around a :class:`~diffdistill.networks.edm.SongUNet` or ``DhariwalUNet``.

    Args:
        network: ``"SongUNet"`` or ``"DhariwalUNet"``.
        network_kwargs: the network's other constructor arguments (EDM's names, e.g. ``model_channels``).
        img_resolution, img_channels: sample size and channels.
        label_dim: number of classes (0 = unconditional).
        sigma_min, sigma_max: the noise range sampled and distilled (EDM: 0.002 and 80).
        sigma_data: standard deviation of the data (EDM: 0.5).
    """

    def __init__(self, network: str, network_kwargs: dict, img_resolution: int, img_channels: int,
                 label_dim: int = 0, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5) -> None:
        if network not in NETWORKS:
            raise ValueError(f"unknown EDM network {network!r}; choose {' or '.join(NETWORKS)}")
        clash = sorted(set(network_kwargs) & set(_PRECOND_KEYS))
        if clash:
            raise ValueError(f"network_kwargs must not set {clash}: they follow img_resolution, img_channels and "
                             "label_dim")
        super().__init__((img_channels, img_resolution, img_resolution), sigma_min, sigma_max, sigma_data,
                         int(label_dim) or None)
        self.network = network
        self.network_kwargs = dict(network_kwargs)
        self.label_dim = int(label_dim)
        self.model = NETWORKS[network](img_resolution=int(img_resolution), in_channels=int(img_channels),
                                       out_channels=int(img_channels), label_dim=self.label_dim, **self.network_kwargs)

    # ---------------------------------------------------------------------------------------------
    def labels(self, cond: Cond, batch: int, device: torch.device) -> Optional[Tensor]:
        """EDM's ``class_labels``: one-hot float ``[B, label_dim]`` (zeros for the null label / no label)."""
        if not self.label_dim:
            return None
        if cond is None:
            return torch.zeros(batch, self.label_dim, device=device)
        if not isinstance(cond, Tensor):
            raise ValueError(f"an EDM network takes class labels, got {type(cond).__name__}")
        if cond.is_floating_point():  # already EDM's one-hot (or soft) label vectors
            return cond.reshape(batch, self.label_dim).float()
        ids = cond.long().reshape(batch)
        if bool(((ids < 0) | (ids > self.label_dim)).any()):
            raise ValueError(f"class labels must be in [0, {self.label_dim}] ({self.label_dim} = unconditional)")
        return F.one_hot(ids, self.label_dim + 1)[:, : self.label_dim].float()

    def null_cond(self, cond: Cond) -> Cond:
        if isinstance(cond, Tensor) and cond.is_floating_point():
            return torch.zeros_like(cond)
        return super().null_cond(cond)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        sd = self.sigma_data
        x = x.float()
        s = append_dims(sigma.float(), x.ndim)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.float().log() / 4
        dtype = next(self.model.parameters()).dtype  # a bf16 teacher runs on bf16 inputs; scalings stay float32
        out = self.model((c_in * x).to(dtype), c_noise, self.labels(cond, x.shape[0], x.device))
        return c_skip * x + c_out * out.float()

    def sigma_grid(self, n: int = 1000) -> Tensor:
        """EDM's Karras grid (rho 7) of ``n`` levels over ``[sigma_min, sigma_max]``, ascending."""
        return karras_sigmas(n, self.sigma_min, self.sigma_max).flip(0)

    # ---------------------------------------------------------------------------------------------
    # DMD2's GAN head reads the encoder's output (the official ``return_bottleneck``)
    def feature_module(self) -> tuple[nn.Module, str]:
        """The module whose output is the bottleneck (:mod:`diffdistill.methods.gan_head`)."""
        return self.model.bottleneck, "output"

    def bottleneck_shape(self) -> tuple[int, ...]:
        """``(C, h, w)`` of one sample's bottleneck features, from the architecture (no forward pass)."""
        name, block = [(n, m) for n, m in self.model.enc.items() if "aux" not in n][-1]  # e.g. "8x8_block2"
        res = int(name.split("x")[0])
        return int(block.out_channels), res, res

    # ---------------------------------------------------------------------------------------------
    def spec(self) -> dict:
        """JSON-able constructor description (:meth:`from_spec` rebuilds the architecture)."""
        return {"class": "EDMNetDenoiser", "network": self.network, "network_kwargs": _jsonable(self.network_kwargs),
                "img_resolution": self.sample_shape[1], "img_channels": self.sample_shape[0],
                "label_dim": self.label_dim, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data}

    @classmethod
    def from_spec(cls, spec: dict, **overrides: Any) -> "EDMNetDenoiser":
        """A freshly initialised adapter from :meth:`spec`'s output, network arguments updated by ``overrides``."""
        kwargs = {**spec.get("network_kwargs", {}), **overrides}
        return cls(spec["network"], kwargs, spec["img_resolution"], spec["img_channels"], spec.get("label_dim", 0),
                   spec.get("sigma_min", 0.002), spec.get("sigma_max", 80.0), spec.get("sigma_data", 0.5))

    def rebuild(self, **overrides: Any) -> "EDMNetDenoiser":
        """A fresh, randomly initialised network of the same family (float32, same device), its arguments
        updated by ``overrides`` (e.g. ``model_channels=64``): "small" students and iCT from scratch."""
        try:
            new = self.from_spec(self.spec(), **overrides)
        except TypeError as e:
            raise ValueError(f"{self.network} does not take {sorted(overrides)}: {e}") from None
        return new.to(next(self.parameters()).device)


def _jsonable(value: Any) -> Any:
    """Tuples as lists (JSON), recursively."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# The teacher folder
def read_edm_json(root: Path) -> dict:
    """``root/edm.json``, checked: a clear :class:`UserError` for a malformed file."""
    path = Path(root) / EDM_FILE
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path} is not an EDM teacher description of format {FORMAT}")
    missing = [k for k in ("network", "img_resolution", "img_channels") if k not in spec]
    if spec.get("format") != FORMAT or missing:
        raise UserError(f"{path} is not an EDM teacher description of format {FORMAT}"
                        + (f" (missing {missing})" if missing else ""))
    if spec["network"] not in NETWORKS:
        raise UserError(f"{path} names the network {spec['network']!r}; diffdistill builds {' and '.join(NETWORKS)}")
    return spec


def build_edm_denoiser(spec: dict, where: str = "") -> EDMNetDenoiser:
    """The (randomly initialised) adapter described by ``spec``; bad arguments are a :class:`UserError`."""
    try:
        return EDMNetDenoiser.from_spec(spec)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where or 'EDM network'}: cannot build {spec.get('network')} ({e})") from None


def load_edm_folder(root: Path, dtype: torch.dtype = torch.float32, with_unet: bool = True):
    """Load an EDM teacher folder (see the module docstring) as a :class:`~diffdistill.teachers.Teacher`."""
    from ..checkpoint_io import load_safetensors
    from .bundle import Teacher

    root = Path(root)
    spec = read_edm_json(root)
    meta = {"num_classes": spec.get("label_dim") or None, "edm": spec}
    shape = (int(spec["img_channels"]), int(spec["img_resolution"]), int(spec["img_resolution"]))
    if not with_unet:
        return Teacher(denoiser=None, kind="unet", path=str(root), num_classes=meta["num_classes"], image_shape=shape,
                       meta=meta)
    weights = spec.get("weights", WEIGHTS_FILE)
    if weights is None:  # an architecture only: a fresh network
        den = build_edm_denoiser(spec, str(root / EDM_FILE))
        den.untrained = True
    else:
        state = load_safetensors(root / weights) if (root / weights).is_file() else None
        if state is None:
            raise UserError(f"teacher folder {root} has no {weights} (the weights named by {EDM_FILE}; "
                            "`diffdistill convert edm SNAPSHOT.pkl --out DIR` writes both)")
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            den = build_edm_denoiser(spec, str(root / EDM_FILE))
        expected = set(den.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise UserError(f"{root / weights} does not match the network of {EDM_FILE}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        try:
            den.load_state_dict(state, assign=True)
        except RuntimeError as e:
            raise UserError(f"{root / weights} does not match the network of {EDM_FILE}: "
                            f"{str(e).strip().splitlines()[-1].strip()}") from None
    den = den.to(dtype)
    return Teacher(denoiser=den, kind="unet", path=str(root), num_classes=den.num_classes, image_shape=shape,
                   meta=meta)


def save_edm_folder(denoiser: EDMNetDenoiser, folder: str | os.PathLike, source: Optional[dict] = None,
                    weights: bool = True) -> Path:
    """Write ``denoiser`` as an EDM teacher folder, atomically (a temporary sibling renamed into place; an
    existing folder is replaced). ``source``: provenance recorded in ``edm.json``; ``weights=False`` writes
    the architecture only."""
    from safetensors.torch import save_file

    from ..paths import atomic_folder

    with atomic_folder(folder) as tmp:
        spec = {"format": FORMAT, **denoiser.spec(), "weights": WEIGHTS_FILE if weights else None,
                "source": source or {}}
        if weights:
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in denoiser.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / EDM_FILE).write_text(json.dumps(spec, indent=2))
    return Path(folder)
