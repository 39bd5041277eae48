"""BOOT: data-free distillation of a diffusion teacher by bootstrapping (Gu et al., ICML 2024).

The student ``g(n, s, c)`` reads pure noise ``n`` and a noise level ``s`` and predicts the *signal*
``y_s = x_s - s n`` of the teacher's ODE trajectory that starts from ``x_T = T n`` (sigma space; in the
paper's VP notation ``y_t = (x_t - sigma_t n) / alpha_t``). No image is ever read: only noise and
conditions (labels or prompts), so ``needs_data = False`` and the loop opens no dataset.

One deterministic teacher DDIM step from ``t`` to ``s < t``, ``x_s = f + (s / t)(x_t - f)`` with
``f = D(x_t, t, c)``, written on the signal is exact (the paper's Signal-ODE discretised by DDIM; the noise cancels)::

    y_s = y_t + (1 - exp(lambda_s - lambda_t)) (f - y_t),   lambda = -log(alpha / sigma) = log(sigma_edm)
        = y_t + (1 - s / t) (f - y_t)                         in sigma space

Training step (shared/reference/METHODS.md, BOOT)::

    t ~ U over the grid levels, s = the level ``delta`` indices below
    no grad:  y_t = g(n, t, c);  f = D_cfg(y_t + t n, t, c);  d = 1 - s / t;  target = y_t + d (f - y_t)
    L_BS = mean((g(n, s, c) - target)^2) / d^2                     # bootstrapping objective
    L_BC = mean((g(n, T, c) - D_cfg(T n, T, c))^2)                 # boundary at the largest level T
    L = L_BS + beta L_BC;   sampling: x0 = g(n, s_min, c), one network evaluation

What is from the paper and what is reconstructed (there is no official code):

- [paper] signal parameterisation, the exact DDIM target, the ``1 / d^2`` weight, the boundary
  condition ``y_T = D(T n, T)``, guidance baked in at a fixed scale, no EMA target.
- [reconstruction] ``beta`` (0.1, as in a public port), the step size ``delta`` and the grid / time
  sampling (uniform over the teacher's levels by default): the paper does not ablate them.
- [reconstruction] **how the noise enters the network** (:class:`BootStudent`). The student is any
  network under the denoiser contract (a copy / LoRA of the teacher or a small net), and is evaluated
  as ``g(n, s, c) = D_net(tau(s) n, tau(s), c)``: the net sees the pure noise ``n`` as a sample at its
  level ``tau(s)``, where ``tau`` maps the BOOT time ``[s_min, T]`` monotonically onto
  ``[net_sigma_min, T]`` (log-linear, ``tau(T) = T``). Why not ``tau(s) = s``: near ``s = 0`` a
  denoiser with a skip path is ``D(x, s) = x + O(s)`` (EDM: ``c_skip -> 1``, ``c_out ~ s``; epsilon and
  v prediction: ``x - s eps``, ``alpha^2 x - alpha s v``),
  so whatever the network computes, ``g(n, s_min)`` stays within ``O(s_min)`` of its input instead of
  being a clean sample. On the exact mixture teacher (4000 steps) ``tau(s) = s`` ends with every sample
  in one mode (energy distance 1.6) against 0.014 with the default map. Evaluating the net only at levels
  ``>= net_sigma_min`` (default 1.0, where the skip weight is small) lets it output any signal, while
  ``g(n, T) = D_net(T n, T)`` still equals the teacher's boundary value at initialisation for a copied
  student (``L_BC = 0`` at step 0 without guidance). ``net_sigma_min: null`` gives the
  literal ``tau(s) = s``. Because ``g(z, s_min) = D_net(tau_min z, tau_min)``, the student is an ordinary
  one-level :class:`~diffdistill.students.Student` at ``levels = [tau_min]`` for the sampling code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from ..denoiser import CFGDenoiser, Cond, Denoiser, append_dims, as_sigma_batch, cond_cat
from ..errors import UserError
from ..schedules import karras_sigmas
from ..schema import Interval, NonNegFloat, PositiveFloat, PositiveInt
from ..students import Student
from .base import Batch, Method, OptimConfig, StepOutput


@dataclass
class BootConfig:
    """The ``boot:`` section of a run config."""

    beta: NonNegFloat = 0.1  # weight of the boundary loss L_BC (unpublished; 0.1 in a public port)
    guidance_scale: NonNegFloat = 1.0  # CFG scale of the teacher, baked into the student (1 = plain conditional)
    # levels t and s come from: teacher (its own grid) | karras | loguniform
    grid: Literal["teacher", "karras", "loguniform"] = "teacher"
    grid_size: PositiveInt = 1000  # levels of karras / loguniform grids, and of 'teacher' for continuous teachers
    delta: PositiveInt | None = None  # step t -> s in grid indices; None: round(delta_ratio * (N - 1)), N = grid length
    # step as a fraction of the grid (20 of 1000 timesteps); used when delta is None
    delta_ratio: Annotated[float, Interval(gt=0, lt=1)] = 0.02
    # uniform over grid indices (paper) | lognormal (EDM p_mean/p_std, snapped)
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    p_mean: float = -1.2  # lognormal time sampling: mean of log sigma
    p_std: PositiveFloat = 1.2  # lognormal time sampling: std of log sigma
    weighting: Literal["inv_d2", "none"] = "inv_d2"  # L_BS weight: inv_d2 (1/d^2, paper) | none
    net_sigma_min: PositiveFloat | None = 1.0  # level the net is evaluated at for s_min (time map); None: tau(s) = s


class BootStudent(Student):
    """The BOOT generator ``g(n, s, c) = D_net(tau(s) n, tau(s), c)`` (see the module docstring).

    Args:
        net: the student denoiser.
        s_min, s_max: the smallest and largest BOOT levels (the grid's ends); sampling returns
            ``g(z, s_min)``, the boundary is at ``s_max``.
        net_sigma_min: the net's level at ``s_min``; ``tau(s) = s_max (s / s_max)^r`` with
            ``r = log(s_max / net_sigma_min) / log(s_max / s_min)``. ``None``: ``tau(s) = s``.
    """

    def __init__(self, net: Denoiser, s_min: float, s_max: float, net_sigma_min: float | None = 1.0) -> None:
        tau_min = float(s_min if net_sigma_min is None else net_sigma_min)
        if not 0 < s_min < s_max:
            raise ValueError(f"BOOT needs 0 < s_min < s_max, got s_min={s_min}, s_max={s_max}")
        if not 0 < tau_min < s_max:
            raise UserError(f"boot.net_sigma_min must lie in (0, {s_max:g}) (the largest level), got {tau_min:g}")
        super().__init__(net, [tau_min], renoise="fresh")
        self.s_min, self.s_max, self.tau_min = float(s_min), float(s_max), tau_min
        self.power = math.log(s_max / tau_min) / math.log(s_max / s_min)

    def net_sigma(self, s: Tensor) -> Tensor:
        """``tau(s)``: the level the net is evaluated at for BOOT level ``s`` (``tau(s_max) = s_max``)."""
        return self.s_max * (s / self.s_max) ** self.power

    def g(self, n: Tensor, s: Tensor | float, cond: Cond = None, net: torch.nn.Module | None = None) -> Tensor:
        """The signal ``y_s`` predicted from pure noise ``n`` ([B, ...]) at BOOT levels ``s`` ([B] or scalar).

        ``net`` overrides ``self.net`` (the method passes the DDP-wrapped module for the trained forward).
        """
        tau = self.net_sigma(as_sigma_batch(s, n))
        return (net or self.net)(append_dims(tau, n.ndim) * n, tau, cond)

    def levels_for(self, steps: int | None = None) -> list[float]:
        """The net's one level ``[tau_min]``; a BOOT student has no multi-step schedule."""
        if steps not in (None, 1):
            raise UserError(f"a BOOT student samples in one step (it predicts the end of the teacher's "
                            f"trajectory directly); got steps={steps}")
        return self.levels

    def forward(self, z: Tensor, cond: Cond = None, steps: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """One-step sample ``x0 = g(z, s_min, c)``: exactly one network evaluation."""
        self.levels_for(steps)
        return self.g(z, self.s_min, cond)


def boot_grid(teacher: Denoiser, kind: str = "teacher", size: int = 1000) -> Tensor:
    """The ascending float64 grid of levels that ``t`` and ``s`` are drawn from."""
    if kind == "teacher":
        grid = teacher.sigma_grid(size)
    elif kind == "karras":
        grid = karras_sigmas(size, teacher.sigma_min, teacher.sigma_max).flip(0)
    elif kind == "loguniform":
        grid = torch.logspace(math.log10(teacher.sigma_min), math.log10(teacher.sigma_max), size)
    else:
        raise UserError(f"boot.grid must be teacher, karras or loguniform, got {kind!r}")
    return grid.detach().double().cpu()


def signal_ddim_step(y_t: Tensor, f: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """One exact teacher DDIM step ``t -> s`` on the signal: ``y_s = y_t + d (f - y_t)``, ``d = 1 - s/t``.

    Equals ``x_s - s n`` for the x-space DDIM step ``x_s = f + (s/t)(x_t - f)`` from ``x_t = y_t + t n``
    (the noise cancels), i.e. ``1 - exp(lambda_s - lambda_t)`` in VP notation. Returns ``(y_s, d)``,
    ``d`` of shape ``[B]``.
    """
    d = 1 - s / t
    return y_t + append_dims(d, y_t.ndim) * (f - y_t), d


class BOOT(Method):
    """Data-free distillation by bootstrapping (see the module docstring for the maths and sources).

    Args:
        teacher: the unguided teacher denoiser (guidance ``config.guidance_scale`` is applied here).
        student: a one-step student; its ``net`` is wrapped into a :class:`BootStudent`.
        config: :class:`BootConfig`.
    """

    name = "boot"
    Config = BootConfig
    needs_data = False

    def __init__(self, teacher: Denoiser | None, student: Student, config: BootConfig | None = None,
                 optim: OptimConfig | None = None, total_steps: int = 1000) -> None:
        config = config or BootConfig()
        if teacher is None:
            raise UserError("BOOT distils a teacher: set teacher.path")
        if student.steps != 1:
            raise UserError(f"a BOOT student samples in one step: set student.steps to 1 (got {student.steps})")
        for key in ("time_sampling", "weighting"):
            allowed = {"time_sampling": ("uniform", "lognormal"), "weighting": ("inv_d2", "none")}[key]
            if getattr(config, key) not in allowed:
                raise UserError(f"boot.{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
        self.grid = boot_grid(teacher, config.grid, config.grid_size)  # ascending, [N]
        n = len(self.grid)
        self.delta = int(config.delta if config.delta is not None else round(config.delta_ratio * (n - 1)))
        if not 1 <= self.delta <= n - 1:
            raise UserError(f"the BOOT step must be between 1 and {n - 1} grid indices, got {self.delta} "
                            f"(boot.delta / boot.delta_ratio)")
        if not isinstance(student, BootStudent):
            student = BootStudent(student.net, float(self.grid[0]), float(self.grid[-1]), config.net_sigma_min)
        super().__init__(teacher, student, config, optim, total_steps)
        self.teacher_cfg = CFGDenoiser(teacher, config.guidance_scale)

    def sample_levels(self, batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
        """Draw ``t`` (index ``i`` in ``[delta, N - 1]``) and ``s`` (index ``i - delta``) per sample: ``[B]`` each."""
        n, lo = len(self.grid), self.delta
        grid = self.grid.to(device)
        if self.config.time_sampling == "uniform":
            i = lo + (batch.rand((batch.size,), device) * (n - lo)).long().clamp(max=n - 1 - lo)
        else:  # EDM log-normal, snapped to the first grid level at or above it
            log_sigma = self.config.p_mean + self.config.p_std * batch.randn((batch.size,), device)
            i = torch.searchsorted(grid.log(), log_sigma.double()).clamp(lo, n - 1)
        return grid[i].float(), grid[i - lo].float()

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """``L_BS``, ``L_BC`` and their weighted sum for one batch (differentiable in the student)."""
        device = self.device
        student: BootStudent = self.student
        shape = (batch.size,) + tuple(student.net.sample_shape)
        n = batch.randn(shape, device)
        t, s = self.sample_levels(batch, device)
        big_t = torch.full_like(t, float(self.grid[-1]))
        cond = batch.cond
        with torch.no_grad():
            y_t = student.g(n, t, cond)  # raw module: an evaluation, not the trained forward
            # one teacher call for the bootstrap point x_t = y_t + t n and the boundary point T n
            x = torch.cat([y_t + append_dims(t, n.ndim) * n, append_dims(big_t, n.ndim) * n])
            f, y_big = self.teacher_cfg(x, torch.cat([t, big_t]), cond_cat([cond, cond])).chunk(2)
            target, d = signal_ddim_step(y_t, f, t, s)
        # one trained forward (through the DDP wrapper) for g(n, s) and g(n, T)
        out = student.g(torch.cat([n, n]), torch.cat([s, big_t]), cond_cat([cond, cond]), net=self.wrapped["student"])
        g_s, g_big = out.chunk(2)
        per_sample = (g_s - target).pow(2).flatten(1).mean(1)
        weight = d.pow(-2) if self.config.weighting == "inv_d2" else torch.ones_like(d)
        loss_bs = (weight * per_sample).mean()
        loss_bc = (g_big - y_big).pow(2).mean()
        return {"loss": loss_bs + self.config.beta * loss_bc, "loss_bs": loss_bs, "loss_bc": loss_bc,
                "d_mean": d.mean()}

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        """The student's loss for one batch; never reads ``batch.images``."""
        out = self.losses(batch)
        return StepOutput({"student": out["loss"]}, {k: float(v.detach()) for k, v in out.items()})


METHOD = BOOT
