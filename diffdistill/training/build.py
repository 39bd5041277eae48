"""Build a method (teacher, student, extra networks) from a resolved config — the same code path for
training, resuming and loading a checkpoint for sampling."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import Config
from ..errors import UserError
from ..methods import Method, OptimConfig, get_method
from ..paths import DEFAULT_TEACHER, REPO_ROOT, resolve_path  # noqa: F401  (re-exported)
from ..schedules import timestep_levels
from ..students import Student, build_student_net

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def optim_config(cfg: Config) -> OptimConfig:
    t = cfg.train
    return OptimConfig(lr=t.lr, betas=(float(t.betas[0]), float(t.betas[1])), weight_decay=t.weight_decay,
                       grad_clip=t.grad_clip, lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps,
                       ema_decay=t.ema_decay, ema_power=t.ema_power)


def load_teacher_for(cfg: Config, device: torch.device | str = "cpu"):
    """Load ``cfg.teacher.path`` as a :class:`~diffdistill.teachers.Teacher` bundle."""
    from ..teachers import load_teacher

    if not cfg.teacher.path:
        raise UserError("teacher.path is empty: set it to a diffusers folder, a Hub id or a teacher run folder")
    if cfg.teacher.dtype not in DTYPES:
        raise UserError(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {cfg.teacher.dtype!r}")
    return load_teacher(resolve_path(cfg.teacher.path), device=device, dtype=DTYPES[cfg.teacher.dtype])


def build_method(cfg: Config, device: torch.device | str = "cpu") -> tuple[Method, Optional[Any]]:
    """Construct the method of ``cfg`` with freshly initialised (seeded) networks.

    A method class may define ``from_config(cfg, optim, device) -> (method, teacher_bundle)`` to build
    itself (teacher training does); otherwise the teacher is loaded, the student built by kind
    (copy / small / lora) at ``student.levels`` (default: evenly spaced teacher timesteps from the top).
    """
    cls = get_method(cfg.method)
    torch.manual_seed(cfg.train.seed)
    optim = optim_config(cfg)
    if hasattr(cls, "from_config"):
        return cls.from_config(cfg, optim, device)
    teacher = load_teacher_for(cfg, device)
    den = teacher.denoiser
    try:
        net = build_student_net(den, cfg.student.kind, cfg.student.lora_rank, small=cfg.student.small)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build the {cfg.student.kind!r} student: {e}") from None
    net = net.to(device=device, dtype=torch.float32)
    if cfg.student.steps < 1:
        raise UserError(f"student.steps must be >= 1, got {cfg.student.steps}")
    levels = cfg.student.levels or timestep_levels(den.sigma_grid(), cfg.student.steps)
    student = Student(net, levels, cfg.student.renoise)
    method = cls(den, student, cfg.method_config, optim, cfg.train.steps)
    return method, teacher
