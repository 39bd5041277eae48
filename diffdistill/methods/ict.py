"""iCT — Improved Consistency Training (Song & Dhariwal, ICLR 2024): a consistency model from data alone.

One step (paper Sec. 3-4; every detail below changes FID by integer amounts on CIFAR-10):

    N = N(k) = min(s0 2^floor(k/K'), s1) + 1                 # discretisation curriculum, doubling
    s_0 < ... < s_{N-1}: Karras grid (rho 7) on [s_min, s_max]
    i ~ p(i) ∝ erf((ln s_{i+1} - Pm)/(√2 Ps)) - erf((ln s_i - Pm)/(√2 Ps))   # lognormal levels
    n ~ N(0, I), the same in both passes
    L = 1/(s_{i+1} - s_i) * d(f(x + s_{i+1} n, s_{i+1}), sg f(x + s_i n, s_i))
    d(a, b) = sqrt(||a - b||^2 + c^2) - c,  c = 0.00054 sqrt(dim)        # pseudo-Huber, whole sample

The target is the *online* network under stop-gradient (no EMA teacher: EMA rate 0 is what makes CT
consistent), evaluated with the same dropout mask as the online pass (same RNG state). An EMA of the
student for evaluation is the training loop's ``train.ema_decay`` (0.99993 in the paper); this method
keeps no EMA of its own. A teacher, if given, only initialises the student's weights (``student.kind:
copy``); iCT never evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from ..denoiser import Denoiser
from ..errors import UserError
from ..schema import PositiveFloat, PositiveInt, Probability
from ..students import Student
from .base import Batch, Method, OptimConfig, StepOutput
from .consistency import (LOSSES, ConsistencyDenoiser, consistency_distance, draw_seed, fixed_rng, ict_num_levels,
                          ict_sigmas, lognormal_level_probs, set_dropout)


@dataclass
class ICTConfig:
    sigma_min: PositiveFloat = 0.002  # boundary level: f(x, s_min) = x
    sigma_max: PositiveFloat = 80.0  # largest level; one-step sampling is f(s_max z, s_max)
    rho: PositiveFloat = 7.0  # Karras grid exponent
    sigma_data: Optional[PositiveFloat] = None  # sd in c_skip / c_out (paper 0.5); None: the student's own sigma_data
    s0: PositiveInt = 10  # curriculum: initial number of discretisation intervals
    s1: PositiveInt = 1280  # curriculum: final number of discretisation intervals
    p_mean: float = -1.1  # lognormal level distribution: mean of ln sigma (Pm)
    p_std: PositiveFloat = 2.0  # lognormal level distribution: std of ln sigma (Ps)
    # huber (iCT, whole-sample pseudo-Huber) | huber_elementwise (PCM) | mse
    loss: Literal["huber", "huber_elementwise", "mse"] = "huber"
    huber_c: Optional[PositiveFloat] = None  # pseudo-Huber c; None: 0.00054 sqrt(dim) (0.03 on CIFAR-10)
    # p of every nn.Dropout in the student (0.3 CIFAR-10, 0.2 ImageNet); None: keep
    dropout: Optional[Probability] = None
    # radam (paper: RAdam, lr 1e-4, betas 0.9/0.999) | adamw (the framework default)
    optimizer: Literal["radam", "adamw"] = "radam"
    # multistep sampling levels after s_max (paper's CIFAR-10 two-step: 0.821)
    taus: list[PositiveFloat] = field(default_factory=lambda: [0.821])


class ICT(Method):
    """Improved consistency training. See the module docstring for the objective.

    The student's ``net`` stays the plain denoiser that ``student.kind`` built (so checkpoints load into
    the same network); the consistency function ``f`` wraps it (:class:`ConsistencyDenoiser`) for the
    loss and for :meth:`generator`. Sampling: ``levels = [s_max, *taus]`` with fresh noise between steps
    (``x = f(x0 + tau n, tau)``, iCT's multistep sampler up to ``sqrt(tau^2 - s_min^2) ~= tau``).
    """

    name = "ict"
    Config = ICTConfig
    needs_data = True

    def __init__(self, teacher: Optional[Denoiser], student: Student, config: ICTConfig,
                 optim: Optional[OptimConfig] = None, total_steps: int = 1000) -> None:
        if config.loss not in LOSSES:
            raise UserError(f"ict.loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
        if config.optimizer not in ("radam", "adamw"):
            raise UserError(f"ict.optimizer must be radam or adamw, got {config.optimizer!r}")
        if not (0 < config.sigma_min < config.sigma_max) or config.s0 < 1 or config.s1 < config.s0:
            raise UserError("ict: need 0 < sigma_min < sigma_max and 1 <= s0 <= s1")
        if config.dropout is not None and set_dropout(student.net, config.dropout) == 0 and config.dropout > 0:
            print(f"[ict] warning: ict.dropout={config.dropout} but the student has no dropout layer")
        super().__init__(teacher, student, config, optim, total_steps)
        self.f = ConsistencyDenoiser(student.net, config.sigma_min, config.sigma_data)
        if config.optimizer == "radam":  # iCT's optimizer: same lr / betas, decoupled weight decay
            self.add_network("student", student.net, optimizer="radam")
        student.levels = self._sampling_levels(student.steps, student.levels)
        student.renoise = "fresh"
        self._grid_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _sampling_levels(self, steps: int, levels: list[float]) -> list[float]:
        """Keep explicit levels starting at s_max; otherwise ``[s_max, *taus[:steps - 1]]``."""
        c = self.config
        if levels and abs(levels[0] - c.sigma_max) < 1e-6 * c.sigma_max:
            return list(levels)
        if steps - 1 > len(c.taus):
            raise UserError(f"student.steps={steps} needs {steps - 1} levels in ict.taus (has {len(c.taus)}), "
                            f"or set student.levels explicitly starting at {c.sigma_max}")
        return [c.sigma_max, *c.taus[: steps - 1]]

    def _grid(self, num_levels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ascending sigmas [N], cumulative level probabilities [N-1]) for the current N, cached."""
        if num_levels not in self._grid_cache:
            c = self.config
            sigmas = ict_sigmas(num_levels, c.sigma_min, c.sigma_max, c.rho)
            cdf = lognormal_level_probs(sigmas, c.p_mean, c.p_std).cumsum(0)
            self._grid_cache[num_levels] = (sigmas, (cdf / cdf[-1]).float())
        sigmas, cdf = self._grid_cache[num_levels]
        return sigmas.to(device), cdf.to(device)

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        c = self.config
        if batch.images is None:
            raise UserError("ict trains from data: use data with images (digits, folder, toy2d), not prompts")
        x = batch.images.to(self.device).float()
        num_levels = ict_num_levels(step, self.total_steps, c.s0, c.s1)
        sigmas, cdf = self._grid(num_levels, x.device)
        # level index i ~ p(i): invert the CDF at a uniform draw (global-batch draws, see Batch)
        u = batch.rand((x.shape[0],)).to(x.device)
        i = torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1)
        s_lo, s_hi = sigmas[i], sigmas[i + 1]
        n = batch.randn(x.shape).to(x.device)  # the same n in both passes
        seed = draw_seed(batch.generator)  # the same dropout mask in both passes

        view = [-1] + [1] * (x.ndim - 1)
        with torch.no_grad(), fixed_rng(seed, x.device):
            # target: the online network itself under stop-gradient (EMA rate 0), train mode
            target = self.f(x + s_lo.view(view) * n, s_lo, batch.cond)
        with fixed_rng(seed, x.device):
            x_hi = x + s_hi.view(view) * n
            pred = self.f.apply(x_hi, s_hi, self.wrapped["student"](x_hi, s_hi, batch.cond))
        weight = 1.0 / (s_hi - s_lo)  # lambda_i
        loss = (weight * consistency_distance(pred, target, c.loss, c.huber_c)).mean()
        return StepOutput({"student": loss}, {"loss": float(loss.detach()), "num_levels": float(num_levels)})

    def generator(self) -> Student:
        """The live student sampled through the consistency function ``f`` at ``[s_max, *taus]``."""
        return Student(ConsistencyDenoiser(self.student.net, self.config.sigma_min, self.config.sigma_data),
                       self.student.levels, "fresh")


METHOD = ICT
