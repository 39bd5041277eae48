"""Consistency distillation (CD) and Hyper-SD's trajectory-segmented CD (TSCD), one implementation.

Solver grid ``t_0 < t_1 < ... < t_N`` (the teacher's discrete timesteps with trailing spacing, a Karras
grid, or a geometric one: ``t_i = t_0 (t_N / t_0)^(i/N)``, uniform in log-SNR), cut into ``k`` equal segments
with edges ``t_{jN/k}``. With ``edges: geometric`` a k-segment stage trains on its own grid instead: edges
``t_0 (t_N / t_0)^(j/k)`` and, inside each segment, ``N/k`` levels at the solver grid's own spacing (below,
``t`` is the current stage's grid). For ``n ~ U{0..N-1}``:

    x_{n+1} = x + t_{n+1} z                                       # noised real data
    x_hat_n = solver_step(D_teacher_cfg, x_{n+1}, t_{n+1} -> t_n)  # DDIM or Heun, CFG w (or U[lo, hi])
    e       = the lower edge of n's segment
    pred    = jump(x_{n+1}, f(x_{n+1}, t_{n+1}), t_{n+1} -> e)    # DDIM jump along the x0 prediction
    target  = x_hat_n if t_n == e else sg jump(x_hat_n, f(x_hat_n, t_n), t_n -> e)
    L = lambda_n d(pred, target)      # PCM: elementwise pseudo-Huber c = 1e-3, lambda = 1, online target

``lambda_n`` is 1 (PCM) or iCT's ``1 / (t_{n+1} - t_n)``; ``segment_balance`` b rescales each segment's iCT
weights by ``(grid mean / segment mean)^b`` so that the top segments, whose long steps make their iCT weights
small, are not starved (b = 1: every segment the same mean weight).

CD is the one-segment case: the only edge is ``t_0``, the consistency function's boundary.
Progressive stages (Hyper-SD: 8 -> 4 -> 2 -> 1 segments) switch at configured steps. The trajectory of a
later stage comes from the original teacher or from a frozen copy of the student at the end of the stage
before (``stage_teacher``; Hyper-SD: the previous stage's model; the details are [inferred]). That model
is not used as an ODE solver: a DDIM step along its x0 follows the chord to its edge, not the curved
trajectory (in effect one Euler step per segment). It supplies the point of its own trajectory at its
finer edge instead, ``x_hat = jump(x_{n+1}, f_prev(x_{n+1}), t_{n+1} -> e')`` with ``e' >= e`` (edges
nest), and ``e'`` replaces ``t_n`` above; its guidance is already baked in.
A k-segment student samples k steps along the edges with deterministic DDIM re-noising: the method keeps
``student.levels`` equal to the current stage's edges and ``renoise="ddim"``. Evaluated at level
``t_{n+1}`` (an edge ``t_{jN/k}``) the student is trained to give the DDIM jump to the next lower edge, which
is exactly the sampler's step between consecutive levels, so training, sampling and export share the levels.
Hyper-SD ships one student per stage: when a stage ends (the step the next one starts, or the end of the run)
the loop keeps its student as ``RUN/stages/steps-k`` (:meth:`artefacts_due`, written before the switch, by
the main process, atomically), and ``load_generator(RUN, steps=k)`` / ``sample`` / ``eval fid`` / ``export``
``--steps k`` use the stage student trained for k segments.
Optional adversarial term (PCM [code]; here DMD2's small GAN head on the frozen teacher's bottleneck
features, unconditional): prediction and target are re-noised from the edge to a level inside the
segment, hinge loss, weight 0.1. The head (group ``discriminator``) and the student step together on one
iteration's gradients, so the generator's hinge term sees the head before this iteration's update
(simultaneous rather than alternating updates).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import torch
from torch import Tensor

from ..denoiser import Cond, Denoiser, append_dims
from ..errors import UserError
from ..schema import Count, Len, MinLen, NonNegFloat, PositiveFloat, PositiveInt, Probability
from ..students import Student, freeze
from .base import Batch, Method, OptimConfig, StepOutput
from .consistency import (LOSSES, ConsistencyDenoiser, consistency_distance, ddim_jump, draw_seed, fixed_rng,
                          geometric_sigmas, guided_denoiser, ict_sigmas, solver_step)


@dataclass
class TSCDConfig:
    # segments of each progressive stage (Hyper-SD: 8, 4, 2, 1)
    segments: Annotated[list[PositiveInt], MinLen(1)] = field(default_factory=lambda: [8, 4, 2, 1])
    stage_starts: Optional[list[Count]] = None  # step at which each stage begins (first 0); None: equal shares
    # later stages' trajectory: previous (frozen student of the stage before) | teacher
    stage_teacher: Literal["previous", "teacher"] = "previous"
    solver_steps: PositiveInt = 48  # N; divisible by every segment count (PCM SD1.5: 50 with 4 phases)
    solver: Literal["ddim", "heun"] = "ddim"  # teacher ODE step: ddim (= Euler in sigma space, PCM/LCM) | heun (CM)
    # solver grid: teacher (its discrete timesteps, trailing: PCM/LCM) | karras (CM) | geometric (uniform in
    # log sigma = log-SNR, DPM-Solver's logSNR spacing; the edges of every stage then sit at the same log-SNR
    # fractions whatever the teacher's beta schedule)
    grid: Literal["teacher", "karras", "geometric"] = "teacher"
    # where a k-segment stage's edges sit: uniform (Hyper-SD / PCM: every N/k-th grid level) | geometric
    # (t_0 (t_N / t_0)^(j/k) on the grid's range [t_0, t_N]: uniform in log-SNR, exported as Euler with
    # exponential sigmas; each segment's N/k solver levels keep the grid's own spacing between its edges)
    edges: Literal["uniform", "geometric"] = "uniform"
    guidance_scale: NonNegFloat = 1.0  # teacher CFG in the solver, u + w (c - u); filled from teacher.guidance_scale
    # w ~ U[lo, hi] per sample instead of guidance_scale (PCM SD1.5: [5, 6], its LCM-style w in [4, 5])
    guidance_range: Optional[Annotated[list[NonNegFloat], Len(2, 2)]] = None
    sigma_min: Optional[PositiveFloat] = None  # lowest level (the boundary) of a karras/geometric grid; None: the teacher's
    sigma_max: Optional[PositiveFloat] = None  # highest level of a karras/geometric grid; None: the teacher's
    rho: PositiveFloat = 7.0  # exponent of a karras grid (also used for teachers without discrete timesteps)
    # huber_elementwise (PCM) | huber (iCT, whole sample) | mse
    loss: Literal["huber", "huber_elementwise", "mse"] = "huber_elementwise"
    huber_c: Optional[PositiveFloat] = None  # pseudo-Huber c; None: 1e-3 (elementwise) or 0.00054 sqrt(dim)
    # per-level weight: uniform (CM, PCM) | ict (1 / (t_{n+1} - t_n), iCT's lambda)
    weighting: Literal["uniform", "ict"] = "uniform"
    # b in [0, 1]: each segment's weights times (grid mean / segment mean)^b; 0: as weighted, 1: equal segment means
    segment_balance: Probability = 0.0
    consistency_param: bool = True  # f = iCT's c_skip/c_out on the x0 prediction; false: plain x0 (PCM)
    adv_weight: NonNegFloat = 0.0  # hinge adversarial term weight (PCM: 0.1); 0 disables it
    adv_lr: PositiveFloat = 1e-5  # discriminator head learning rate (PCM)


@dataclass
class CDConfig(TSCDConfig):
    # CD: one segment, consistency to the boundary
    segments: Annotated[list[PositiveInt], MinLen(1)] = field(default_factory=lambda: [1])
    solver_steps: PositiveInt = 18  # N (CM on CIFAR-10 with an EDM teacher: 18; LCM/PCM DDIM: 50)
    solver: Literal["ddim", "heun"] = "heun"  # CM's teacher solver with EDM teachers
    grid: Literal["teacher", "karras", "geometric"] = "karras"  # CM's grid (rho 7 on [sigma_min, sigma_max])
    loss: Literal["huber", "huber_elementwise", "mse"] = "huber"  # iCT's pseudo-Huber in place of CM's LPIPS


class TSCD(Method):
    """Trajectory-segmented consistency distillation (CD when ``segments == [1]``). See the module docstring."""

    name = "tscd"
    Config = TSCDConfig
    needs_data = True

    def __init__(self, teacher: Optional[Denoiser], student: Student, config: TSCDConfig,
                 optim: Optional[OptimConfig] = None, total_steps: int = 1000) -> None:
        if teacher is None:
            raise UserError(f"{self.name} distils a teacher: set teacher.path")
        self._validate(config)
        super().__init__(teacher, student, config, optim, total_steps)
        self.grid = self._solver_grid(teacher, config, self.name)  # ascending [N + 1]
        # each stage's own levels (the grid itself unless edges: geometric moves the edges)
        self.stage_grids = {k: self._stage_grid(self.grid, k, config.edges) for k in set(config.segments)}
        self.f = ConsistencyDenoiser(student.net, float(self.grid[0])) if config.consistency_param else student.net
        k = len(config.segments)
        self.starts = config.stage_starts or [j * total_steps // k for j in range(k)]
        self.stage_teacher: Optional[Denoiser] = None
        if config.stage_teacher == "previous" and len(config.segments) > 1:
            # registered (frozen, no optimizer): checkpoints carry it, so a resumed later stage keeps its trajectory
            self.stage_teacher = self.add_network("stage_teacher", freeze(copy.deepcopy(student.net)))
            self._stage_f = ConsistencyDenoiser(self.stage_teacher, float(self.grid[0])) \
                if config.consistency_param else self.stage_teacher
        if config.adv_weight > 0:
            self._build_head(teacher)
        self.sample_steps = student.steps  # plain CD with steps > 1 samples CM-style (fresh noise, trailing grid)
        self.stage = -1
        self._enter_stage(self._stage_at(0), 0, log=False)

    # ----------------------------------------------------------------------------------------------
    # Set-up
    def _validate(self, c: TSCDConfig) -> None:
        n = self.name
        if c.loss not in LOSSES:
            raise UserError(f"{n}.loss must be one of {', '.join(LOSSES)}, got {c.loss!r}")
        if c.solver not in ("ddim", "heun"):
            raise UserError(f"{n}.solver must be ddim or heun, got {c.solver!r}")
        if c.grid not in ("teacher", "karras", "geometric"):
            raise UserError(f"{n}.grid must be teacher, karras or geometric, got {c.grid!r}")
        if c.weighting not in ("uniform", "ict"):
            raise UserError(f"{n}.weighting must be uniform or ict, got {c.weighting!r}")
        if c.segment_balance > 0 and c.weighting != "ict":
            raise UserError(f"{n}.segment_balance={c.segment_balance} rescales iCT weights: set {n}.weighting "
                            f"to ict (it is {c.weighting!r}) or segment_balance to 0")
        if c.stage_teacher not in ("teacher", "previous"):
            raise UserError(f"{n}.stage_teacher must be teacher or previous, got {c.stage_teacher!r}")
        if not c.segments or any(k < 1 or c.solver_steps % k for k in c.segments):
            raise UserError(f"{n}.solver_steps={c.solver_steps} must be divisible by every entry of "
                            f"{n}.segments={c.segments} so segment edges land on the solver grid")
        if c.edges not in ("uniform", "geometric"):
            raise UserError(f"{n}.edges must be uniform or geometric, got {c.edges!r}")
        if c.edges == "geometric" and c.stage_teacher == "previous" and len(c.segments) > 1:
            raise UserError(f"{n}.edges=geometric moves each stage's solver levels, so the previous stage's "
                            f"edges are not levels of the next one: set {n}.stage_teacher to teacher")
        if c.stage_teacher == "previous" and any(a % b for a, b in zip(c.segments, c.segments[1:])):
            raise UserError(f"{n}.segments={c.segments}: with stage_teacher 'previous' each stage's segment "
                            "count must divide the previous one's (nested edges)")
        if c.stage_starts is not None:
            s = c.stage_starts
            if len(s) != len(c.segments) or s[0] != 0 or any(b < a for a, b in zip(s, s[1:])):
                raise UserError(f"{n}.stage_starts must list one non-decreasing step per stage, starting at 0; "
                                f"got {s} for segments {c.segments}")
        g = c.guidance_range
        if g is not None and (len(g) != 2 or g[0] > g[1]):
            raise UserError(f"{n}.guidance_range must be [lo, hi] with lo <= hi, got {g}")

    @staticmethod
    def _solver_grid(teacher: Denoiser, c: TSCDConfig, name: str = "tscd") -> Tensor:
        """``N + 1`` ascending levels: with ``grid: teacher`` and a discrete teacher, its timesteps
        ``0, T/N - 1, 2T/N - 1, ..., T - 1`` (trailing, PCM's DDIM solver); with ``grid: geometric`` the
        levels ``sigma_min (sigma_max / sigma_min)^(i/N)``; else a Karras grid on [sigma_min, sigma_max] (VP
        teachers evaluate the last two at fractional timesteps).

        Why geometric: equal segments of a trailing grid sit where the teacher's beta schedule puts them. On
        SD's scaled-linear schedule Hyper-SD's 2-segment edge (t = 499) is sigma 1.6 (~1.6 sigma_data); on a
        linear-beta pixel teacher (the digits teacher) t = 499 is sigma 3.4 (~7 sigma_data), so a 2-step
        student's first jump ends where the class is still being decided. Uniform in log-SNR puts the edges
        at the same log-SNR fractions for any schedule, and every stage's levels stay geometric from the
        top, which diffusers' ``EulerDiscreteScheduler(use_exponential_sigmas=True)`` reproduces."""
        n = c.solver_steps
        if c.grid == "teacher" and teacher.sigmas is not None:
            t = len(teacher.sigmas)
            idx = [0] + [int(math.floor(i * t / n + 0.5)) - 1 for i in range(1, n + 1)]
            if len(set(idx)) != n + 1:
                raise UserError(f"solver_steps={n} is too fine for the teacher's {t} timesteps")
            return teacher.sigmas[idx].float().cpu()
        lo = teacher.sigma_min if c.sigma_min is None else c.sigma_min
        hi = teacher.sigma_max if c.sigma_max is None else c.sigma_max
        if not lo < hi:
            raise UserError(f"{name}.sigma_min ({lo:g}) must be below {name}.sigma_max ({hi:g})")
        if c.grid == "geometric":
            discrete = teacher.sigmas is not None  # a continuous teacher evaluates any level
            if discrete and not (teacher.sigma_min * (1 - 1e-6) <= lo and hi <= teacher.sigma_max * (1 + 1e-6)):
                raise UserError(f"{name}.sigma_min / sigma_max ({lo:g}, {hi:g}) must lie within the teacher's levels "
                                f"[{teacher.sigma_min:g}, {teacher.sigma_max:g}]")
            return geometric_sigmas(n + 1, lo, hi).float()
        return ict_sigmas(n + 1, lo, hi, c.rho)

    @staticmethod
    def _stage_grid(grid: Tensor, k: int, edges: str) -> Tensor:
        """The ``N + 1`` ascending levels a ``k``-segment stage trains on; its edges are levels ``jN/k``.

        ``uniform``: the solver grid itself. ``geometric``: edge ``j`` is ``t_0 (t_N / t_0)^(j/k)``, and the
        ``N/k`` levels of a segment sit at equal steps of the grid's own (fractional) index between the
        edges' indices, the grid read log-linearly between its levels; on a teacher grid those are
        fractional teacher timesteps at the teacher's spacing. Why: with the teacher's trailing timesteps a
        linear-beta pixel teacher's 2-segment edge (t = 499) is sigma 3.4, about 7 sigma_data, where the
        class of the sample is still undecided; geometric edges put it at sqrt(t_0 t_N) (1.25 there) and are
        what diffusers' Euler scheduler with ``use_exponential_sigmas`` gives, while the levels inside each
        segment keep the grid's spacing (a wholly geometric grid crowds them at tiny sigma)."""
        n = len(grid) - 1
        if edges == "uniform" or k == 1:
            return grid
        g = grid.double()
        edges_at = geometric_sigmas(k + 1, float(g[0]), float(g[-1]))
        e = edges_at.log()
        log_g = g.log()
        # fractional grid index of each edge: invert the piecewise log-linear map index -> log level
        i = torch.searchsorted(log_g, e).clamp(1, n)
        u = (i - 1) + (e - log_g[i - 1]) / (log_g[i] - log_g[i - 1])
        u[0], u[-1] = 0.0, float(n)
        seg = n // k
        pos = torch.cat([u[j] + (u[j + 1] - u[j]) * torch.arange(seg, dtype=torch.float64) / seg
                         for j in range(k)] + [u[-1:]])
        f = pos.floor().long().clamp(max=n - 1)
        levels = (log_g[f] + (pos - f) * (log_g[f + 1] - log_g[f])).exp()
        levels[::seg] = edges_at  # the edges exactly (what the exported scheduler reproduces)
        levels[0], levels[-1] = g[0], g[-1]
        return levels.float()

    def _build_head(self, teacher: Denoiser) -> None:
        """The discriminator: DMD2's small GAN head on the frozen teacher's bottleneck features."""
        from .gan_head import GANHead, feature_shape

        try:
            shape = feature_shape(teacher)
        except ValueError as e:
            raise UserError(f"{self.name}.adv_weight > 0 needs teacher bottleneck features: {e}") from None
        self.add_network("discriminator", GANHead(shape), lr=self.config.adv_lr)

    # ----------------------------------------------------------------------------------------------
    # Stages
    def _stage_at(self, step: int) -> int:
        return max(j for j, s in enumerate(self.starts) if s <= step)

    def edges(self, segments: int) -> list[float]:
        """Sampling levels of a ``segments``-segment student: the top level, then the upper edges, descending."""
        n = self.config.solver_steps
        grid = self.stage_grids.get(segments, self.grid)
        return [float(grid[n - j * (n // segments)]) for j in range(segments)]

    def _enter_stage(self, stage: int, step: int, log: bool = True) -> dict[str, float]:
        previous, self.stage = self.stage, stage
        k = self.config.segments[stage]
        if self.stage_teacher is not None and stage > 0 and previous >= 0:
            # the frozen student at the end of the previous stage supplies the trajectory from now on
            self.stage_teacher.load_state_dict(self.student.net.state_dict())
        if len(self.config.segments) == 1 and k == 1 and self.sample_steps > 1:  # CD: CM multistep sampling
            n = self.config.solver_steps
            self.student.levels = [float(self.grid[n - i * n // self.sample_steps]) for i in range(self.sample_steps)]
            self.student.renoise = "fresh"
        else:
            self.student.levels = self.edges(k)
            self.student.renoise = "ddim"
        if log:
            source = "previous stage" if self.stage_teacher is not None and stage > 0 else "teacher"
            msg = f"[{self.name}] step {step}: stage {stage} with {k} segment(s), trajectory from the {source}"
            (self.accelerator.print if self.accelerator is not None else print)(msg)
        return {"stage": float(stage), "segments": float(k)}

    def on_step_end(self, step: int) -> dict[str, float]:
        """``step`` steps are done (the loop passes ``step + 1``): if step index ``step`` begins a new stage,
        switch now and return ``{stage, segments}`` (also printed); otherwise ``{}``."""
        nxt = self._stage_at(step)
        return self._enter_stage(nxt, step) if nxt != self.stage else {}

    def status(self) -> dict[str, float]:
        return {"stage": float(self.stage), "segments": float(self.config.segments[self.stage])}

    def on_train_start(self, run_dir: Path, step: int, is_main: bool) -> None:
        """Stage students written after ``step`` (a fresh run over an old folder, or a resume from a checkpoint
        older than them) are removed: the training from ``step`` writes them again."""
        if is_main and len(self.config.segments) > 1:
            from ..artefact import prune_stage_artefacts

            prune_stage_artefacts(run_dir, step)

    def artefacts_due(self, step: int) -> dict[str, dict[str, Any]]:
        """When ``step`` ends the current stage (the next one starts there, or the run ends), its student is
        kept as ``stages/steps-K`` (K = its segments): sampled along its own segment edges with DDIM
        re-noising, as trained. Progressive runs only (one stage: the checkpoints' student is that one)."""
        c = self.config
        if len(c.segments) < 2 or self.stage < 0 or (step < self.total_steps and self._stage_at(step) == self.stage):
            return {}
        from ..artefact import STAGES_DIR

        k = c.segments[self.stage]
        source = "previous stage" if self.stage_teacher is not None and self.stage > 0 else "teacher"
        return {f"{STAGES_DIR}/steps-{k}": {"stage": self.stage, "segments": k, "stage_start": self.starts[self.stage],
                                            "trajectory_from": source}}

    # ----------------------------------------------------------------------------------------------
    # The step
    def train_step(self, batch: Batch, step: int) -> StepOutput:
        c = self.config
        logs: dict[str, float] = {}
        if self._stage_at(step) != self.stage:  # e.g. a loop that does not call on_step_end
            logs.update(self._enter_stage(self._stage_at(step), step))
        if batch.images is None:
            raise UserError(f"{self.name} noises real data: use data with images (digits, folder, toy2d), "
                            "not prompts")
        x = batch.images.to(self.device).float()
        b, dev = x.shape[0], x.device
        grid = self.stage_grids[c.segments[self.stage]].to(dev)
        seg = c.solver_steps // c.segments[self.stage]
        n = batch.randint(c.solver_steps, (b,)).to(dev)
        edge = (n // seg) * seg  # the segment's lower edge index
        s_hi, s_edge = grid[n + 1], grid[edge]
        x_hi = x + append_dims(s_hi, x.ndim) * batch.randn(x.shape).to(dev)
        lo_w, hi_w = c.guidance_range or (c.guidance_scale, c.guidance_scale)
        w = (lo_w + (hi_w - lo_w) * batch.rand((b,))).to(dev)  # per-sample CFG scale of the teacher step
        seed = draw_seed(batch.generator)  # the same dropout mask for prediction and target

        with torch.no_grad():
            if self.stage_teacher is not None and self.stage > 0:
                # the previous stage's model jumps to its own (finer) segment edge: a point of its trajectory
                seg_prev = c.solver_steps // c.segments[self.stage - 1]
                lo = (n // seg_prev) * seg_prev
                x_lo = ddim_jump(x_hi, self._stage_f(x_hi, s_hi, batch.cond), s_hi, grid[lo])
            else:  # one teacher ODE step t_{n+1} -> t_n
                lo = n
                x_lo = solver_step(guided_denoiser(self.teacher, batch.cond, w), x_hi, s_hi, grid[lo], c.solver)
            s_lo = grid[lo]
            with fixed_rng(seed, dev):
                jumped = ddim_jump(x_lo, self.f(x_lo, s_lo, batch.cond), s_lo, s_edge)
            at_edge = append_dims(lo == edge, x.ndim)
            target = torch.where(at_edge, x_lo, jumped)  # at the edge the boundary condition gives x_hat itself
        with fixed_rng(seed, dev):
            out = self.wrapped["student"](x_hi, s_hi, batch.cond)
        x0 = self.f.apply(x_hi, s_hi, out) if isinstance(self.f, ConsistencyDenoiser) else out
        pred = ddim_jump(x_hi, x0, s_hi, s_edge)
        weight = 1.0 / (s_hi - s_lo) if c.weighting == "ict" else torch.ones_like(s_hi)
        if c.segment_balance > 0:  # only with ict (checked at construction)
            weight = weight * self._balance(seg, grid, c.segment_balance)[n]
        loss = (weight * consistency_distance(pred, target, c.loss, c.huber_c)).mean()
        logs["consistency"] = float(loss.detach())
        losses: dict[str, Tensor] = {}
        if c.adv_weight > 0:
            g_loss, losses["discriminator"] = self._adversarial(pred, target, edge, s_edge, batch, logs)
            loss = loss + c.adv_weight * g_loss
        losses["student"] = loss
        logs["loss"] = float(loss.detach())
        return StepOutput(losses, logs)

    @staticmethod
    def _balance(seg: int, grid: Tensor, b: float) -> Tensor:
        """``segment_balance``: a factor per solver level, ``(mean w / mean of w over the level's segment)^b``
        with ``w = 1 / (t_{n+1} - t_n)`` (iCT's weight on the grid). Under plain ict a segment high on the
        grid, where the steps are long, weighs far less than the lowest one (0.66 against 9.28 on average for
        the two halves of the digits teacher's 48-step grid), so a multi-segment student's top jump, where
        the sample's layout is decided, gets a small share of the gradient; ``b = 1`` gives every segment the
        grid's mean weight, ``b = 0`` leaves ict as it is. One segment: no change."""
        w = 1.0 / (grid[1:] - grid[:-1])
        seg_mean = w.view(-1, seg).mean(dim=1, keepdim=True)
        return ((w.mean() / seg_mean) ** b).expand(-1, seg).flatten()

    # ----------------------------------------------------------------------------------------------
    # Optional adversarial term
    def _features(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        """Frozen teacher bottleneck features of ``x`` at level ``s`` (graph kept towards ``x``)."""
        from .gan_head import bottleneck_features

        return bottleneck_features(self.teacher, x, s, cond)

    def _adversarial(self, pred: Tensor, target: Tensor, edge: Tensor, s_edge: Tensor, batch: Batch,
                     logs: dict[str, float]) -> tuple[Tensor, Tensor]:
        """Hinge losses on re-noised target (real) vs prediction (fake): ``(generator's, discriminator's)``.

        The discriminator's loss sees the prediction detached; the generator's goes through the raw head
        with its parameters frozen for that forward, so it leaves no gradient on the head."""
        seg = self.config.solver_steps // self.config.segments[self.stage]
        dev = pred.device
        # a level inside the segment (PCM: uniform timestep in [edge, edge + T/k)); travel there from the edge
        a = edge + batch.randint(seg, (pred.shape[0],)).to(dev)
        s_adv = self.stage_grids[self.config.segments[self.stage]].to(dev)[a]
        hop = append_dims((s_adv**2 - s_edge**2).clamp(min=0).sqrt(), pred.ndim)
        fake = pred + hop * batch.randn(pred.shape).to(dev)
        real = target + hop * batch.randn(pred.shape).to(dev)
        with torch.no_grad():
            f_real = self._features(real, s_adv, batch.cond)
            f_fake = self._features(fake.detach(), s_adv, batch.cond)
        head = self.wrapped["discriminator"]
        d_loss = torch.relu(1 - head(f_real)).mean() + torch.relu(1 + head(f_fake)).mean()
        raw = self.nets["discriminator"]
        raw.requires_grad_(False)  # the generator turn must not leave gradients on the head
        try:
            g_loss = -raw(self._features(fake, s_adv, batch.cond)).mean()
        finally:
            raw.requires_grad_(True)
        logs.update(d_loss=float(d_loss.detach()), g_loss=float(g_loss.detach()))
        return g_loss, d_loss

    # ----------------------------------------------------------------------------------------------
    def generator(self) -> Student:
        """The live student through ``f``, sampled along the current stage's edges with DDIM re-noising."""
        net = self.student.net
        net = ConsistencyDenoiser(net, float(self.grid[0])) if self.config.consistency_param else net
        return Student(net, self.student.levels, self.student.renoise)

    def extra_state(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the stage (its frozen trajectory model comes back with the checkpoint's networks)."""
        if "stage" in state:
            self.stage = -1
            self._enter_stage(int(state["stage"]), -1, log=False)


class CD(TSCD):
    """Consistency distillation: TSCD with one segment (the boundary ``t_0 = s_min``)."""

    name = "cd"
    Config = CDConfig


METHODS = {"cd": CD, "tscd": TSCD}
