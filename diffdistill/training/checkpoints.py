"""Checkpoints: safetensors weights, JSON metadata, atomic writes, a ``latest`` marker; nothing unpickled.

Layout of ``RUN/checkpoints/step-NNNNNNN/``::

    <network>.safetensors      every network's state dict (student, fake_score, ...)
    student_ema.safetensors    EMA shadow weights of the student, when EMA is on
    optimizers.pt              optimizer + LR scheduler states (``torch.load(weights_only=True)``)
    rng.pt                     torch CPU (+ CUDA) RNG states (``weights_only=True``)
    meta.json                  step, method, networks (class, parameter count), schedule, extra state
    config.yaml                the resolved run config

The folder is written under a temporary name and renamed into place; ``RUN/checkpoints/latest`` (a text
file naming the folder) is replaced last, so a kill at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError

CKPT_DIR = "checkpoints"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared / non-contiguous storage: clone each tensor on the CPU.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, networks: dict[str, torch.nn.Module],
                    optim_state: dict[str, Any], meta: dict[str, Any], config_yaml: str,
                    ema_state: Optional[dict[str, torch.Tensor]] = None, keep: int = 0) -> Path:
    """Atomically write checkpoint ``step`` and point ``latest`` at it; prune to the newest ``keep``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, net in networks.items():
        save_file(_contiguous_state(net), str(tmp / f"{name}.safetensors"))
    if ema_state is not None:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in ema_state.items()},
                  str(tmp / "student_ema.safetensors"))
    torch.save(optim_state, tmp / "optimizers.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    (tmp / "config.yaml").write_text(config_yaml)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it atomically
        old = root / f".old-{step_dir_name(step)}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    marker_tmp = root / f".{LATEST}.tmp"
    marker_tmp.write_text(final.name + "\n")
    os.replace(marker_tmp, root / LATEST)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


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


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file is a one-line :class:`UserError`."""
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None


def load_network(net: torch.nn.Module, path: Path) -> None:
    """Load weights strictly: every key must match, or a :class:`UserError` names the mismatch."""
    state = load_safetensors(path)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not match the network: missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]}")


def load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary pickles."""
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt file to the user
        raise UserError(f"corrupt checkpoint file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt or missing {ckpt / 'meta.json'}: {e}") from None
