"""TCD's strategic stochastic sampling of a deterministic (DDIM) student (``--gamma``).

The sampler must be diffusers' ``TCDScheduler`` with ``eta = gamma`` on the same timesteps (same noise draws,
same intermediate levels), reduce to the DDIM student at gamma 0, and be refused where it means nothing.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill.denoiser import Denoiser
from diffdistill.students import Student, tcd_level


class _VPNet(Denoiser):
    """A fixed smooth x0-predictor on a discrete VP grid (scaled-linear betas, 1000 timesteps)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        super().__init__((2, 4, 4), float(sigmas[0]), float(sigmas[-1]), sigmas=sigmas)
        self.w = torch.linspace(-0.7, 0.9, 32).view(2, 4, 4)

    def denoise(self, x, sigma, cond):
        s = sigma.view(-1, 1, 1, 1)
        return torch.tanh(self.w * x / (1 + s**2).sqrt() + 0.1 * s.log())


def _scheduler():
    from diffusers import TCDScheduler

    return TCDScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="sample", set_alpha_to_one=True)


@pytest.mark.parametrize("gamma", [0.3, 0.8])
def test_gamma_sampling_is_diffusers_tcd_scheduler(gamma):
    sched = _scheduler()
    abar = sched.alphas_cumprod.double()
    net = _VPNet(abar.float())
    timesteps = [999, 759, 479, 239]  # a 4-segment student's edges on the teacher's timesteps
    levels = [float(net.sigmas[t]) for t in timesteps]
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = Student(net, levels, "ddim", gamma=gamma)(z, generator=torch.Generator().manual_seed(1))

    # the same sampler in VP space through diffusers: x_vp = sqrt(abar) x, eta = gamma
    sched.set_timesteps(timesteps=timesteps)
    gen = torch.Generator().manual_seed(1)
    x = math.sqrt(1 - abar[999]) * z
    for t in sched.timesteps:
        a = float(abar[int(t)])
        x0 = net(x / math.sqrt(a), float(net.sigmas[int(t)]))
        x = sched.step(x0, t, x, eta=gamma, generator=gen).prev_sample
    torch.testing.assert_close(ours, x0, rtol=1e-4, atol=1e-5)
    # and it is not the deterministic student
    ddim = Student(net, levels, "ddim")(z)
    assert (ours - ddim).abs().max() > 1e-2


def test_gamma_zero_is_ddim_and_bad_gamma_is_refused():
    net = _VPNet(_scheduler().alphas_cumprod)
    levels = [float(net.sigmas[t]) for t in (999, 499)]
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = Student(net, levels, "ddim")(z)
    b = Student(net, levels, "ddim", gamma=0.0)(z, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # the intermediate level: timestep floor((1 - gamma) t) of the grid; gamma 1 goes to the grid's lowest level
    assert tcd_level(net.sigmas, levels[1], 0.5) == pytest.approx(float(net.sigmas[249]))
    assert tcd_level(net.sigmas, levels[1], 1.0) == pytest.approx(float(net.sigmas[0]))
    with pytest.raises(ValueError, match="gamma must be in"):
        Student(net, levels, "ddim", gamma=1.5)
    with pytest.raises(ValueError, match="needs renoise='ddim'"):
        Student(net, levels, "fresh", gamma=0.3)
