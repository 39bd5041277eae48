"""Students: generators built on a denoiser, evaluated at a fixed list of noise levels.

Every method trains one of these student kinds (``student.kind``):

- ``copy``: the teacher's architecture, initialised from its weights (all parameters trained);
- ``small``: a smaller network of the teacher's family, built by the teacher adapter's
  :meth:`rebuild` from config overrides (e.g. fewer channels), randomly initialised;
- ``lora``: the teacher's weights frozen plus LoRA adapters (peft) on its linear / conv layers.

A K-step student maps ``z`` to ``x0`` as ``x = s_0 z; x0 = D(x, s_0); x = x0 + s_1 n'; ...`` (DMD2's
re-noising with fresh noise), or, with ``renoise="ddim"``, moves deterministically along the student's
own trajectory ``x = x0 + s_{i+1} (x - x0) / s_i`` (Hyper-SD / PCM sampling along segment edges).
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .denoiser import Cond, Denoiser
from .schedules import timestep_levels

DEFAULT_LORA_TARGETS = r".*(to_q|to_k|to_v|to_out\.0|conv1|conv2|proj_in|proj_out|query|key|value|proj_attn|net\.\d+)$"


class Student(nn.Module):
    """A generator ``G(z, cond)`` on a denoiser ``net``, evaluated at descending ``levels``.

    Args:
        net: the student denoiser (satisfies the denoiser contract).
        levels: descending noise levels the student is evaluated at; ``levels[0]`` is where pure
            noise enters (``x = levels[0] * z``).
        renoise: ``"fresh"`` (new Gaussian noise between steps) or ``"ddim"`` (deterministic).
    """

    def __init__(self, net: Denoiser, levels: Sequence[float], renoise: str = "fresh") -> None:
        super().__init__()
        if renoise not in ("fresh", "ddim"):
            raise ValueError(f"renoise must be 'fresh' or 'ddim', got {renoise!r}")
        self.net = net
        self.levels = [float(s) for s in levels]
        self.renoise = renoise

    @property
    def steps(self) -> int:
        return len(self.levels)

    def levels_for(self, steps: Optional[int] = None) -> list[float]:
        """The levels used for ``steps`` evaluations: the trained ones, or an even subset / regrid."""
        if steps is None or steps == len(self.levels):
            return self.levels
        if steps < len(self.levels) and len(self.levels) % steps == 0:
            return self.levels[:: len(self.levels) // steps]
        grid = self.net.sigma_grid()
        top = torch.searchsorted(grid, torch.tensor(self.levels[0], dtype=grid.dtype)).item()
        return timestep_levels(grid[: int(top) + 1], steps)

    def forward(self, z: Tensor, cond: Cond = None, steps: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """Generate ``x0`` from standard normal ``z`` in ``len(levels_for(steps))`` evaluations."""
        levels = self.levels_for(steps)
        return self.run(levels[0] * z, levels, cond, generator)

    def run(self, x: Tensor, levels: Sequence[float], cond: Cond = None,
            generator: Optional[torch.Generator] = None) -> Tensor:
        """Evaluate from the noisy sample ``x`` at ``levels[0]`` down through ``levels``; returns x0."""
        x0 = x
        for i, s in enumerate(levels):
            x0 = self.net(x, s, cond)
            if i + 1 < len(levels):
                s_next = levels[i + 1]
                if self.renoise == "fresh":
                    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                else:
                    n = (x - x0) / s
                x = x0 + s_next * n
        return x0


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and return the module in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def add_lora(net: nn.Module, rank: int = 64, alpha: Optional[float] = None,
             target_modules: str = DEFAULT_LORA_TARGETS) -> nn.Module:
    """Inject LoRA adapters (peft) into ``net``'s matching Linear/Conv2d layers; freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    freeze(net)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=target_modules, init_lora_weights="gaussian")
    inject_adapter_in_model(config, net)
    n = 0
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            n += 1
    if n == 0:
        raise ValueError(f"LoRA matched no layer of {type(net).__name__} with target_modules={target_modules!r}")
    return net.train()


def build_student_net(teacher: Denoiser, kind: str = "copy", lora_rank: int = 64,
                      lora_targets: str = DEFAULT_LORA_TARGETS, small: Optional[dict] = None) -> Denoiser:
    """Build a student denoiser of ``kind`` from the (unguided) teacher adapter.

    ``copy`` deep-copies the teacher; ``lora`` deep-copies and adds LoRA; ``small`` asks the teacher for
    a fresh network of its family with ``small`` as constructor overrides (``teacher.rebuild``).
    """
    if kind == "copy":
        net = copy.deepcopy(teacher)
        for p in net.parameters():
            p.requires_grad_(True)
        return net.train()
    if kind == "lora":
        return add_lora(copy.deepcopy(teacher), lora_rank, target_modules=lora_targets)
    if kind == "small":
        rebuild = getattr(teacher, "rebuild", None)
        if rebuild is None:
            raise ValueError(f"{type(teacher).__name__} cannot build a smaller network (no rebuild())")
        return rebuild(**(small or {})).train()
    raise ValueError(f"unknown student kind {kind!r}; choose copy, small or lora")
