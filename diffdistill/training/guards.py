"""Checks a training run makes before its first step, and the rule that a failed start leaves nothing.

- :func:`check_resume`: ``--resume`` needs a run to resume, and the config must be the run's own except
  for :data:`RESUME_SAFE_KEYS`.
- :func:`check_data_fits`: the data's channels, resolution and classes must fit the teacher (or, for
  teacher training, the network built for the data).
- :func:`no_half_made_run`: a run that fails before it writes its first checkpoint removes what it created.

Each failure is one :class:`~diffdistill.errors.UserError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from ..checkpoint_io import latest_checkpoint, list_checkpoints
from ..config import Config, config_to_yaml_dict
from ..errors import UserError

RESUME_SAFE_KEYS: tuple[str, ...] = (
    "output_dir",
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.log_every",
)
"""Config keys a resumed run may change: where the run lives, how long it runs, and how often it logs,
checkpoints and samples. Anything else (the method, teacher, data, student, optimizer, schedule, seed,
precision, the method's own section) would silently continue a different run, so a resume with another
value is refused with the list of differing keys. ``train.steps`` is allowed so that a finished run can be
extended; LR schedules that depend on it (cosine, linear) then continue along the new length."""


def _leaves(cfg: Config) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every key of the resolved config; free-form mappings (``student.small``,
    ``dsm.unet``) are one value each."""
    def walk(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for f in dataclasses.fields(obj):
            if f.name == "method_config":
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", value

    yield from walk(cfg, "")
    if cfg.method_config is not None and dataclasses.is_dataclass(cfg.method_config):
        yield from walk(cfg.method_config, f"{cfg.method}.")


_MISSING = object()


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def config_differences(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key (outside :data:`RESUME_SAFE_KEYS`) where ``cfg``
    differs from the ``saved`` config dict. Keys the saved config does not have (written by an older
    version) are not compared; a different method is one difference."""
    new = config_to_yaml_dict(cfg)
    if saved.get("method") != cfg.method:
        return [("method", saved.get("method"), cfg.method)]
    diffs = []
    for key, _ in _leaves(cfg):
        if key in RESUME_SAFE_KEYS:
            continue
        old = _lookup(saved, key)
        value = _lookup(new, key)
        if old is not _MISSING and old != value:
            diffs.append((key, old, value))
    return diffs


def check_resume(run_dir: Path, cfg: Config) -> Path:
    """The checkpoint ``--resume`` continues from; a :class:`UserError` when ``run_dir`` holds no run or
    when ``cfg`` differs from the config that run was trained with (outside :data:`RESUME_SAFE_KEYS`)."""
    run_dir = Path(run_dir)
    ck = latest_checkpoint(run_dir)
    if ck is None:
        why = "does not exist" if not run_dir.exists() else \
            "holds no checkpoint (checkpoints/step-NNNNNNN/meta.json)"
        raise UserError(f"--resume: {run_dir} {why}, so there is no run to resume; check the folder, or drop "
                        "--resume to start a new run")
    saved_file = next((p for p in (ck / "config.yaml", run_dir / "config.yaml") if p.is_file()), None)
    if saved_file is None:
        return ck
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the run's config {saved_file}: {str(e).splitlines()[0]}") from None
    diffs = config_differences(saved if isinstance(saved, dict) else {}, cfg)
    if diffs:
        shown = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, a, b in diffs[:4])
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise UserError(f"--resume: this config differs from the one {run_dir} was trained with ({saved_file}) in "
                        f"{shown}{more}; a resume may change only {', '.join(RESUME_SAFE_KEYS)}: resume with the "
                        "run's own config, or start a new run with another --output")
    return ck


def check_data_fits(cfg: Config, dataset: Optional[Any], net: Any, teacher: Optional[Any]) -> None:
    """The data's channels, resolution and classes against what the teacher makes (``teacher``) or, for
    teacher training, the network built for the data (``net``, the trained denoiser)."""
    if dataset is None:
        return
    if teacher is not None and getattr(teacher, "denoiser", None) is not None:
        who = f"the teacher {cfg.teacher.path}"
        shape = tuple(teacher.image_shape or ()) or (() if teacher.latent else tuple(teacher.denoiser.sample_shape))
    else:
        who = "the network being trained"
        shape = tuple(net.sample_shape)
    data_shape = tuple(getattr(dataset, "sample_shape", None) or ())
    if shape and data_shape:
        if len(shape) == 3 and len(data_shape) == 3:
            if data_shape[0] != shape[0]:
                raise UserError(f"the data ({_data_name(cfg)}) has {data_shape[0]}-channel images but {who} makes "
                                f"{shape[0]}-channel images: set data.channels={shape[0]} to convert them")
            if data_shape[1:] != shape[1:]:
                size = f"{shape[1]}x{shape[2]}"
                raise UserError(f"data.resolution={cfg.data.resolution} but {who} makes {size} images: set "
                                f"data.resolution={shape[1]}" + ("" if shape[1] == shape[2] else " (and square them)"))
        elif data_shape != shape:
            raise UserError(f"the data ({_data_name(cfg)}) has samples of shape {list(data_shape)} but {who} makes "
                            f"samples of shape {list(shape)}: choose data that fits it")
    classes = getattr(net, "num_classes", None)
    data_classes = getattr(dataset, "num_classes", None)
    if classes and data_classes and data_classes > classes:
        raise UserError(f"the data ({_data_name(cfg)}) has {data_classes} classes but {who} knows {classes} "
                        f"(labels 0..{classes - 1})")
    if classes and not data_classes and cfg.data.name != "prompts" and len(data_shape) == 3:
        raise UserError(f"{who} is class-conditional ({classes} classes) but the data ({_data_name(cfg)}) has no "
                        "labels: put the images in one sub-folder per class")


def _data_name(cfg: Config) -> str:
    return f"{cfg.data.name} {cfg.data.path}" if cfg.data.path else cfg.data.name


def _created_root(run_dir: Path) -> Optional[Path]:
    """The outermost folder of ``run_dir``'s path that does not exist yet (``None`` when it exists)."""
    p = run_dir.absolute()
    if p.exists():
        return None
    while not p.parent.exists():
        p = p.parent
    return p


@contextlib.contextmanager
def no_half_made_run(run_dir: Path) -> Iterator[None]:
    """Run the body; if it raises before any new checkpoint exists in ``run_dir``, remove what it created:
    the folder itself (and the parents it made) when it did not exist, else the entries that were not
    there before. A pre-existing folder and the files already in it are never removed. Only the main
    process (``RANK`` 0) removes anything."""
    run_dir = Path(run_dir)
    root = _created_root(run_dir)
    before = None if root is not None else {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    checkpoints = {p.name for p in list_checkpoints(run_dir)}
    try:
        yield
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0 and not ({p.name for p in list_checkpoints(run_dir)} - checkpoints):
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)
            elif before is not None and run_dir.is_dir():
                for p in run_dir.iterdir():
                    if p.name not in before:
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
        raise
