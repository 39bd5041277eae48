"""DMD2 — Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024).

Networks: the frozen teacher (the "real" score, classifier-free guided), a trainable *fake score*
``D_fake`` (a copy of the unguided teacher) that tracks the generator's distribution, the generator ``G``
(the student) and a small GAN head on ``D_fake``'s bottleneck features (:mod:`.gan_head`).

Generator turn (every ``dfake_gen_update_ratio`` iterations; critic parameters frozen)::

    x = G(z, c);  s ~ U(grid[2% .. 98%]);  x_s = sg(x) + s n
    grad = nan_to_num((D_fake(x_s) - D_real_cfg(x_s)) / mean_CHW |x - D_real_cfg(x_s)|)
    L_G = 0.5 mean((x - sg(x - grad))^2) + w_gan_g softplus(-head(feat(x + s' n')))

so ``dL_dm/dx = grad / numel`` — the KL gradient ``s_fake - s_real`` of DMD (eq. 2), normalised per sample.
Critic turn (every iteration, on the same ``sg(x)``)::

    L_fake = mean(lambda(s) (D_fake(x + s n, s) - x)^2),  s ~ U(whole grid)
    L_D = softplus(head(feat(x + s' n))) + softplus(-head(feat(real + s'' n'')))
    L_critic = L_fake + w_gan_d L_D            # L_D trains the head and the fake-score backbone

Optimizer groups (:class:`~diffdistill.methods.base.StepOutput`): ``student`` (``L_G``, generator
iterations only) and ``fake_score`` (``L_critic``, every iteration), which trains both the fake score and
the GAN head: one backward, then each clips and steps with its own optimizer. Both turns of an iteration
are computed before anything steps, with ``G``'s output of that iteration; the critic sees ``sg(x)``, so
this is the official order (generator update, then critic update on the same samples).

K-step students (``student.levels``): *backward simulation* picks one level ``k`` per batch, runs the
current generator ``k`` steps without gradients, re-noises to ``levels[k]`` and trains ``G`` on its one
prediction there, so no gradient ever flows through the chain. Order of turns, random labels for the
generator and the per-iteration LR schedule (the Stepper steps every schedule every iteration) follow
the official code (tianweiy/DMD2).

Reuse (DisBack subclasses :class:`DMD2`): the losses are pure functions (:func:`distribution_matching_loss`,
:func:`fake_score_loss`, :func:`gan_generator_loss`, :func:`gan_critic_loss`), and the turns are public
methods (:meth:`DMD2.generator_input`, :meth:`DMD2.generator_loss`, :meth:`DMD2.critic_loss`,
:meth:`DMD2.draw_sigma`). The generator turn reads its real score from the attribute ``real_score`` at every
call, so a subclass changes the target by assigning it (DisBack walks it along a recorded path).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoiser import CFGDenoiser, Cond, Denoiser, append_dims, cond_cat
from ..errors import UserError
from ..schedules import karras_sigmas
from ..schema import Count, Fraction, NonNegFloat, PositiveFloat, PositiveInt, Probability
from ..students import Student
from .base import Batch, Method, OptimConfig, StepOutput
from .gan_head import GANHead, bottleneck_features, feature_shape


@dataclass
class DMD2Config:
    """The ``dmd2:`` config section. Defaults: the official ImageNet-64 run (``main/edm``)."""

    guidance_scale: NonNegFloat = 1.0  # CFG scale on the teacher ("real") score only: 1 ImageNet, 1.75 SD1.5, 8 SDXL
    dfake_gen_update_ratio: PositiveInt = 5  # critic steps per generator step (two time-scale rule); 10 for SD1.5
    dm_loss_weight: NonNegFloat = 1.0  # weight of the distribution-matching loss in the generator objective
    gan: bool = True  # GAN head and losses on (DMD2); false leaves DMD with the two time-scale rule
    gan_start_step: Count = 0  # iteration the GAN terms switch on (ImageNet FID 1.28: DMD-only stage, then GAN)
    # generator GAN weight: 3e-3 ImageNet, 1e-3 SD1.5, 5e-3 SDXL; 'auto' matches the GAN term's gradient norm
    # (w.r.t. the generated image) to the DM term's, averaged over the first gan_auto_turns generator turns
    gan_gen_weight: Union[Literal["auto"], NonNegFloat] = 3e-3
    gan_auto_scale: PositiveFloat = 1.0  # 'auto' only: factor on the matched weight (the rule: search around 1)
    gan_auto_turns: PositiveInt = 20  # 'auto' only: generator turns (with GAN on) the weight is calibrated over
    gan_critic_weight: NonNegFloat = 1e-2  # critic GAN weight; larger values made the fake score collapse
    # GAN noise: grid index ~ U[0, q T) (diffusion_gan_max_timestep / T = 1000/1000). Where high noise makes real and
    # generated images alike the head sits at chance (benchmarks/dmd2_gan_probe.py): digits use 0.1
    gan_max_quantile: Fraction = 1.0
    min_quantile: Probability = 0.02  # DM loss sigma: lowest quantile of the teacher grid (min_step_percent)
    max_quantile: Probability = 0.98  # DM loss sigma: highest quantile of the teacher grid (max_step_percent)
    # fake-score loss weight: 'edm' 1/s^2 + 1/sd^2 (EDM teachers), 'eps' 1/s^2 (SD)
    fake_weighting: Literal["edm", "eps"] = "edm"
    grid_levels: PositiveInt = 1000  # Karras grid (rho 7) levels when the teacher has no discrete grid (official EDM)
    # that grid's range and exponent (official EDM: 0.002, 80, 7); None: the teacher's sigma_min / sigma_max
    grid_sigma_min: Optional[PositiveFloat] = None
    grid_sigma_max: Optional[PositiveFloat] = None
    grid_rho: PositiveFloat = 7.0
    # p of the dropout layers of the generator and the fake score (official ImageNet: 0, though EDM's ADM
    # teacher trained with 0.1); None keeps the teacher's
    dropout: Optional[Probability] = None
    lr: Optional[PositiveFloat] = None  # generator lr (None: train.lr); 2e-6 ImageNet, 5e-7 SD1.5/SDXL with GAN
    lr_fake: Optional[PositiveFloat] = None  # fake score and GAN head lr (None: the generator's); official: equal
    backward_simulation: bool = True  # K-step: train level k on the generator's own samples (else real data)
    # K-step: relative share of generator turns trained at each level, one number per level (null: uniform, official)
    level_shares: Optional[list[NonNegFloat]] = None
    # class-conditional generator labels: 'random' (official) or 'batch'
    generator_labels: Literal["random", "batch"] = "random"


def distribution_matching_loss(x: Tensor, mu_real: Tensor, mu_fake: Tensor) -> tuple[Tensor, Tensor]:
    """DMD2's distribution-matching loss and its per-element gradient direction.

    ``grad = nan_to_num((mu_fake - mu_real) / mean_{C,H,W} |x - mu_real|)`` (per-sample normaliser,
    DMD eq. 8) and ``L = 0.5 * mean((x - sg(x - grad))^2)``, whose gradient w.r.t. ``x`` is
    ``grad / x.numel()``. ``mu_*`` are treated as constants. Returns ``(L, grad)``.
    """
    with torch.no_grad():
        p_real = x - mu_real
        p_fake = x - mu_fake
        norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        grad = torch.nan_to_num((p_real - p_fake) / norm)
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float()), grad


def fake_score_loss(x0_pred: Tensor, x: Tensor, sigma: Tensor, sigma_data: float, weighting: str = "edm") -> Tensor:
    """The fake score's denoising loss ``mean(lambda(s) (D_fake(x + s n, s) - x)^2)``.

    ``lambda(s) = 1/s^2 + 1/sigma_data^2`` (``"edm"``, EDM teachers) or ``1/s^2`` (``"eps"``: the eps-MSE
    ``|eps_hat - eps|^2 = (D - x)^2 / s^2`` of SD-style teachers). ``x`` is the clean target, ``sigma`` the
    per-sample level ``[B]``. Shared by DMD2's critic turn and DisBack's degradation recording.
    """
    weight = 1 / sigma**2 + (1 / sigma_data**2 if weighting == "edm" else 0.0)
    return (append_dims(weight, x.ndim) * (x0_pred.float() - x) ** 2).mean()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator GAN loss ``mean(softplus(-logit))`` on generated samples."""
    return F.softplus(-logits_fake).mean()


def gan_critic_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """Discriminator loss ``mean(softplus(logit_fake)) + mean(softplus(-logit_real))``."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


class DMD2(Method):
    """DMD2 distillation; see the module docstring for the losses.

    Args:
        teacher: the unguided teacher denoiser (guidance is applied here, on the real score only).
        student: the generator; one-step (``levels = [sigma_max]``) or K-step.
        config: :class:`DMD2Config`.
        optim: optimizer settings; ``config.lr`` / ``config.lr_fake`` override the learning rates.
        total_steps: the run's ``train.steps``.
        fake_score: the initial fake score; default a trainable float32 copy of ``teacher``. Needed when
            the teacher has no parameters (the exact mixture teacher of the tests).
        generator_classes: the class labels random generator labels are drawn from (uniformly); default
            every class of the teacher. Multi-student distillation (:mod:`.msd`) gives each student its group.

    Attributes:
        real_score: the denoiser the generator turn treats as the data score, read at every call; default
            the classifier-free guided teacher. Subclasses may reassign it (DisBack).
    """

    name = "dmd2"
    Config = DMD2Config
    supports_fp16 = False
    fp16_reason = "the paper found it diverges"

    def __init__(self, teacher: Denoiser, student: Student, config: DMD2Config,
                 optim: Optional[OptimConfig] = None, total_steps: int = 1000,
                 fake_score: Optional[Denoiser] = None, generator_classes: Optional[Sequence[int]] = None) -> None:
        _validate(config, self.name)
        shares = config.level_shares
        if shares is not None and (len(shares) != len(student.levels) or sum(shares) <= 0):
            raise UserError(f"{self.name}.level_shares needs one non-negative share per student level "
                            f"({len(student.levels)}, not all zero), got {list(shares)}")
        if getattr(teacher, "untrained", False):
            raise UserError(f"{self.name} distils a trained teacher; this teacher folder names an architecture only "
                            "(edm.json with \"weights\": null)")
        optim = optim or OptimConfig()
        if config.lr is not None:
            optim = dataclasses.replace(optim, lr=config.lr)
        super().__init__(teacher, student, config, optim, total_steps)
        if fake_score is None:
            if not any(True for _ in teacher.parameters()):
                raise ValueError(f"{type(teacher).__name__} has no parameters to copy into a fake score; "
                                 "pass fake_score=")
            fake_score = copy.deepcopy(teacher)
        fake_score = fake_score.to(torch.float32).train()  # trained in fp32 even beside a bf16 teacher
        for p in fake_score.parameters():
            p.requires_grad_(True)
        if config.dropout is not None:
            from .consistency import set_dropout

            for net in (student.net, fake_score):
                set_dropout(net, config.dropout)
        lr_fake = config.lr_fake if config.lr_fake is not None else self.optim.lr
        self.add_network("fake_score", fake_score, lr=lr_fake)
        if config.gan:
            head = GANHead(feature_shape(fake_score)).to(next(fake_score.parameters()).device)
            self.add_network("gan_head", head, lr=lr_fake, group="fake_score")  # trained by the critic loss
        self.real_score = CFGDenoiser(teacher, config.guidance_scale)
        self.generator_classes = None if generator_classes is None else torch.as_tensor(list(generator_classes)).long()
        grid = teacher.sigmas  # ascending; the teacher's own discrete levels (VP timesteps) when it has them
        if grid is None:  # EDM teachers: the official Karras grid (1000 levels over 0.002 .. 80, rho 7)
            lo = config.grid_sigma_min if config.grid_sigma_min is not None else teacher.sigma_min
            hi = config.grid_sigma_max if config.grid_sigma_max is not None else teacher.sigma_max
            grid = karras_sigmas(config.grid_levels, lo, hi, config.grid_rho).flip(0)
        self.grid = grid.detach().float().cpu()
        self._gan_auto: tuple[float, int] = (0.0, 0)  # gan_gen_weight 'auto': (sum of norm ratios, turns)

    # ----------------------------------------------------------------------------------------------
    # The step
    def train_step(self, batch: Batch, step: int) -> StepOutput:
        cfg = self.config
        gan_on = cfg.gan and step >= cfg.gan_start_step
        logs: dict[str, float] = {}
        losses: dict[str, Tensor] = {}
        x_in, s_in, cond, level = self.generator_input(batch)
        if len(self.student.levels) > 1:
            logs["sim_level"] = float(level)
        if step % cfg.dfake_gen_update_ratio == 0:  # generator turn first, as in the official trainer
            x = self.wrapped["student"](x_in, s_in, cond)
            # frozen while L_G's graph is recorded: the critic gets no gradient from it
            with self._frozen("fake_score", "gan_head"):
                losses["student"], parts = self.generator_loss(x, cond, batch, gan_on)
            logs.update(parts)
        else:
            with torch.no_grad():
                x = self.student.net(x_in, s_in, cond)
        losses["fake_score"], parts = self.critic_loss(x.detach(), cond, batch, gan_on)
        logs.update(parts)
        return StepOutput(losses, logs)

    def generator_loss(self, x: Tensor, cond: Cond, batch: Batch, gan_on: bool) -> tuple[Tensor, dict]:
        """``L_G`` on generated ``x`` (with grad); critic networks are evaluated raw and frozen."""
        cfg = self.config
        lo, hi = self._index_range(cfg.min_quantile, cfg.max_quantile)
        s = self.draw_sigma(batch, len(x), lo, hi)
        n = self._randn(batch, x.shape)
        with torch.no_grad():
            x_s = x.detach() + append_dims(s, x.ndim) * n
            mu_real = self.real_score(x_s, s, cond)
            mu_fake = self.nets["fake_score"](x_s, s, cond)
        loss_dm, grad = distribution_matching_loss(x, mu_real, mu_fake)
        loss = cfg.dm_loss_weight * loss_dm
        logs = {"loss_dm": float(loss_dm.detach()), "dm_grad_rms": float(grad.pow(2).mean().sqrt())}
        auto = cfg.gan_gen_weight == "auto"
        if gan_on and (auto or cfg.gan_gen_weight > 0):
            # 'auto': the GAN loss on a leaf copy of x gives dL_gan/dx alone; the generator then gets it through
            # a surrogate whose gradient w.r.t. x is exactly that (one backward through the critic, as fixed)
            x_in = x.detach().requires_grad_(True) if auto else x
            x_g, s_g = self._gan_noised(x_in, batch)
            logits = self.nets["gan_head"](bottleneck_features(self.nets["fake_score"], x_g, s_g, cond))
            loss_gan = gan_generator_loss(logits)
            if auto:
                (g_gan,) = torch.autograd.grad(loss_gan, x_in)
                g_dm_norm = cfg.dm_loss_weight * grad.float().norm() / grad.numel()  # dL_dm/dx = grad / numel
                weight = self.auto_gan_weight(g_dm_norm, g_gan.float().norm())
                loss = loss + weight * ((g_gan.detach() * (x - x.detach())).sum() + loss_gan.detach())
                logs["gan_gen_weight"] = weight
            else:
                loss = loss + cfg.gan_gen_weight * loss_gan
            logs["loss_gan_g"] = float(loss_gan.detach())
        return loss, logs

    def auto_gan_weight(self, dm_norm: Tensor, gan_norm: Tensor) -> float:
        """``dmd2.gan_gen_weight: auto``: the generator GAN weight that gives its gradient w.r.t. the generated
        image the DM term's norm, times ``gan_auto_scale`` (the maintainer's rule: match, then search around it).

        Calibrated, then frozen: the weight is the mean of ``||dL_dm/dx|| / ||dL_gan/dx||`` over the first
        ``gan_auto_turns`` generator turns with the GAN on (the running mean while calibrating), then held, so
        the run trains with a fixed weight as the official code does, and the GAN term's own growth over
        training (a rising generator GAN loss is normal) is not normalised away as a ratio tracked at every
        turn would; a frozen number also resumes exactly (:meth:`extra_state`). Norms are summed over
        processes first, so every process uses the same weight.
        """
        cfg = self.config
        total, count = self._gan_auto
        if count < cfg.gan_auto_turns:
            sq = torch.stack([dm_norm.detach().float() ** 2, gan_norm.detach().float() ** 2])
            acc = getattr(self, "accelerator", None)
            if acc is not None and acc.num_processes > 1:
                sq = acc.reduce(sq.to(acc.device), "sum")
            dm, gan = (float(v) for v in sq.sqrt())
            if gan > 0 and dm == dm and gan == gan:  # skip a turn with no (or non-finite) GAN gradient
                total, count = total + dm / gan, count + 1
                self._gan_auto = (total, count)
        return cfg.gan_auto_scale * total / count if count else 0.0

    def extra_state(self) -> dict[str, Any]:
        """The ``gan_gen_weight: auto`` calibration (sum of ratios, turns), so a resumed run keeps its weight."""
        return {"gan_auto": list(self._gan_auto)} if self.config.gan_gen_weight == "auto" else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "gan_auto" in state:
            total, count = state["gan_auto"]
            self._gan_auto = (float(total), int(count))

    def critic_loss(self, x: Tensor, cond: Cond, batch: Batch, gan_on: bool) -> tuple[Tensor, dict]:
        """``L_critic``: the fake-score denoising loss on ``sg(G(z))`` plus the GAN D-loss.

        The loss goes through the wrapped fake score (full forward); the GAN features of noised fake and
        real images through the raw one, stopped at the bottleneck (the official GAN branch's shortcut).
        """
        cfg = self.config
        b = len(x)
        s = self.draw_sigma(batch, b, 0, len(self.grid) - 1)  # the teacher's whole noise range
        x_s = x + append_dims(s, x.ndim) * self._randn(batch, x.shape)
        x0 = self.wrapped["fake_score"](x_s, s, cond)  # the DDP-wrapped forward: it arms the gradient all-reduce
        sd = self.teacher.sigma_data
        loss_fake = fake_score_loss(x0, x, s, sd, cfg.fake_weighting)  # eps-MSE = (D - x)^2 / s^2
        loss = loss_fake
        logs = {"loss_fake": float(loss_fake.detach())}
        if gan_on and cfg.gan_critic_weight > 0:
            if batch.images is None:
                raise UserError(f"{self.name}'s GAN loss needs real images: set data.name or {self.name}.gan=false")
            real = batch.images.to(self.device, torch.float32)
            (x_f, s_f), (x_r, s_r) = self._gan_noised(x, batch), self._gan_noised(real, batch)
            # fake and real in one batch, each with its own condition
            feats = bottleneck_features(self.nets["fake_score"], torch.cat([x_f, x_r]), torch.cat([s_f, s_r]),
                                        cond_cat([cond, self._real_cond(batch)]))
            logits = self.wrapped["gan_head"](feats)
            on_fake, on_real = logits[:b], logits[b:]
            if len(on_real):
                loss_d = gan_critic_loss(on_fake, on_real)
                logs["p_real"] = float(torch.sigmoid(on_real.detach()).mean())
            else:  # no real image in this batch (MSD filters real images to a student's group): fake term only
                loss_d = F.softplus(on_fake).mean()
            loss = loss + cfg.gan_critic_weight * loss_d
            logs.update(loss_gan_d=float(loss_d.detach()), p_fake=float(torch.sigmoid(on_fake.detach()).mean()))
        return loss, logs

    # ----------------------------------------------------------------------------------------------
    # Generator inputs and conditions
    def generator_input(self, batch: Batch) -> tuple[Tensor, float, Cond, int]:
        """``(x, sigma, cond, k)``: the generator's input at level ``k`` (0 for one-step students)."""
        levels = self.student.levels
        cond = self._generator_cond(batch)
        z = self._randn(batch, (batch.size, *self.teacher.sample_shape))
        if len(levels) == 1:
            return levels[0] * z, levels[0], cond, 0
        # one level for the whole batch; a draw not shaped by the batch is the same on every process
        # (Batch's contract), as the official code broadcasts it from process 0
        u = float(batch.rand(()))
        shares = self.config.level_shares
        if shares is None:
            k = min(int(u * len(levels)), len(levels) - 1)
        else:  # checked against the levels in __init__
            cum, k = 0.0, len(levels) - 1
            for i, w in enumerate(shares):
                cum += w / sum(shares)
                if u < cum:
                    k = i
                    break
        if k == 0:
            return levels[0] * z, levels[0], cond, 0
        if not self.config.backward_simulation:  # official "denoising" without simulation: real data
            if batch.images is None:
                raise UserError(f"{self.name}.backward_simulation=false trains on noised real images: "
                                "the data has none")
            real = batch.images.to(self.device, torch.float32)
            return real + levels[k] * z[: len(real)], levels[k], self._real_cond(batch), k
        x = levels[0] * z
        with torch.no_grad():
            for i in range(k):  # the current generator's own k-step sample, never in the graph
                x0 = self.student.net(x, levels[i], cond).float()
                if self.student.renoise == "fresh":
                    x = x0 + levels[i + 1] * self._randn(batch, x.shape)
                else:
                    x = x0 + levels[i + 1] * (x - x0) / levels[i]
        return x, levels[k], cond, k

    def _real_cond(self, batch: Batch) -> Cond:
        """The real images' own condition (labels dropped for an unconditional teacher)."""
        if isinstance(batch.cond, Tensor) and self.teacher.num_classes is None:
            return None
        return batch.cond

    def _generator_cond(self, batch: Batch) -> Cond:
        """Uniform random labels for class-conditional teachers (official ImageNet), else the batch's."""
        cond = self._real_cond(batch)
        n = self.teacher.num_classes
        if isinstance(cond, Tensor) and n is not None and self.config.generator_labels == "random":
            pool = self.generator_classes
            if pool is None:
                return (batch.rand((batch.size,)) * n).long().clamp(max=n - 1).to(cond.device)
            idx = (batch.rand((batch.size,)).cpu() * len(pool)).long().clamp(max=len(pool) - 1)
            return pool[idx].to(cond.device)
        return cond

    # ----------------------------------------------------------------------------------------------
    # Noise levels and helpers
    def _index_range(self, lo_q: float, hi_q: float) -> tuple[int, int]:
        t = len(self.grid)
        return int(lo_q * t), min(int(hi_q * t), t - 1)  # official: randint(min_step, max_step + 1)

    def draw_sigma(self, batch: Batch, n: int, lo: int, hi: int) -> Tensor:
        """``n`` sigmas at grid indices uniform in ``[lo, hi]``."""
        idx = (lo + batch.rand((n,)).cpu() * (hi - lo + 1)).long().clamp(lo, hi)
        return self.grid[idx].to(self.device)

    def _gan_noised(self, x: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(x + s' n, s')`` with grid index of ``s'`` uniform in ``[0, gan_max_quantile * T)``."""
        hi = max(int(self.config.gan_max_quantile * len(self.grid)) - 1, 0)
        s = self.draw_sigma(batch, len(x), 0, hi)
        return x + append_dims(s, x.ndim) * self._randn(batch, x.shape), s

    # the names these methods had before they became public, for callers written against them
    def _generator_loss(self, x: Tensor, cond: Cond, batch: Batch, gan_on: bool) -> tuple[Tensor, dict]:
        return self.generator_loss(x, cond, batch, gan_on)

    def _critic_loss(self, x: Tensor, cond: Cond, batch: Batch, gan_on: bool) -> tuple[Tensor, dict]:
        return self.critic_loss(x, cond, batch, gan_on)

    def _generator_input(self, batch: Batch) -> tuple[Tensor, float, Cond, int]:
        return self.generator_input(batch)

    def _draw_sigma(self, batch: Batch, n: int, lo: int, hi: int) -> Tensor:
        return self.draw_sigma(batch, n, lo, hi)

    def _randn(self, batch: Batch, shape) -> Tensor:
        return batch.randn(tuple(shape)).to(self.device)

    @contextlib.contextmanager
    def _frozen(self, *names: str):
        """Freeze the named networks' trainable parameters for the block (the generator turn)."""
        params = [p for n in names if n in self.nets for p in self.nets[n].parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def _validate(cfg: DMD2Config, section: str = "dmd2") -> None:
    """Reject impossible settings with one clear line (``section``: the config section, for the message)."""
    if cfg.dfake_gen_update_ratio < 1:
        raise UserError(f"{section}.dfake_gen_update_ratio must be >= 1, got {cfg.dfake_gen_update_ratio}")
    if cfg.fake_weighting not in ("edm", "eps"):
        raise UserError(f"{section}.fake_weighting must be 'edm' or 'eps', got {cfg.fake_weighting!r}")
    if cfg.generator_labels not in ("random", "batch"):
        raise UserError(f"{section}.generator_labels must be 'random' or 'batch', got {cfg.generator_labels!r}")
    if not 0 <= cfg.min_quantile <= cfg.max_quantile <= 1:
        raise UserError(f"{section} needs 0 <= min_quantile <= max_quantile <= 1, got "
                        f"{cfg.min_quantile} and {cfg.max_quantile}")
    if not 0 < cfg.gan_max_quantile <= 1:
        raise UserError(f"{section}.gan_max_quantile must be in (0, 1], got {cfg.gan_max_quantile}")


METHOD = DMD2
