"""Students: generators built on a denoiser, evaluated at a fixed list of noise levels.

Every method trains one of these student kinds (``student.kind``):

- ``copy``: the teacher's architecture, initialised from its weights (all parameters trained);
- ``small``: a smaller network of the teacher's family, built by the teacher adapter's
  :meth:`rebuild` from config overrides (e.g. fewer channels), randomly initialised;
- ``lora``: the teacher's weights frozen plus LoRA adapters (peft) on its linear / conv layers.

A K-step student maps ``z`` to ``x0`` as ``x = s_0 z; x0 = D(x, s_0); x = x0 + s_1 n'; ...`` (DMD2's
re-noising with fresh noise), or, with ``renoise="ddim"``, moves deterministically along the student's
own trajectory ``x = x0 + s_{i+1} (x - x0) / s_i`` (Hyper-SD / PCM sampling along segment edges). A
deterministic student can also be sampled with TCD's strategic stochastic sampling (``gamma`` in (0, 1], diffusers'
``TCDScheduler`` ``eta``): the DDIM move stops at the lower level ``s'`` of timestep ``floor((1 - gamma) t_{i+1})``
and fresh noise takes it up to ``s_{i+1}``, ``x = x0 + s' (x - x0) / s_i + sqrt(s_{i+1}^2 - s'^2) n``.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .denoiser import Cond, Denoiser, TextCond, cond_take
from .partitions import PCAPartition, pooled_text_embedding
from .schedules import timestep_levels

# Attention projections, ResNet convs, transformer in/out projections, the feed-forward's Linear layers
# (``ff.net.0.proj`` inside GEGLU, ``ff.net.2``) and the toy MLP's Linears (``net.N``). Only Linear /
# Conv2d modules are adapted: GEGLU and Dropout (``ff.net.0``, ``ff.net.1``) also match ``net\.\d+`` but
# are filtered out by type, since peft refuses them.
DEFAULT_LORA_TARGETS = (r".*(to_q|to_k|to_v|to_out\.0|conv1|conv2|proj_in|proj_out|query|key|value|proj_attn"
                        r"|net\.0\.proj|net\.\d+)$")


class Student(nn.Module):
    """A generator ``G(z, cond)`` on a denoiser ``net``, evaluated at descending ``levels``.

    Args:
        net: the student denoiser (satisfies the denoiser contract).
        levels: descending noise levels the student is evaluated at; ``levels[0]`` is where pure
            noise enters (``x = levels[0] * z``).
        renoise: ``"fresh"`` (new Gaussian noise between steps) or ``"ddim"`` (deterministic).
        gamma: ``"ddim"`` students only: TCD's stochasticity in [0, 1] (0: plain DDIM, 1: all fresh noise);
            a sampling choice, not part of the trained student (``diffdistill sample / eval --gamma``).
    """

    def __init__(self, net: Denoiser, levels: Sequence[float], renoise: str = "fresh", gamma: float = 0.0) -> None:
        super().__init__()
        if renoise not in ("fresh", "ddim"):
            raise ValueError(f"renoise must be 'fresh' or 'ddim', got {renoise!r}")
        self.net = net
        self.levels = [float(s) for s in levels]
        self.renoise = renoise
        if not 0.0 <= gamma <= 1.0 or (gamma > 0 and renoise != "ddim"):
            raise ValueError(f"gamma must be in [0, 1] and needs renoise='ddim', got {gamma} with {renoise!r}")
        self.gamma = float(gamma)

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
                    x = x0 + s_next * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                elif self.gamma > 0:  # TCD: DDIM down to s' <= s_next, then fresh noise back up to s_next
                    s_low = min(tcd_level(self.net.sigma_grid(), s_next, self.gamma), s_next)
                    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                    x = x0 + s_low * ((x - x0) / s) + math.sqrt(s_next**2 - s_low**2) * n
                else:
                    x = x0 + s_next * ((x - x0) / s)
        return x0


def tcd_level(grid: Tensor, level: float, gamma: float) -> float:
    """TCD's intermediate level for a step that lands on ``level``: the level of index ``floor((1 - gamma) t)`` on
    the model's ascending ``grid``, where ``t`` is the index of the grid level nearest ``level`` (for a discrete
    teacher the index is its timestep, as in diffusers' ``TCDScheduler``; for a continuous one, a position on
    its log-uniform grid)."""
    grid = grid.detach().float().cpu()
    t = int(torch.argmin((grid - float(level)).abs()))
    return float(grid[int(math.floor((1.0 - gamma) * t))])


class RoutedStudent(nn.Module):
    """Several students and a router over the conditions (multi-student distillation).

    Sample ``i`` goes to the member whose group holds its condition; a mixed batch is split across members
    and put back in order, so every sample still costs one member's evaluations. Two routers:

    - class labels: ``groups[k]`` lists the labels member ``k`` serves (disjoint);
    - text prompts: a :class:`~diffdistill.partitions.PCAPartition` routes each prompt's pooled encoder
      embedding (:func:`~diffdistill.partitions.pooled_text_embedding`) down its tree of principal-component
      cuts, the same tree training partitioned the prompts with.

    Args:
        members: the students; all share the sample shape and the levels.
        groups: the label groups, or a fitted :class:`~diffdistill.partitions.PCAPartition` for text.
    """

    def __init__(self, members: Sequence[Student], groups: "Sequence[Sequence[int]] | PCAPartition") -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.text_partition: Optional[PCAPartition] = None
        if isinstance(groups, PCAPartition):
            if groups.num_students != len(members) or not members:
                raise ValueError(f"{len(members)} members need a text partition into as many groups, "
                                 f"got {groups.num_students}")
            self.text_partition, self.groups = groups, []
            self.register_buffer("table", torch.empty(0, dtype=torch.long), persistent=False)
            return
        if len(members) != len(groups) or not members:
            raise ValueError(f"{len(members)} members need as many label groups, got {len(groups)}")
        self.groups = [[int(c) for c in g] for g in groups]
        flat = [c for g in self.groups for c in g]
        if len(flat) != len(set(flat)) or min(flat, default=0) < 0:
            raise ValueError(f"label groups must be disjoint non-negative labels, got {self.groups}")
        table = torch.full((max(flat, default=-1) + 1,), -1, dtype=torch.long)
        for k, g in enumerate(self.groups):
            table[g] = k
        self.register_buffer("table", table, persistent=False)

    @property
    def net(self) -> Denoiser:
        """The first member's denoiser (sample shape, class count and device of the whole set)."""
        return self.members[0].net

    @property
    def levels(self) -> list[float]:
        return self.members[0].levels

    @property
    def renoise(self) -> str:
        return self.members[0].renoise

    @property
    def steps(self) -> int:
        return self.members[0].steps

    def levels_for(self, steps: Optional[int] = None) -> list[float]:
        return self.members[0].levels_for(steps)

    def route(self, cond: Cond) -> Tensor:
        """The member index of each condition (labels, or prompts' :class:`TextCond`).

        A label in no group, labels given to a text router or prompts to a label router: ``ValueError``."""
        if isinstance(cond, TextCond):
            if self.text_partition is None:
                raise ValueError("these students are routed by class label; they cannot take text prompts")
            return self.text_partition.route(pooled_text_embedding(cond)).to(cond.embeds.device)
        if self.text_partition is not None:
            raise ValueError("these students are routed by prompt; give text prompts, not class labels")
        if not isinstance(cond, Tensor):
            raise ValueError("a routed student needs class labels to pick a member for each sample")
        labels = cond.long()
        bad = labels[(labels < 0) | (labels >= len(self.table))]
        member = self.table.to(labels.device)[labels.clamp(0, len(self.table) - 1)]
        bad = torch.cat([bad, labels[member < 0]])
        if len(bad):
            raise ValueError(f"class label {int(bad[0])} belongs to no student's group {self.groups}")
        return member

    def forward(self, z: Tensor, cond: Cond = None, steps: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
        member = self.route(cond)
        out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        for k, student in enumerate(self.members):
            idx = (member == k).nonzero().squeeze(1)
            if len(idx):
                out[idx] = student(z[idx], cond_take(cond, idx), steps=steps, generator=generator).float()
        return out


def lora_parameters_state(net: nn.Module) -> dict[str, Tensor]:
    """The LoRA adapter's tensors of ``net`` (state-dict entries whose name holds ``lora_``)."""
    return {k: v for k, v in net.state_dict().items() if "lora_" in k}


def merge_lora(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every LoRA adapter merged into its base layer and the peft wrappers removed
    (plain diffusers modules again, e.g. for ``save_pretrained``)."""
    from peft.tuners.lora import LoraLayer

    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    for attr in ("lora_config", "peft_config"):
        if hasattr(net, attr):
            delattr(net, attr)
    return net


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and return the module in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def add_lora(net: nn.Module, rank: int = 64, alpha: Optional[float] = None,
             target_modules: str = DEFAULT_LORA_TARGETS) -> nn.Module:
    """Inject LoRA adapters (peft) into ``net``'s Linear/Conv2d layers whose full name matches the regular
    expression ``target_modules``; freeze everything else. ``alpha`` defaults to ``rank`` (scale 1)."""
    from peft import LoraConfig, inject_adapter_in_model

    freeze(net)
    alpha = float(alpha if alpha is not None else rank)
    # only Linear / Conv2d layers: a pattern that also names a Dropout or GEGLU module would make peft refuse
    names = [n for n, m in net.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and re.fullmatch(target_modules, n)]
    if not names:
        raise ValueError(f"LoRA matched no Linear/Conv2d layer of {type(net).__name__} with "
                         f"target_modules={target_modules!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights="gaussian")
    inject_adapter_in_model(config, net)
    # recorded so the student artefact can rebuild the same adapter on the teacher's weights
    net.lora_config = {"rank": int(rank), "alpha": alpha, "target_modules": target_modules}
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
