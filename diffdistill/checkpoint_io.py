"""Reading checkpoints and safetensors files — shared by training (resume) and sampling (artefacts).

Nothing here imports :mod:`diffdistill.training`, so sampling a checkpoint never loads the training code.
Loading never unpickles: safetensors, JSON, and ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import UserError

CKPT_DIR = "checkpoints"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "meta.json").is_file())


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The folder named by ``latest`` (falling back to the newest complete folder), or ``None``."""
    root = Path(run_dir) / CKPT_DIR
    marker = root / LATEST
    if marker.is_file():
        cand = root / marker.read_text().strip()
        if (cand / "meta.json").is_file():
            return cand
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    p = Path(path)
    if (p / "meta.json").is_file() and (p / "config.yaml").is_file():
        return p
    ck = latest_checkpoint(p)
    if ck is None:
        raise UserError(f"{p} holds no checkpoint (expected {p}/{CKPT_DIR}/step-NNNNNNN/meta.json)")
    return ck


def incomplete_checkpoint(path: str | Path) -> Optional[str]:
    """Why ``path`` cannot be read as a checkpoint, when it is a checkpoint folder without ``meta.json`` or a run
    folder whose checkpoint folders all lack it; ``None`` for anything else (e.g. a teacher folder)."""
    p = Path(path)
    looks_like_step = (p.name.startswith("step-") and p.parent.name == CKPT_DIR) or (p / "optimizers.pt").is_file()
    if looks_like_step and not (p / "meta.json").is_file():
        return (f"checkpoint folder {p} has no meta.json: it is incomplete or damaged (its run was stopped while "
                "writing it, or the file was removed); use another checkpoint of the run")
    root = p / CKPT_DIR
    if root.is_dir() and not (p / "teacher").is_dir() and latest_checkpoint(p) is None:
        steps = sorted(x for x in root.iterdir() if x.is_dir() and x.name.startswith("step-"))
        if steps:
            return f"run folder {p} holds no complete checkpoint: {steps[-1]} has no meta.json"
        return f"run folder {p} holds no checkpoint yet ({root} is empty)"
    return None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file is a one-line :class:`UserError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UserError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None


def load_network(net: torch.nn.Module, path: Path) -> None:
    """Load weights strictly: every key must match, or a :class:`UserError` names the mismatch."""
    state = load_safetensors(path)
    own = net.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:  # load_state_dict would raise one line per tensor: name the first and count them
        k = wrong[0]
        raise UserError(f"{path} does not match the network: {len(wrong)} tensor(s) have other shapes, e.g. {k} "
                        f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the network (another "
                        "architecture)")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not match the network: missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]}")


def load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary pickles."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt file to the user
        raise UserError(f"corrupt checkpoint file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt or missing {Path(ckpt) / 'meta.json'}: {e}") from None
