"""The method interface: everything the training loop knows about a distillation method.

A method owns its networks (student, fake score, GAN head, frozen copies ...) and its maths. Its
``train_step(batch, step)`` returns a :class:`StepOutput`: one scalar loss per *optimizer group* plus
floats to log. It never calls ``backward`` or steps an optimizer: the
:class:`~diffdistill.training.stepper.Stepper` does that for every method alike (backward outside
autocast, gradient accumulation over micro-batches, clipping, optimizer and LR-schedule steps, EMA), so
a method's file holds only its losses and a new method needs no change to the loop.

:meth:`Method.add_network` records *what* to optimise (per-network lr / betas / optimizer kind and the
group whose loss trains it); the Stepper builds the optimizers from it.

Distributed / mixed precision: the Stepper hands trainable networks to ``accelerate`` (DDP wrapping) and
runs ``train_step`` under autocast. Use ``self.wrapped[name]`` for the forward pass of the loss that trains
that network, and the raw module (``self.nets[name]``) where a network is only evaluated (frozen turn), so
DDP never sees a forward whose parameters receive no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from ..denoiser import Cond, Denoiser
from ..students import Student, trainable_parameters


@dataclass
class Batch:
    """One micro-batch's inputs, already in the denoiser's space.

    A batch is the slice ``[offset, offset + size)`` of the step's *global* batch of ``global_size``
    samples (all processes, all gradient-accumulation micro-batches). ``Batch(images, cond, generator,
    size)`` is a whole batch on its own (``offset=0``, ``global_size=size``).

    Attributes:
        images: ``[size, C, H, W]`` clean samples (latents for latent teachers; ``[size, D]`` for toy
            data), or ``None`` for data-free methods.
        cond: the batch's condition (labels, :class:`TextCond` or ``None``).
        generator: a ``torch.Generator`` seeded from ``(train.seed, step)``; every micro-batch of the step,
            on every process, gets its own generator with that same seed. Draw all randomness through
            :meth:`randn` / :meth:`rand` / :meth:`randint`: a draw whose first dimension is ``size`` is
            drawn for the global batch and sliced, so the slices of all micro-batches and processes
            together are exactly the noise of one process drawing the whole batch; any other draw (e.g.
            DMD2's backward-simulation depth) is identical in every micro-batch. A resumed run repeats the
            interrupted one.
        size: the number of samples in this batch.
        offset: where this batch starts in the global batch.
        global_size: the global batch size (``None``: ``size``).
    """

    images: Optional[Tensor]
    cond: Cond
    generator: torch.Generator
    size: int
    offset: int = 0
    global_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.global_size is None:
            self.global_size = self.size
        if not 0 <= self.offset <= self.global_size - self.size:
            raise ValueError(f"batch slice [{self.offset}, {self.offset + self.size}) is outside the global "
                             f"batch of {self.global_size}")

    def _draw(self, fn, shape, device, **kw) -> Tensor:
        shape = tuple(shape)
        device = device or self.generator.device
        if self.global_size != self.size and shape and shape[0] == self.size:
            full = fn((self.global_size, *shape[1:]), generator=self.generator, device=self.generator.device, **kw)
            return full[self.offset:self.offset + self.size].to(device)
        return fn(shape, generator=self.generator, device=self.generator.device, **kw).to(device)

    def randn(self, shape, device=None) -> Tensor:
        """Standard normal noise (see the class docstring for how micro-batches share the stream)."""
        return self._draw(torch.randn, shape, device)

    def rand(self, shape, device=None) -> Tensor:
        """Uniform [0, 1) noise."""
        return self._draw(torch.rand, shape, device)

    def randint(self, high: int, shape, device=None) -> Tensor:
        """Uniform integers in ``[0, high)``."""
        return self._draw(lambda s, **kw: torch.randint(high, s, **kw), shape, device)


@dataclass
class StepOutput:
    """What :meth:`Method.train_step` returns.

    Attributes:
        losses: optimizer group name (:attr:`Method.groups`) -> scalar loss tensor with its graph. Only the
            groups present step this iteration (DMD2's generator group appears every
            ``dfake_gen_update_ratio``-th iteration). Each loss must reach only its own group's networks
            (freeze, detach or use ``requires_grad_(False)`` elsewhere): the Stepper backpropagates their
            sum once.
        logs: floats to log (losses, diagnostics); the Stepper adds ``grad_norm_<network>``.
    """

    losses: dict[str, Tensor]
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimSpec:
    """How one trainable network is optimised; ``None`` fields fall back to the method's OptimConfig."""

    lr: Optional[float] = None
    betas: Optional[tuple[float, float]] = None
    optimizer: str = "adamw"  # adamw | radam (decoupled weight decay)


@dataclass
class OptimConfig:
    """Optimizer settings shared by every network a method trains (AdamW or RAdam + diffusers LR schedule)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    lr_schedule: str = "constant_with_warmup"
    warmup_steps: int = 0
    ema_decay: float = 0.0  # EMA of the student's trainable weights (diffusers EMAModel); 0 disables
    ema_power: float = 0.0  # > 0: power-function warm-up, decay after n updates = min(ema_decay, 1 - n^-ema_power)


class Method:
    """Base class for distillation methods: networks and maths, never an optimizer step.

    Subclasses set ``name`` and ``Config`` (a dataclass whose fields are the YAML section named after the
    method), build their networks in ``__init__`` and register them with :meth:`add_network`, then
    implement :meth:`train_step`, which returns the losses per optimizer group (:class:`StepOutput`).
    Backward passes, gradient clipping, optimizer and LR-schedule steps and the EMA of the student belong
    to :class:`~diffdistill.training.stepper.Stepper`, the one implementation the loop, tests and
    benchmarks share (NVlabs/FastGen's division of labour): a method file holds only its maths, and a new
    method needs no change to the loop.

    Args:
        teacher: the teacher denoiser, unguided (wrap with ``CFGDenoiser`` inside the method), or
            ``None`` for methods that train from data alone.
        student: the student generator; its ``net`` is registered as network ``"student"``.
        config: the method's hyperparameters (an instance of ``Config``).
        optim: optimizer settings; ``lr`` / ``betas`` may be overridden per network in :meth:`add_network`.
        total_steps: the run's ``train.steps`` (for curricula and LR schedules).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    needs_data: ClassVar[bool] = True  # data-free methods (BOOT) set False: the loop opens no dataset
    supports_fp16: ClassVar[bool] = True  # False: the Stepper refuses train.mixed_precision=fp16
    fp16_reason: ClassVar[str] = ""  # why not, shown in that error
    # the networks ``train.ema_decay`` averages (their trainable parameters, one EMA); sampling and the saved
    # artefact use the averages. MSD lists its K members (student_0 ... student_{K-1}).
    ema_networks: tuple[str, ...] = ("student",)

    def __init__(self, teacher: Optional[Denoiser], student: Student, config: Any,
                 optim: Optional[OptimConfig] = None, total_steps: int = 1000) -> None:
        self.teacher = teacher
        self.student = student
        self.config = config
        self.optim = optim or OptimConfig()
        self.total_steps = total_steps
        self.nets: dict[str, nn.Module] = {}
        self.wrapped: dict[str, nn.Module] = {}
        self.optim_specs: dict[str, OptimSpec] = {}
        self.groups: dict[str, list[str]] = {}
        self.accelerator = None  # set by the Stepper (process-aware printing); None in plain Python
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
        self.add_network("student", student.net)

    # ----------------------------------------------------------------------------------------------
    # Networks: what to optimise (the Stepper builds the optimizers)
    def add_network(self, name: str, net: nn.Module, lr: Optional[float] = None,
                    betas: Optional[tuple[float, float]] = None, optimizer: str = "adamw",
                    group: Optional[str] = None) -> nn.Module:
        """Register a network to checkpoint; if it has trainable parameters, record how to optimise it.

        Args:
            name: the network's name (checkpoint file ``<name>.safetensors``, ``wrapped[name]``).
            lr, betas: override ``optim.lr`` / ``optim.betas`` for this network.
            optimizer: ``"adamw"`` or ``"radam"`` (decoupled weight decay, iCT's optimizer).
            group: the optimizer group whose loss trains it (:attr:`groups`); default its own ``name``.
                Several networks share a group when one loss trains them all (DMD2's critic loss trains
                the fake score and the GAN head): one backward, then each clips and steps on its own.

        Registering a name again replaces the earlier registration.
        """
        if optimizer not in ("adamw", "radam"):
            raise ValueError(f"optimizer must be 'adamw' or 'radam', got {optimizer!r}")
        for members in self.groups.values():
            if name in members:
                members.remove(name)
        self.groups = {g: m for g, m in self.groups.items() if m}
        self.optim_specs.pop(name, None)
        self.nets[name] = net
        self.wrapped[name] = net
        if trainable_parameters(net):
            self.optim_specs[name] = OptimSpec(lr, None if betas is None else tuple(betas), optimizer)
            self.groups.setdefault(group or name, []).append(name)
        return net

    @property
    def device(self) -> torch.device:
        return next(self.student.net.parameters()).device

    # ----------------------------------------------------------------------------------------------
    # The step
    def train_step(self, batch: Batch, step: int) -> StepOutput:  # pragma: no cover - abstract
        """Compute one iteration's losses on ``batch``; step nothing (the Stepper does).

        Use ``self.wrapped[name]`` for the forward pass of a loss that trains network ``name`` (so DDP
        synchronises its gradients) and the raw ``self.nets[name]`` where the network is only evaluated.
        The Stepper runs this under autocast and backpropagates outside it.
        """
        raise NotImplementedError

    def on_train_start(self, run_dir: Path, step: int, is_main: bool) -> None:
        """Hook once the run folder is known and any checkpoint is restored (``step`` = the first step to
        run), before the first step. Run-level artefacts that never change (DisBack's recorded path) are
        written here or later into ``run_dir`` (by the main process), once, not in every checkpoint."""

    def on_step_end(self, step: int) -> dict[str, float]:
        """Hook after each step (stage switches, curricula); return anything worth logging."""
        return {}

    def artefacts_due(self, step: int) -> dict[str, dict[str, Any]]:
        """Student artefacts to keep in the run folder now that ``step`` steps are done, asked after the step
        and before :meth:`on_step_end` (so :meth:`generator` is still the one that step trained):
        ``{folder relative to the run folder: extra info for its student.json}``. The loop writes
        :meth:`generator` (EMA weights when EMA is on) to each, atomically, on the main process (TSCD keeps
        every stage's student as ``stages/steps-K`` this way)."""
        return {}

    def status(self) -> dict[str, float]:
        """The method's current state (e.g. a stage or DisBack's target node), logged as is at every log row
        of ``metrics.jsonl`` / TensorBoard and shown in the progress bar."""
        return {}

    def generator(self) -> Any:
        """What to sample from, on the LIVE weights: a :class:`Student` (one/few-step), or a
        :class:`Denoiser` that the generator API integrates with an ODE solver (teacher training).

        It never copies EMA weights: the loop samples and saves inside ``Stepper.ema_weights()``, which
        swaps them into these very modules for the duration.
        """
        return self.student

    def save_artifacts(self, run_dir) -> None:
        """Hook after each checkpoint on the main process (e.g. export a diffusers folder); runs inside
        ``Stepper.ema_weights()``, so the live student carries the EMA weights when EMA is on."""

    # ----------------------------------------------------------------------------------------------
    # Extra state (counters, stage index): JSON-serialisable, saved in the checkpoint's meta.json.
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass
