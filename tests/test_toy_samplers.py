"""The exact mixture teacher and the ODE samplers reproduce the mixture; one Euler step does not."""

import torch

from diffdistill.samplers import ddim, euler, heun
from diffdistill.schedules import karras_sigmas
from diffdistill.toy import MixtureDenoiser, default_mixture, energy_distance


def _sample(sampler, steps, n=4000, seed=0):
    mix = default_mixture()
    teacher = MixtureDenoiser(mix)
    g = torch.Generator().manual_seed(seed)
    sigmas = karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max)
    z = torch.randn(n, 2, generator=g)
    return mix, sampler(teacher, z * sigmas[0], sigmas)


def test_heun_40_steps_reproduces_mixture():
    mix, out = _sample(heun, 40)
    assert out.nfe == 2 * 40 - 1
    assert torch.allclose(mix.mode_weights(out.x), mix.weights, atol=0.03)
    assert torch.allclose(mix.mode_means(out.x), mix.means, atol=0.05)


def test_one_euler_step_does_not():
    mix, out = _sample(euler, 1)
    assert out.nfe == 1
    # one step returns E[x0 | x_T]: everything collapses towards the data mean
    ref = mix.sample(4000, torch.Generator().manual_seed(1))
    _, good = _sample(heun, 40)
    assert energy_distance(out.x, ref) > 20 * energy_distance(good.x, ref)
    assert (mix.mode_means(out.x) - mix.means).abs().nan_to_num(10.0).max() > 0.5


def test_ddim_equals_euler_in_sigma_space():
    _, a = _sample(ddim, 10)
    _, b = _sample(euler, 10)
    assert torch.allclose(a.x, b.x, atol=1e-5)


def test_exact_denoiser_matches_monte_carlo_posterior_mean():
    mix = default_mixture()
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(200000, g)
    sigma = 1.0
    x = x0 + sigma * torch.randn(x0.shape, generator=g)
    # E[x0 | x in a small box around a point] ~ exact denoiser at that point
    point = torch.tensor([[0.0, 0.0]])
    near = (x - point).norm(dim=1) < 0.1
    mc = x0[near].mean(0)
    exact = mix.denoise(point, torch.tensor([sigma]))[0]
    assert (mc - exact).abs().max() < 0.08
