"""The consistency family: parameterisation, losses, iCT's curriculum and levels, paired dropout,
and iCT / CD / TSCD students trained against the exact mixture teacher."""

import math

import pytest
import torch
from torch import nn

from diffdistill.config import load_config
from diffdistill.denoiser import EDMPrecond
from diffdistill.errors import UserError
from diffdistill.methods import get_method
from diffdistill.methods.base import Batch, OptimConfig
from diffdistill.methods.consistency import (ConsistencyDenoiser, consistency_distance, consistency_sample,
                                             guided_denoiser, ict_huber_c, ict_num_levels, ict_sigmas,
                                             lognormal_level_probs, pseudo_huber, pseudo_huber_elementwise)
from diffdistill.methods.consistency_distillation import CD, TSCD, CDConfig, TSCDConfig
from diffdistill.methods.ict import ICT, ICTConfig
from diffdistill.samplers import heun
from diffdistill.schedules import karras_sigmas
from diffdistill.students import Student
from diffdistill.toy import MLP, MixtureDenoiser, default_mixture, mlp_denoiser, sliced_wasserstein
from diffdistill.training.stepper import Stepper


@pytest.fixture(autouse=True)
def one_thread():
    """Small MLPs run fastest on one thread, and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# Unit tests
def test_boundary_condition_is_exact_for_every_inner_kind():
    torch.manual_seed(0)
    x = torch.randn(64, 2) * 3
    for inner in (mlp_denoiser(2, sigma_data=1.3), MixtureDenoiser(default_mixture())):
        f = ConsistencyDenoiser(inner)
        assert torch.equal(f(x, inner.sigma_min), x)
        assert not torch.allclose(f(x, 1.0), x, atol=1e-3)  # away from the boundary it does something


def test_parameterisation_is_icts_on_an_edm_network_and_the_denoiser_far_from_the_boundary():
    torch.manual_seed(0)
    raw = MLP(2)
    inner = EDMPrecond(raw, (2,), sigma_data=0.5)
    f = ConsistencyDenoiser(inner, sigma_min=0.002, sigma_data=0.5)
    x = torch.randn(32, 2)
    for s in (0.01, 0.5, 80.0):
        sig = torch.full((32,), s)
        c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
        c_out = 0.5 * (s - 0.002) / math.sqrt(s**2 + 0.25)
        ict = c_skip * x + c_out * raw(x / math.sqrt(s**2 + 0.25), sig.log() / 4)
        assert torch.allclose(f(x, s), ict, atol=1e-5)
    # a teacher-initialised student starts as the teacher: f ~= D for s >> s_min
    teacher = MixtureDenoiser(default_mixture())
    assert torch.allclose(ConsistencyDenoiser(teacher)(x * 10, 10.0), teacher(x * 10, 10.0), atol=5e-3)


def test_curriculum_matches_hand_computed_values():
    # K = 400k (CIFAR-10): K' = floor(400000 / (log2(128) + 1)) = 50000
    assert [ict_num_levels(k, 400_000) for k in (0, 49_999, 50_000, 100_000, 150_000, 300_000, 350_000, 399_999)] \
        == [11, 11, 21, 41, 81, 641, 1281, 1281]
    # K = 100, s0 = 2, s1 = 16: K' = floor(100 / 4) = 25 -> 3, 5, 9, 17
    assert [ict_num_levels(k, 100, 2, 16) for k in (0, 24, 25, 50, 75, 99)] == [3, 3, 5, 9, 17, 17]


def test_level_probabilities_sum_to_one_and_follow_the_lognormal():
    sigmas = ict_sigmas(81)
    assert torch.allclose(sigmas[[0, -1]], torch.tensor([0.002, 80.0]))
    p = lognormal_level_probs(sigmas, -1.1, 2.0)
    assert p.shape == (80,) and torch.all(p > 0)
    assert abs(float(p.sum()) - 1) < 1e-12
    # the density per unit log-sigma peaks on the interval holding exp(Pm) = 0.333
    density = p / (sigmas[1:].double().log() - sigmas[:-1].double().log())
    peak = int(density.argmax())
    assert sigmas[peak] <= math.exp(-1.1) <= sigmas[peak + 1]
    # and matches a Monte Carlo histogram of ln s ~ N(-1.1, 2^2) restricted to the grid's range
    g = torch.Generator().manual_seed(0)
    ln_s = (-1.1 + 2.0 * torch.randn(400_000, generator=g, dtype=torch.float64))
    ln_s = ln_s[(ln_s > sigmas[0].double().log()) & (ln_s < sigmas[-1].double().log())]
    hist = torch.bucketize(ln_s, sigmas.double().log()[1:-1]).bincount(minlength=80).double() / len(ln_s)
    assert (hist - p).abs().max() < 3e-3


def test_pseudo_huber_values():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b = torch.zeros(2, 2)
    # sqrt(25 + c^2) - c and 0
    assert torch.allclose(pseudo_huber(a, b, 0.1), torch.tensor([math.sqrt(25.01) - 0.1, 0.0]))
    assert torch.allclose(pseudo_huber_elementwise(a, b, 1.0),
                          torch.tensor([(math.sqrt(10) - 1 + math.sqrt(17) - 1) / 2, 0.0]))
    assert ict_huber_c(3 * 32 * 32) == pytest.approx(0.0299, abs=1e-4)  # 0.03 on CIFAR-10
    # small differences: ~ ||d||^2 / (2c) (L2-like); large: ~ ||d|| - c (L1-like)
    small = torch.tensor([[1e-4, 0.0]])
    assert float(consistency_distance(small, torch.zeros(1, 2), "huber", 0.01)) == pytest.approx(1e-8 / 0.02, rel=1e-3)
    assert float(consistency_distance(a[:1], b[:1], "mse")) == pytest.approx(12.5)
    with pytest.raises(ValueError, match="unknown consistency loss"):
        consistency_distance(a, b, "l1")


def test_ict_uses_the_same_dropout_mask_in_both_passes():
    torch.manual_seed(0)
    net = mlp_denoiser(2, sigma_data=1.5, dropout=0.5)
    masks = []
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(lambda _m, _i, out: masks.append(out != 0))
    method = ICT(None, Student(net, [80.0]), ICTConfig(), OptimConfig(lr=1e-3), total_steps=10)
    g = torch.Generator().manual_seed(0)
    method.train_step(Batch(default_mixture().sample(64, g), None, g, 64), 0)
    assert len(masks) == 4  # two dropout layers, target pass then online pass
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3])
    assert not torch.equal(masks[0], masks[1])
    # the hook can tell masks apart: two plain forward passes draw different ones
    masks.clear()
    net(torch.randn(64, 2), 1.0)
    net(torch.randn(64, 2), 1.0)
    assert not torch.equal(masks[0], masks[2])


def test_registry_and_config_errors():
    assert get_method("cd") is CD and get_method("tscd") is TSCD and get_method("ict") is ICT
    assert CDConfig().segments == [1] and TSCDConfig().segments == [8, 4, 2, 1]
    teacher = MixtureDenoiser(default_mixture())
    student = Student(mlp_denoiser(2), [80.0])
    with pytest.raises(UserError, match="divisible"):
        TSCD(teacher, student, TSCDConfig(solver_steps=50), total_steps=10)
    with pytest.raises(UserError, match="stage_starts"):
        TSCD(teacher, student, TSCDConfig(segments=[2, 1], solver_steps=8, stage_starts=[5, 0]), total_steps=10)
    with pytest.raises(UserError, match="teacher.path"):
        CD(None, student, CDConfig(), total_steps=10)
    with pytest.raises(UserError, match="guidance_range"):
        CD(teacher, student, CDConfig(guidance_range=[5.0, 4.0]), total_steps=10)
    # teacher.guidance_scale is the solver's CFG scale
    assert load_config(base={"method": "cd", "teacher": {"guidance_scale": 2.5}}).method_config.guidance_scale == 2.5


# --------------------------------------------------------------------------------------------------
# Students trained on the exact mixture teacher (2-D, three unequal modes)
N_EVAL = 4000


def _train(method, start: int, end: int, batch: int = 256, events: list | None = None,
           last_hook: bool = True, stepper: Stepper | None = None) -> Stepper:
    """Run ``Stepper.step`` / ``on_step_end`` as the training loop does (it passes step + 1 to the hook);
    ``last_hook=False`` stops before the last hook, to look at the model before a stage switch. Returns
    the stepper (pass it back to continue the same run; sample inside its ``ema_weights()``)."""
    mix = default_mixture()
    stepper = stepper or Stepper(method)
    for step in range(start, end):
        g = torch.Generator().manual_seed(1000 + step)
        stepper.step(Batch(mix.sample(batch, g), None, g, batch), step)
        if step + 1 < end or last_hook:
            info = method.on_step_end(step + 1)
            if info and events is not None:
                events.append((step + 1, info))
    return stepper


@pytest.fixture(scope="module")
def reference():
    """Fresh mixture samples, the evaluation noise, and the 40-step Heun teacher's sliced W distance."""
    mix = default_mixture()
    ref = mix.sample(N_EVAL, torch.Generator().manual_seed(123))
    z = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(7))
    teacher = MixtureDenoiser(mix)
    sigmas = karras_sigmas(40, teacher.sigma_min, teacher.sigma_max)
    return ref, z, sliced_wasserstein(heun(teacher, z * sigmas[0], sigmas).x, ref)


def _sw(generator: Student, steps: int, reference) -> float:
    ref, z, _ = reference
    with torch.no_grad():
        x = generator(z, steps=steps, generator=torch.Generator().manual_seed(9))
    return sliced_wasserstein(x, ref)


def _toy_student(teacher_sd: float, steps: int = 1, levels=(80.0,)) -> Student:
    torch.manual_seed(0)
    return Student(mlp_denoiser(2, sigma_data=teacher_sd), list(levels)[:steps])


def test_cd_one_step_student_matches_the_teacher(reference):
    teacher = MixtureDenoiser(default_mixture())
    # N = 18 Heun steps (CM's CIFAR-10 setting); iCT's 1/(t_{n+1} - t_n) weighting makes the toy converge fast
    cfg = CDConfig(solver_steps=18, solver="heun", loss="mse", weighting="ict")
    method = CD(teacher, _toy_student(teacher.sigma_data), cfg,
                OptimConfig(lr=2e-3, weight_decay=0.0, lr_schedule="cosine", ema_decay=0.995), total_steps=1500)
    assert method.student.levels == [80.0] and method.student.renoise == "ddim"
    stepper = _train(method, 0, 1500)
    _, _, sw_teacher = reference
    with stepper.ema_weights():
        sw = _sw(method.generator(), 1, reference)
    assert sw < 2 * sw_teacher, (sw, sw_teacher)


def test_tscd_stages_switch_on_schedule_and_the_final_one_step_student_matches_the_teacher(reference, capsys):
    teacher = MixtureDenoiser(default_mixture())
    cfg = TSCDConfig(segments=[2, 1], stage_starts=[0, 1000], stage_teacher="teacher", solver_steps=18,
                     solver="heun", loss="mse", weighting="ict")
    method = TSCD(teacher, _toy_student(teacher.sigma_data), cfg,
                  OptimConfig(lr=2e-3, weight_decay=0.0, lr_schedule="cosine", ema_decay=0.995), total_steps=2000)
    grid = method.grid
    assert method.student.levels == [80.0, float(grid[9])] and method.student.renoise == "ddim"
    events: list = []
    stepper = _train(method, 0, 1000, events=events, last_hook=False)
    assert events == [] and method.stage == 0
    # after the 2-segment stage: two steps along the edges beat one step of the same model
    with stepper.ema_weights():
        two, one = _sw(method.generator(), 2, reference), _sw(method.generator(), 1, reference)
    assert two < 0.5 * one, (two, one)
    # the switch happens at its configured step, is returned and printed, and moves the sampling levels
    assert method.on_step_end(1000) == {"stage": 1.0, "segments": 1.0}
    assert "step 1000: stage 1 with 1 segment(s)" in capsys.readouterr().out
    assert method.student.levels == [80.0]
    _train(method, 1000, 2000, events=events, stepper=stepper)
    assert events == [] and method.extra_state() == {"stage": 1}
    _, _, sw_teacher = reference
    with stepper.ema_weights():
        sw = _sw(method.generator(), 1, reference)
    assert sw < 2 * sw_teacher, (sw, sw_teacher)


def test_segment_balance_evens_out_the_segments_ict_weights(monkeypatch):
    teacher = MixtureDenoiser(default_mixture())
    cfg = TSCDConfig(segments=[4, 1], solver_steps=16, weighting="ict", segment_balance=1.0)
    method = TSCD(teacher, _toy_student(teacher.sigma_data, 4, [80.0] * 4), cfg, OptimConfig(lr=1e-3), total_steps=4)
    g = method.grid
    ict = 1.0 / (g[1:] - g[:-1])
    # plain ict starves the top segment (long steps): its mean weight is a small fraction of the lowest one's
    assert ict[12:].mean() < 0.05 * ict[:4].mean()
    w = ict * TSCD._balance(4, g, 1.0)
    assert torch.allclose(w.view(4, 4).mean(dim=1), ict.mean().expand(4), rtol=1e-5)  # b = 1: equal means
    half = ict * TSCD._balance(4, g, 0.5)  # b = 1/2: each segment's mean halfway (geometrically) to the grid's
    assert torch.allclose(half.view(4, 4).mean(dim=1), (ict.view(4, 4).mean(dim=1) * ict.mean()).sqrt(), rtol=1e-5)
    # inside a segment the weights keep ict's ratios; with one segment nothing changes
    assert torch.allclose(w.view(4, 4) / w.view(4, 4)[:, :1], ict.view(4, 4) / ict.view(4, 4)[:, :1], rtol=1e-5)
    assert torch.allclose(TSCD._balance(16, g, 1.0), torch.ones(16), rtol=1e-6)
    # the step weighs each sample by its level's weight: with a unit distance the loss is their batch mean
    import diffdistill.methods.consistency_distillation as cdmod

    monkeypatch.setattr(cdmod, "consistency_distance", lambda pred, target, kind, c: torch.ones(pred.shape[0]))
    x = default_mixture().sample(64, torch.Generator().manual_seed(0))
    out = method.train_step(Batch(x, None, torch.Generator().manual_seed(5), 64), 0)
    n = torch.randint(16, (64,), generator=torch.Generator().manual_seed(5))  # the step's first draw
    assert out.logs["consistency"] == pytest.approx(float(w[n].mean()), rel=1e-5)
    with pytest.raises(UserError, match="segment_balance"):
        load_config(base={"method": "tscd", "tscd": {"segment_balance": 1.5}})
    with pytest.raises(UserError, match="segment_balance=0.5 rescales iCT weights"):
        TSCD(teacher, _toy_student(teacher.sigma_data), TSCDConfig(solver_steps=16, segment_balance=0.5), total_steps=4)


class _Counting(MixtureDenoiser):
    calls = 0

    def denoise(self, x, sigma, cond):
        type(self).calls += 1
        return super().denoise(x, sigma, cond)


def test_tscd_previous_stage_supplies_the_trajectory_and_resumes():
    teacher = _Counting(default_mixture())
    cfg = TSCDConfig(segments=[4, 2, 1], stage_starts=[0, 3, 6], solver_steps=8, loss="mse")
    method = TSCD(teacher, _toy_student(teacher.sigma_data, 4, [80.0] * 4), cfg, OptimConfig(lr=1e-2), total_steps=8)
    assert method.student.levels == [float(method.grid[i]) for i in (8, 6, 4, 2)]
    events: list = []
    stepper = _train(method, 0, 3, batch=16, events=events, last_hook=False)
    snapshot = {k: v.clone() for k, v in method.student.net.state_dict().items()}
    assert method.on_step_end(3) == {"stage": 1.0, "segments": 2.0}
    frozen = method.stage_teacher.state_dict()
    assert all(torch.equal(frozen[k], snapshot[k]) for k in snapshot)  # frozen copy of the end of stage 0
    assert not any(p.requires_grad for p in method.stage_teacher.parameters())
    calls = _Counting.calls
    _train(method, 3, 6, batch=16, events=events, stepper=stepper)
    assert _Counting.calls == calls  # stage 1 never asks the original teacher
    assert events == [(6, {"stage": 2.0, "segments": 1.0})]
    assert not all(torch.equal(method.stage_teacher.state_dict()[k], snapshot[k]) for k in snapshot)
    # a resumed run restores the stage (and its sampling levels) from the extra state
    fresh = TSCD(teacher, _toy_student(teacher.sigma_data, 4, [80.0] * 4), cfg, OptimConfig(lr=1e-2), total_steps=8)
    fresh.load_extra_state(method.extra_state())
    assert fresh.stage == 2 and fresh.student.levels == [80.0]


def test_guided_teacher_step_uses_cfg_with_per_sample_scales():
    """CFG in the solver: D_u + w (D_c - D_u) with w ~ U[lo, hi] per sample."""

    class Labelled(MixtureDenoiser):  # the label shifts x0: D_c - D_u = label
        def __init__(self):
            super().__init__(default_mixture())
            self.num_classes = 3

        def denoise(self, x, sigma, cond):
            shift = torch.zeros_like(x) if cond is None else (cond.float() % 4)[:, None].expand_as(x)
            return super().denoise(x, sigma, None) + shift

    teacher = Labelled()
    x, s = torch.randn(8, 2), torch.full((8,), 1.0)
    cond, w = torch.full((8,), 1), torch.linspace(2, 5, 8)
    out = guided_denoiser(teacher, cond, w)(x, s)
    # null label 3 -> shift 3, label 1 -> shift 1: D_u + w (D_c - D_u) = D + 3 + w (1 - 3)
    assert torch.allclose(out, MixtureDenoiser(default_mixture())(x, s) + 3 - 2 * w[:, None], atol=1e-5)


def test_ict_from_mixture_samples_two_steps_beat_one_and_match_the_teacher(reference):
    """iCT from data alone (no teacher), sampled with the multistep consistency sampler.

    Toy-scale settings, each a config value: the squared metric (pseudo-Huber's c = 0.00054 sqrt(2) is
    L1-like in 2-D and biases CT's one-sample targets: mode weights drift), Pm = 0 (the data's std is 1.6,
    not 0.5: the lognormal moves with it), and a curriculum ending at s1 = 160 for a 1500-step run.
    """
    teacher_sd = MixtureDenoiser(default_mixture()).sigma_data
    cfg = ICTConfig(s1=160, p_mean=0.0, loss="mse", taus=[0.821])
    method = ICT(None, _toy_student(teacher_sd, 2, [80.0, 0.821]), cfg,
                 OptimConfig(lr=8e-3, weight_decay=0.0, lr_schedule="cosine"), total_steps=1500)
    assert method.student.levels == [80.0, 0.821] and method.student.renoise == "fresh"
    stepper = Stepper(method)
    assert isinstance(stepper.optimizers["student"], torch.optim.RAdam)
    _train(method, 0, 1500, batch=512, stepper=stepper)  # CT's one-sample targets are noisy: a larger batch
    ref, z, sw_teacher = reference
    f = method.generator().net
    with torch.no_grad():
        one = consistency_sample(f, z, 80.0, [], generator=torch.Generator().manual_seed(9))
        two = consistency_sample(f, z, 80.0, [0.821], generator=torch.Generator().manual_seed(9))
    assert (one.nfe, two.nfe) == (1, 2)
    sw_one, sw_two = sliced_wasserstein(one.x, ref), sliced_wasserstein(two.x, ref)
    assert sw_two < sw_one, (sw_two, sw_one)
    assert sw_two < 2.5 * sw_teacher, (sw_two, sw_teacher)
    # the generator's fresh-noise re-noising (x0 + tau n) is the same sampler up to sqrt(tau^2 - s_min^2)
    assert _sw(method.generator(), 2, reference) == pytest.approx(sw_two, rel=0.05)


def test_adversarial_term_trains_the_head_and_leaves_it_no_generator_gradient():
    pytest.importorskip("diffdistill.methods.gan_head")
    torch.manual_seed(0)
    teacher = mlp_denoiser(2, sigma_data=1.5)  # an MLP: its last hidden layer is the "bottleneck"
    cfg = TSCDConfig(segments=[2], solver_steps=8, adv_weight=0.1, adv_lr=1e-3)
    method = TSCD(teacher, _toy_student(1.5), cfg, OptimConfig(lr=1e-3), total_steps=3)
    assert method.groups == {"student": ["student"], "discriminator": ["discriminator"]}
    head = method.nets["discriminator"]
    before = [p.detach().clone() for p in head.parameters()]

    def batch():
        g = torch.Generator().manual_seed(0)
        return Batch(default_mixture().sample(32, g), None, g, 32)

    out = method.train_step(batch(), 0)
    assert set(out.losses) == {"student", "discriminator"} and {"d_loss", "g_loss", "consistency"} <= set(out.logs)
    out.losses["student"].backward()  # the generator's loss (hinge term included) reaches only the student
    assert all(p.grad is None for p in head.parameters()) and all(p.requires_grad for p in head.parameters())
    assert all(p.grad is not None for p in method.student.net.parameters())
    method.student.net.zero_grad(set_to_none=True)
    logs = Stepper(method).step(batch(), 0)  # both groups step on one iteration's gradients
    assert {"grad_norm_student", "grad_norm_discriminator"} <= set(logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    assert all(p.grad is None for p in head.parameters())
