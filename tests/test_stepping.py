"""The Stepper owns every update: gradient accumulation equals one big batch, DMD2's two time scales,
log windows that keep every loss, and a method defined outside the package that trains with no loop change."""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.config import config_from_dict, load_config
from diffdistill.methods import METHOD_MODULES, Batch, Method, OptimConfig, StepOutput
from diffdistill.methods.consistency_distillation import TSCD, TSCDConfig
from diffdistill.methods.dmd2 import DMD2, DMD2Config
from diffdistill.students import Student
from diffdistill.toy import MixtureDenoiser, default_mixture, mlp_denoiser
from diffdistill.training.batches import BatchSource
from diffdistill.training.loop import final_losses, train
from diffdistill.training.stepper import Stepper
from tests.conftest import tiny_teacher_config

REPO = Path(__file__).resolve().parents[1]


def _weights(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# An attention layer's key bias adds q.b to every logit of a query: softmax ignores it, so its exact
# gradient is 0 and its computed one is rounding noise (~1e-10) that differs between batch splits. Adam
# divides by sqrt(v) + 1e-8 and turns that noise into steps of up to ~lr/30 in a direction that changes
# nothing, so these weights are compared at the lr's scale and every other weight at 1e-5.
NULL_SPACE = "to_k.bias"


def _assert_same_weights(a: dict, b: dict, lr: float, name: str) -> None:
    main = {k: v for k, v in a.items() if not k.endswith(NULL_SPACE)}
    assert _max_diff(main, {k: b[k] for k in main}) <= 1e-5, name
    null = {k: v for k, v in a.items() if k.endswith(NULL_SPACE)}
    if null:
        assert _max_diff(null, {k: b[k] for k in null}) <= lr, name


# ------------------------------------------------------------------------------------------------
# Gradient accumulation
def test_micro_batches_partition_the_batch_and_its_noise():
    class Data:
        images = torch.arange(100, dtype=torch.float32).view(100, 1)
        labels = torch.arange(100) % 10

        def __len__(self):
            return 100

    cpu = torch.device("cpu")
    whole = BatchSource(Data(), None, 10, 8, 0, 1, seed=3, device=cpu)(5)
    sources = [BatchSource(Data(), None, 10, 8, r, 2, seed=3, device=cpu) for r in range(2)]
    parts = [m for source in sources for m in source.micro_batches(5, 2)]  # 2 processes x 2 micro-batches
    assert [(m.offset, m.size, m.global_size) for m in parts] == [(0, 2, 8), (2, 2, 8), (4, 2, 8), (6, 2, 8)]
    assert torch.equal(torch.cat([m.images for m in parts]), whole.images)
    assert torch.equal(torch.cat([m.cond for m in parts]), whole.cond)
    assert torch.equal(torch.cat([m.randn((2, 3)) for m in parts]), whole.randn((8, 3)))
    assert len({m.randint(7, (1,)).item() for m in parts}) == 1  # draws not shaped by the batch: shared
    from diffdistill.errors import UserError

    with pytest.raises(UserError, match="train.grad_accum=3 must divide the per-process batch 4"):
        BatchSource(Data(), None, 10, 8, 0, 2, seed=3, device=cpu).micro_batches(5, 3)


def _dmd2_cfg(teacher, out, *more):
    return load_config(REPO / "configs/digits/dmd2.yaml", overrides=[
        f"teacher.path={teacher}", f"output_dir={out}", "data.resolution=8", "train.steps=10",
        "train.batch_size=16", "train.checkpoint_every=10", "train.sample_every=0", "train.log_every=5",
        "train.warmup_steps=0", "train.lr=2e-5", "dmd2.dfake_gen_update_ratio=2", *more])


def test_grad_accum_2_equals_one_batch_for_teacher_training(tmp_path):
    runs = {k: train(config_from_dict(tiny_teacher_config(tmp_path / f"accum{k}", steps=10, checkpoint_every=10,
                                                          grad_accum=k))) for k in (1, 2)}
    for name in ("student", "student_ema"):
        _assert_same_weights(_weights(runs[1], 10, name), _weights(runs[2], 10, name), 1e-3, name)
    one, two = final_losses(runs[1]), final_losses(runs[2])
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)


def test_grad_accum_2_equals_one_batch_for_dmd2(tiny_teacher_run, tmp_path):
    """At lr 2e-5 the two runs agree to ~1e-7 while another data / noise stream (seed 1) moves the
    teacher-initialised student and fake score by ~2e-4, so the 1e-5 tolerance is a real test. (At lr 1e-4
    Adam's sign-like first steps amplify rounding differences to ~1e-5 in ten iterations.)"""
    runs = {k: train(_dmd2_cfg(tiny_teacher_run, tmp_path / f"accum{k}", f"train.grad_accum={k}")) for k in (1, 2)}
    for name in ("student", "fake_score", "gan_head"):
        _assert_same_weights(_weights(runs[1], 10, name), _weights(runs[2], 10, name), 2e-5, name)
    other = train(_dmd2_cfg(tiny_teacher_run, tmp_path / "seed1", "train.seed=1"))
    for name in ("student", "fake_score"):
        assert _max_diff(_weights(runs[1], 10, name), _weights(other, 10, name)) > 1e-4, name


# ------------------------------------------------------------------------------------------------
# DMD2 through the Stepper
def _toy_dmd2(**cfg) -> DMD2:
    teacher = MixtureDenoiser(default_mixture())
    torch.manual_seed(0)
    student = Student(mlp_denoiser(2, sigma_data=teacher.sigma_data, hidden=16), [80.0])
    fake = mlp_denoiser(2, sigma_data=teacher.sigma_data, hidden=16)
    return DMD2(teacher, student, DMD2Config(**cfg), OptimConfig(lr=1e-3, lr_schedule="linear"), total_steps=100,
                fake_score=fake)


def test_dmd2_generator_steps_on_generator_iterations_critic_every_iteration():
    m = _toy_dmd2(dfake_gen_update_ratio=5)
    assert m.groups == {"student": ["student"], "fake_score": ["fake_score", "gan_head"]}
    stepper = Stepper(m)
    counts: Counter = Counter()
    for name, opt in stepper.optimizers.items():
        opt.register_step_post_hook(lambda *_, name=name: counts.update([name]))
    for step in range(10):
        g = torch.Generator().manual_seed(step)
        before = [p.detach().clone() for p in m.student.net.parameters()]
        logs = stepper.step(Batch(default_mixture().sample(32, g), None, g, 32), step)
        moved = any(not torch.equal(a, b) for a, b in zip(before, m.student.net.parameters()))
        assert moved == (step % 5 == 0) == ("loss_dm" in logs) == ("grad_norm_student" in logs)
        assert {"loss_fake", "loss_gan_d", "grad_norm_fake_score", "grad_norm_gan_head"} <= logs.keys()
    assert counts == Counter({"student": 2, "fake_score": 10, "gan_head": 10})
    # every schedule counts iterations (the official trainer), the generator's too: 10 of the 100 steps of
    # the linear decay, not the 2 it was updated in
    assert all(s.get_last_lr()[0] == pytest.approx(0.9e-3) for s in stepper.schedulers.values())


@pytest.mark.parametrize("power", [1.0, 0.75])
def test_power_ema_follows_its_decay_law(power):
    """train.ema_power: after n EMA updates the decay is min(ema_decay, 1 - n^-p) (diffusers' warm-up, the
    first update copying the weights); p = 1 is then the uniform average of every iterate the EMA has seen."""
    m = _toy_dmd2(dfake_gen_update_ratio=1)
    m.optim.ema_power, m.optim.ema_decay = power, 0.9999
    stepper = Stepper(m)
    iterates, expect = [], None
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        stepper.step(Batch(default_mixture().sample(32, g), None, g, 32), step)
        live = [p.detach().clone() for p in m.student.net.parameters()]
        iterates.append(live)
        n = len(iterates)
        d = 0.0 if n == 1 else min(0.9999, 1 - n ** -power)
        expect = live if expect is None else [d * e + (1 - d) * x for e, x in zip(expect, live)]
    assert _max_diff(dict(enumerate(stepper.ema.shadow_params)), dict(enumerate(expect))) < 1e-6
    if power == 1.0:
        mean = [torch.stack(ps).mean(0) for ps in zip(*iterates)]
        assert _max_diff(dict(enumerate(stepper.ema.shadow_params)), dict(enumerate(mean))) < 1e-6
    # the default warm-up, (1 + n) / (10 + n), gives another average: the key changes what is sampled
    m.optim.ema_power = 0.0
    assert Stepper(m).ema.get_decay(3) != stepper.ema.get_decay(3)


def test_shipped_dmd2_config_logs_generator_losses_in_every_row(tmp_path):
    """log_every (10) is a multiple of dfake_gen_update_ratio (5): the last iteration of every window is
    critic-only, yet each row holds the window's mean of the generator losses too."""
    from diffdistill.cli import main

    run = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs/digits/dmd2.yaml"), "--output", str(run),
                 "--set", "train.steps=20", "--set", "train.log_every=10", "--set", "train.batch_size=8",
                 "--set", "train.sample_every=0", "--set", "train.checkpoint_every=20"]) == 0
    rows = final_losses(run)
    assert [r["step"] for r in rows] == [10, 20]
    for r in rows:
        assert {"loss_dm", "loss_fake", "loss_gan_g", "loss_gan_d", "lr", "seconds"} <= r.keys()
        assert all(isinstance(v, float) and math.isfinite(v) for k, v in r.items() if k != "step")


# ------------------------------------------------------------------------------------------------
# fp16: one loss scale shared by several optimizers
class _ScaledCPU:
    """The parts of an fp16 ``Accelerator`` the Stepper uses, with torch's GradScaler on the CPU."""

    mixed_precision = "fp16"
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)

    def prepare(self, *objects):
        return objects

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        self.scaler.scale(loss).backward()

    def print(self, *args) -> None:
        print(*args)


def _tscd_with_discriminator() -> TSCD:
    torch.manual_seed(0)
    teacher = mlp_denoiser(2, sigma_data=1.5)
    cfg = TSCDConfig(segments=[2], solver_steps=8, adv_weight=0.1, adv_lr=1e-3)
    return TSCD(teacher, Student(mlp_denoiser(2, sigma_data=1.5), [80.0]), cfg, OptimConfig(lr=1e-3), total_steps=5)


def test_fp16_scaler_unscales_each_optimizer_once_and_updates_once_per_iteration(monkeypatch):
    """Two groups (student, discriminator) step from one scaled backward. With a power-of-two scale the
    unscaled gradients are exact, so the run equals the unscaled one bit for bit; an overflow in one group
    skips that group's step only and halves the scale once."""
    def batch(k):
        g = torch.Generator().manual_seed(k)
        return Batch(default_mixture().sample(32, g), None, g, 32)

    plain, scaled = _tscd_with_discriminator(), _tscd_with_discriminator()
    sp, ss = Stepper(plain), Stepper(scaled, _ScaledCPU())
    for k in range(3):
        assert set(sp.step(batch(k), k)) == set(ss.step(batch(k), k))
    for name in ("student", "discriminator"):
        assert _max_diff(plain.nets[name].state_dict(), scaled.nets[name].state_dict()) == 0.0, name
    assert ss.scaler.get_scale() == 2.0**10
    real = TSCD.train_step

    def overflow(self, b, step):  # the student's loss overflows, the discriminator's does not
        out = real(self, b, step)
        out.losses["student"] = out.losses["student"] * float("inf")
        return out

    monkeypatch.setattr(TSCD, "train_step", overflow)
    before = {n: {k: v.clone() for k, v in scaled.nets[n].state_dict().items()} for n in ("student", "discriminator")}
    logs = ss.step(batch(3), 3)
    assert logs["fp16_skipped_steps"] == 1.0 and "grad_norm_student" not in logs  # not a divergence
    assert _max_diff(before["student"], scaled.nets["student"].state_dict()) == 0.0
    assert _max_diff(before["discriminator"], scaled.nets["discriminator"].state_dict()) > 0.0
    assert ss.scaler.get_scale() == 2.0**9


# ------------------------------------------------------------------------------------------------
# A method the package has never heard of
@dataclass
class WiggleConfig:
    noise: float = 1.0  # the one noise level it learns to denoise at


class Wiggle(Method):
    """The smallest method: one network, one loss, no optimizer code."""

    name = "wiggle"
    Config = WiggleConfig

    @classmethod
    def from_config(cls, cfg, optim, device):
        torch.manual_seed(cfg.train.seed)
        return cls(None, Student(mlp_denoiser(2, hidden=16).to(device), [80.0]), cfg.method_config, optim,
                   cfg.train.steps), None

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        x = batch.images
        s = self.config.noise
        loss = ((self.wrapped["student"](x + s * batch.randn(x.shape), s) - x) ** 2).mean()
        return StepOutput({"student": loss}, {"loss": float(loss.detach())})


METHODS = {"wiggle": Wiggle}  # what diffdistill.methods.get_method reads from a registered module


def test_a_new_method_trains_through_the_loop_with_no_loop_change(tmp_path, monkeypatch):
    monkeypatch.setitem(METHOD_MODULES, "wiggle", __name__)
    cfg = config_from_dict({"method": "wiggle", "output_dir": str(tmp_path / "run"), "data": {"name": "toy2d"},
                            "wiggle": {"noise": 0.5},
                            "train": {"steps": 6, "batch_size": 8, "grad_accum": 2, "checkpoint_every": 3,
                                      "sample_every": 0, "log_every": 3, "ema_decay": 0.5, "lr": 1e-2}})
    run = train(cfg)
    rows = final_losses(run)
    assert [r["step"] for r in rows] == [3, 6] and all("grad_norm_student" in r for r in rows)
    ckpt = run / "checkpoints" / "step-0000006"
    assert json.loads((ckpt / "meta.json").read_text())["ema"]["optimization_step"] == 6
    assert (ckpt / "student_ema.safetensors").is_file() and (ckpt / "student" / "student.json").is_file()
    # the artefact holds the EMA weights, the checkpoint's network the live ones
    art = load_file(str(ckpt / "student" / "student.safetensors"))
    assert _max_diff(art, _weights(run, 6, "student_ema")) == 0.0
    assert _max_diff(art, _weights(run, 6, "student")) > 0.0
    # and it resumes from its step-3 checkpoint to the same weights
    resumed = tmp_path / "resumed"
    cfg.output_dir = str(resumed)
    train(cfg, stop_after=3)
    train(cfg, resume=True)
    assert _max_diff(_weights(run, 6, "student"), _weights(resumed, 6, "student")) == 0.0
