"""Checkpoints: safetensors weights, JSON metadata, atomic writes, a ``latest`` marker; nothing unpickled.

Layout of ``RUN/checkpoints/step-NNNNNNN/``::

    <network>.safetensors      every network's state dict (student, fake_score, ...)
    student_ema.safetensors    EMA shadow weights of the student, when EMA is on
    optimizers.pt              optimizer + LR scheduler states (``torch.load(weights_only=True)``)
    rng.pt                     torch CPU (+ CUDA) RNG states (``weights_only=True``)
    meta.json                  step, method, networks (class, parameter count), schedule, extra state
    config.yaml                the resolved run config
    student/                   the self-describing student artefact (:mod:`diffdistill.artefact`), written
                               by the training loop through ``write_extra``

The folder is written under a temporary name and renamed into place; ``RUN/checkpoints/latest`` (a text
file naming the folder) is replaced last, so a kill at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

# The read side lives outside training so that sampling can read checkpoints without importing training.
from ..checkpoint_io import (CKPT_DIR, LATEST, latest_checkpoint, list_checkpoints, load_network,  # noqa: F401
                             load_safetensors, load_torch, read_meta, resolve_checkpoint, step_dir_name)


def _contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared / non-contiguous storage: clone each tensor on the CPU.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, networks: dict[str, torch.nn.Module],
                    optim_state: dict[str, Any], meta: dict[str, Any], config_yaml: str,
                    ema_state: Optional[dict[str, torch.Tensor]] = None, keep: int = 0,
                    write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Atomically write checkpoint ``step`` and point ``latest`` at it; prune to the newest ``keep``.

    ``write_extra(folder)`` adds more files to the temporary folder before it is renamed into place, so
    they appear atomically with the rest (the loop writes the student artefact this way).
    """
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
    if write_extra is not None:
        write_extra(tmp)
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
