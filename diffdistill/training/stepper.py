"""The one implementation of backward, clipping, optimizer / LR-schedule steps and EMA, for every method.

A method's ``train_step`` only computes losses (:class:`~diffdistill.methods.base.StepOutput`); the
:class:`Stepper` turns them into updates. The training loop uses it with an ``accelerate`` Accelerator;
tests, benchmarks and notebooks use it in plain Python::

    stepper = Stepper(method)
    for step in range(n):
        logs = stepper.step(batch_of(step), step)
    with stepper.ema_weights():
        samples = method.generator()(z)

One iteration (:meth:`Stepper.step`):

1. for each micro-batch: ``out = method.train_step(batch, step)`` under autocast, then, outside autocast,
   one backward of ``sum(out.losses.values()) / num_micro_batches``. Gradients accumulate, so ``k``
   micro-batches of ``B / k`` give the gradient of one batch of ``B`` (losses are batch means); under DDP
   they are all-reduced once, in the last micro-batch's backward. Logs are averaged over micro-batches
   (exact for losses; a non-linear diagnostic such as an RMS becomes the mean of per-micro-batch values).
2. for every group that appeared in some micro-batch, for every network of the group that received a
   gradient: clip its gradient norm to ``optim.grad_clip``, step its optimizer, zero its gradients.
   Under fp16 every optimizer is unscaled once and the loss scale is updated once per iteration; a
   network whose gradients overflowed skips its step (counted in ``fp16_skipped_steps``).
3. step EVERY LR scheduler once, whether its group stepped or not: schedules count iterations, not
   updates, as DMD2's official trainer does (its generator steps every 5th iteration yet its warm-up and
   decay follow the iteration count).
4. if a network of ``method.ema_networks`` stepped and EMA is on, update the EMA of their trainable parameters.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import UserError
from ..methods.base import Batch, Method
from ..students import trainable_parameters


class Stepper:
    """Optimizers, LR schedules and EMA of a :class:`~diffdistill.methods.base.Method`, and its updates.

    Args:
        method: the method; every trainable network it registered (:meth:`Method.add_network`) gets an
            AdamW (or RAdam with decoupled weight decay) with the method's :class:`OptimConfig` (per-network
            lr / betas override it) and a diffusers LR schedule over ``method.total_steps``.
        accelerator: an ``accelerate.Accelerator`` (DDP, autocast, fp16 scaler), or ``None`` (plain Python).
            Trainable networks, their optimizers and schedules go through ``accelerator.prepare``; the
            wrapped modules land in ``method.wrapped``; frozen networks, the teacher and the EMA move to
            its device.
        grad_accum: micro-batches per step; :meth:`step` checks that it gets that many.
    """

    def __init__(self, method: Method, accelerator: Any = None, grad_accum: int = 1) -> None:
        if getattr(accelerator, "mixed_precision", "no") == "fp16" and not method.supports_fp16:
            why = f" ({method.fp16_reason})" if method.fp16_reason else ""
            raise UserError(f"{method.name} does not support train.mixed_precision=fp16{why}: use bf16")
        if grad_accum < 1:
            raise UserError(f"train.grad_accum must be >= 1, got {grad_accum}")
        from diffusers.optimization import get_scheduler

        self.method, self.accelerator, self.grad_accum = method, accelerator, grad_accum
        o = method.optim
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        for name, spec in method.optim_specs.items():
            params = trainable_parameters(method.nets[name])
            lr = spec.lr if spec.lr is not None else o.lr
            betas = tuple(spec.betas or o.betas)
            if spec.optimizer == "radam":
                opt = torch.optim.RAdam(params, lr=lr, betas=betas, weight_decay=o.weight_decay,
                                        decoupled_weight_decay=True)
            else:
                opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=o.weight_decay)
            self.optimizers[name] = opt
            self.schedulers[name] = get_scheduler(o.lr_schedule, opt, num_warmup_steps=o.warmup_steps,
                                                  num_training_steps=method.total_steps)
        self.ema = None
        if o.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            # ema_power > 0: diffusers' power-function warm-up, 1 - (1 + n / inv_gamma)^-power with inv_gamma 1
            warm = {"use_ema_warmup": True, "power": o.ema_power, "inv_gamma": 1.0} if o.ema_power > 0 else {}
            self.ema = EMAModel(self._ema_params(), decay=o.ema_decay, **warm)
        # fp16: the scaler of accelerate, driven here (see _update) so several optimizers share one scale
        self.scaler = getattr(accelerator, "scaler", None)
        if accelerator is not None:
            self._prepare(accelerator)

    def _prepare(self, accelerator) -> None:
        m = self.method
        m.accelerator = accelerator
        for name in self.optimizers:
            m.wrapped[name], self.optimizers[name], self.schedulers[name] = accelerator.prepare(
                m.nets[name], self.optimizers[name], self.schedulers[name])
        for name, net in m.nets.items():
            if name not in self.optimizers:
                net.to(accelerator.device)
        if m.teacher is not None:
            m.teacher.to(accelerator.device)
        if self.ema is not None:
            self.ema.to(accelerator.device)

    # ----------------------------------------------------------------------------------------------
    # One iteration
    def step(self, batches: Batch | Sequence[Batch], step: int) -> dict[str, float]:
        """Train one iteration on ``batches`` (one :class:`Batch` or its gradient-accumulation
        micro-batches); returns the method's logs averaged over micro-batches, plus ``grad_norm_<net>``."""
        batches = [batches] if isinstance(batches, Batch) else list(batches)
        if len(batches) != self.grad_accum:
            raise ValueError(f"step got {len(batches)} micro-batch(es); this Stepper has grad_accum={self.grad_accum}")
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        stepped_groups: list[str] = []
        for i, batch in enumerate(batches):
            with self._no_sync(last=i == len(batches) - 1):
                with self._autocast():
                    out = self.method.train_step(batch, step)
                unknown = [g for g in out.losses if g not in self.method.groups]
                if unknown:
                    raise KeyError(f"{self.method.name}.train_step returned losses for unknown optimizer group(s) "
                                   f"{unknown}; groups: {sorted(self.method.groups)}")
                if out.losses:
                    # one backward of the sum: each loss reaches only its own group's networks, and a graph
                    # shared between losses is traversed once (separate backwards would need retain_graph)
                    total = sum(out.losses.values())
                    self._backward(total / len(batches) if len(batches) > 1 else total)
            stepped_groups += [g for g in out.losses if g not in stepped_groups]
            for k, v in out.logs.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    sums[k] = sums.get(k, 0.0) + float(v)
                    counts[k] = counts.get(k, 0) + 1
        logs = {k: sums[k] / counts[k] for k in sums}
        attempted, stepped = False, []
        for group, members in self.method.groups.items():
            if group not in stepped_groups:
                continue
            for name in members:
                norm = self._update(name)
                if norm is None:
                    continue
                attempted = True
                if self.scaler is not None and not math.isfinite(norm):
                    # fp16 overflow: the scaler skipped this step and will lower the scale; routine while the
                    # scale calibrates, so it is counted, not logged as a (non-finite, "diverged") grad norm
                    logs["fp16_skipped_steps"] = logs.get("fp16_skipped_steps", 0.0) + 1.0
                    continue
                logs[f"grad_norm_{name}"] = norm
                stepped.append(name)
        if self.scaler is not None and attempted:
            self.scaler.update()  # once per iteration, after every optimizer stepped with the same scale
        with warnings.catch_warnings():
            # deliberate: a schedule advances even before its optimizer first steps (a GAN head that only
            # starts at dmd2.gan_start_step then starts at that iteration's lr); torch warns about this order
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            for sched in self.schedulers.values():
                sched.step()
        if self.ema is not None and any(name in stepped for name in self.method.ema_networks):
            self.ema.step(self._ema_params())
        return logs

    def _autocast(self):
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Every micro-batch but the last: no DDP gradient all-reduce (forward and backward must both run
        inside), so gradients accumulate locally and the last backward reduces their sum once."""
        stack = contextlib.ExitStack()
        if not last and self.accelerator is not None:
            for name in self.optimizers:
                stack.enter_context(self.accelerator.no_sync(self.method.wrapped[name]))
        return stack

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _update(self, name: str) -> float | None:
        """Clip network ``name``'s gradient, step and zero its optimizer; its pre-clip gradient norm, or
        ``None`` (nothing done) when no parameter received a gradient (e.g. DMD2's GAN head before
        ``gan_start_step``)."""
        opt = self.optimizers[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        if all(p.grad is None for p in params):
            return None
        clip = self.method.optim.grad_clip if self.method.optim.grad_clip > 0 else math.inf  # inf: norm only
        if self.scaler is not None:
            # torch's multi-optimizer AMP recipe: unscale this optimizer once, clip, scaler.step; one
            # scaler.update() after all of them (accelerate's optimizer wrapper would update after each
            # step and unscale every optimizer on every clip, which breaks with several optimizers)
            raw = getattr(opt, "optimizer", opt)
            self.scaler.unscale_(raw)
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(raw)
        else:
            acc = self.accelerator
            norm = (acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_)(params, clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else float("nan")

    # ----------------------------------------------------------------------------------------------
    # EMA
    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the student's trainable parameters hold the EMA weights (no-op without EMA).

        The live weights are copied aside and put back exactly afterwards, so sampling or saving inside
        the block never changes training. Nesting is safe.
        """
        if self.ema is None:
            yield
            return
        params = self._ema_params()
        live = [p.detach().cpu().clone() for p in params]  # on the CPU, as diffusers' EMAModel.store
        self.ema.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(params, live):
                    p.copy_(saved)

    def _ema_params(self) -> list[torch.nn.Parameter]:
        """The trainable parameters of ``method.ema_networks``, in order (one EMA over all of them)."""
        return [p for name in self.method.ema_networks for p in trainable_parameters(self.method.nets[name])]

    def _ema_names(self) -> list[str]:
        """Checkpoint keys of the EMA shadows: the parameter names for one network (the student, as every
        run so far saved them), ``<network>.<parameter>`` for several (MSD's members)."""
        nets = self.method.ema_networks
        return [n if len(nets) == 1 else f"{name}.{n}" for name in nets
                for n, p in self.method.nets[name].named_parameters() if p.requires_grad]

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """EMA shadow weights keyed by parameter name (``None`` without EMA), for checkpoints."""
        if self.ema is None:
            return None
        return dict(zip(self._ema_names(), self.ema.shadow_params))

    def ema_meta(self) -> dict[str, Any] | None:
        """``{optimization_step, decay}`` of the EMA for ``meta.json`` (``None`` without EMA)."""
        if self.ema is None:
            return None
        return {"optimization_step": self.ema.optimization_step, "decay": self.ema.decay}

    def load_ema_state(self, state: dict[str, torch.Tensor], optimization_step: int) -> None:
        device = self._ema_params()[0].device
        self.ema.shadow_params = [state[n].to(device) for n in self._ema_names()]
        self.ema.optimization_step = int(optimization_step)

    # ----------------------------------------------------------------------------------------------
    # Checkpoint state (the layout of optimizers.pt)
    @property
    def lr(self) -> float:
        """The current learning rate of the first optimizer (0 when nothing trains)."""
        return next(iter(self.optimizers.values())).param_groups[0]["lr"] if self.optimizers else 0.0

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                 "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()}}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if "scaler" in state and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
