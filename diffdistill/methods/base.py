"""The method interface: everything the training loop knows about a distillation method.

A method owns its extra networks (fake score, GAN head, EMA target ...), its optimizers and its
losses, and exposes ``train_step(batch, step) -> {name: float}``. The loop never branches on the
method. Backward passes, gradient clipping, LR schedules and EMA are injected through
:meth:`Method.update` and :meth:`Method.prepare`, so a method's file holds only its maths.

Distributed / mixed precision: :meth:`prepare` hands trainable networks to ``accelerate``
(DDP wrapping, autocast). Use ``self.wrapped[name]`` for the forward pass of the loss that trains that
network, and the raw module (``self.nets[name]``) where a network is only evaluated (frozen turn),
so DDP never sees a forward whose parameters receive no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser
from ..students import Student, trainable_parameters


@dataclass
class Batch:
    """One step's inputs, already in the denoiser's space.

    Attributes:
        images: ``[B, C, H, W]`` clean samples (latents for latent teachers; ``[B, D]`` for toy data),
            or ``None`` for data-free methods.
        cond: the batch's condition (labels, :class:`TextCond` or ``None``).
        generator: a ``torch.Generator`` seeded from ``(train.seed, step)``, the same on every process.
            Draw all randomness through :meth:`randn` / :meth:`rand` / :meth:`randint`: a draw whose first
            dimension is the per-process batch size is drawn for the *global* batch and sliced, so two
            processes see exactly the noise one process would; any other draw (e.g. DMD2's backward
            simulation depth) is identical on every process. A resumed run repeats the interrupted one.
        size: the per-process batch size.
        rank, world: this process's index and the number of processes.
    """

    images: Optional[Tensor]
    cond: Cond
    generator: torch.Generator
    size: int
    rank: int = 0
    world: int = 1

    def _draw(self, fn, shape, device, **kw) -> Tensor:
        shape = tuple(shape)
        device = device or self.generator.device
        if self.world > 1 and shape and shape[0] == self.size:
            full = fn((self.size * self.world, *shape[1:]), generator=self.generator, device=self.generator.device, **kw)
            return full[self.rank * self.size:(self.rank + 1) * self.size].to(device)
        return fn(shape, generator=self.generator, device=self.generator.device, **kw).to(device)

    def randn(self, shape, device=None) -> Tensor:
        """Standard normal noise (see the class docstring for how processes share the stream)."""
        return self._draw(torch.randn, shape, device)

    def rand(self, shape, device=None) -> Tensor:
        """Uniform [0, 1) noise."""
        return self._draw(torch.rand, shape, device)

    def randint(self, high: int, shape, device=None) -> Tensor:
        """Uniform integers in ``[0, high)``."""
        return self._draw(lambda s, **kw: torch.randint(high, s, **kw), shape, device)


@dataclass
class OptimConfig:
    """Optimizer settings shared by every network a method trains (AdamW + diffusers LR schedule)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    lr_schedule: str = "constant_with_warmup"
    warmup_steps: int = 0
    ema_decay: float = 0.0  # EMA of the student's trainable weights (diffusers EMAModel); 0 disables


class Method:
    """Base class for distillation methods.

    Subclasses set ``name`` and ``Config`` (a dataclass whose fields are the YAML section named after the
    method), build their networks in ``__init__`` and register them with :meth:`add_network`, then
    implement :meth:`train_step`.

    Args:
        teacher: the teacher denoiser, unguided (wrap with ``CFGDenoiser`` inside the method), or
            ``None`` for methods that train from data alone.
        student: the student generator; its ``net`` is registered as network ``"student"``.
        config: the method's hyperparameters (an instance of ``Config``).
        optim: optimizer settings; ``lr`` may be overridden per network in :meth:`add_network`.
        total_steps: the run's ``train.steps`` (for curricula and LR schedules).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    needs_data: ClassVar[bool] = True  # data-free methods (BOOT) set False: the loop opens no dataset

    def __init__(self, teacher: Optional[Denoiser], student: Student, config: Any,
                 optim: Optional[OptimConfig] = None, total_steps: int = 1000) -> None:
        self.teacher = teacher
        self.student = student
        self.config = config
        self.optim = optim or OptimConfig()
        self.total_steps = total_steps
        self.nets: dict[str, nn.Module] = {}
        self.wrapped: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.accelerator = None
        self.last_grad_norm: dict[str, float] = {}
        self.ema = None
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
        self.add_network("student", student.net)
        if self.optim.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(trainable_parameters(student.net), decay=self.optim.ema_decay)

    # ----------------------------------------------------------------------------------------------
    # Networks and optimizers
    def add_network(self, name: str, net: nn.Module, lr: Optional[float] = None,
                    betas: Optional[tuple[float, float]] = None) -> nn.Module:
        """Register a network to checkpoint; if it has trainable parameters, give it an AdamW."""
        self.nets[name] = net
        self.wrapped[name] = net
        params = trainable_parameters(net)
        if params:
            o = self.optim
            self.optimizers[name] = torch.optim.AdamW(params, lr=lr if lr is not None else o.lr,
                                                      betas=tuple(betas or o.betas), weight_decay=o.weight_decay)
            from diffusers.optimization import get_scheduler

            self.schedulers[name] = get_scheduler(o.lr_schedule, self.optimizers[name],
                                                  num_warmup_steps=o.warmup_steps, num_training_steps=self.total_steps)
        return net

    def prepare(self, accelerator) -> None:
        """Hand trainable networks, optimizers and schedulers to ``accelerate`` (DDP, autocast, scaler)."""
        self.accelerator = accelerator
        for name in list(self.optimizers):
            self.wrapped[name], self.optimizers[name], self.schedulers[name] = accelerator.prepare(
                self.nets[name], self.optimizers[name], self.schedulers[name])
        for name, net in self.nets.items():
            if name not in self.optimizers:
                net.to(accelerator.device)
        if self.teacher is not None:
            self.teacher.to(accelerator.device)
        if self.ema is not None:
            self.ema.to(accelerator.device)

    @property
    def device(self) -> torch.device:
        return next(self.student.net.parameters()).device

    def update(self, name: str, loss: Tensor) -> float:
        """Backward ``loss`` into network ``name``, clip, step its optimizer and LR schedule; grad norm."""
        opt = self.optimizers[name]
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        clip = self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf")
        if self.accelerator is not None:
            norm = self.accelerator.clip_grad_norm_(params, clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        self.schedulers[name].step()
        opt.zero_grad(set_to_none=True)
        self.last_grad_norm[name] = float(norm) if norm is not None else float("nan")
        if name == "student" and self.ema is not None:
            self.ema.step(trainable_parameters(self.student.net))
        return self.last_grad_norm[name]

    def ema_state(self) -> Optional[dict[str, Tensor]]:
        """EMA shadow weights keyed by parameter name (``None`` without EMA), for checkpoints."""
        if self.ema is None:
            return None
        names = [n for n, p in self.student.net.named_parameters() if p.requires_grad]
        return dict(zip(names, self.ema.shadow_params))

    def load_ema_state(self, state: dict[str, Tensor]) -> None:
        names = [n for n, p in self.student.net.named_parameters() if p.requires_grad]
        self.ema.shadow_params = [state[n].to(self.device) for n in names]

    def ema_student(self) -> Student:
        """A copy of the student carrying the EMA weights (the student itself when EMA is off)."""
        if self.ema is None:
            return self.student
        import copy

        student = copy.deepcopy(self.student)
        self.ema.copy_to(trainable_parameters(student.net))
        return student

    # ----------------------------------------------------------------------------------------------
    # The step
    def train_step(self, batch: Batch, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        """Run one training iteration; return scalar losses (and diagnostics) to log."""
        raise NotImplementedError

    def on_step_end(self, step: int) -> dict[str, float]:
        """Hook after each step (stage switches, curricula); return anything worth logging."""
        return {}

    def generator(self) -> Any:
        """What to sample from: a :class:`Student` (one/few-step), or a :class:`Denoiser` that the
        generator API integrates with an ODE solver (teacher training). EMA weights when EMA is on."""
        return self.ema_student()

    def save_artifacts(self, run_dir) -> None:
        """Hook after each checkpoint on the main process (e.g. export a diffusers folder)."""

    # ----------------------------------------------------------------------------------------------
    # Extra state (counters, stage index): JSON-serialisable, saved in the checkpoint's meta.json.
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass
