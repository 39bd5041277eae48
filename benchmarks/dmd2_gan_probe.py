"""What can DMD2's discriminator see, at which noise level? A probe of a DMD2 checkpoint's GAN branch.

DMD2's GAN head judges noised images (``x + s n``, ``s`` from the lowest ``dmd2.gan_max_quantile`` of the
noise grid; the official default is the whole grid) through the fake score's bottleneck features. At high
noise a real and a generated image are indistinguishable, so a head trained over the whole grid can sit at
chance (logged ``loss_gan_d`` ~ 2 ln 2 = 1.386, ``p_fake`` ~ ``p_real`` ~ 0.5) and its generator term adds
noise instead of a realism signal. Per band of the grid this prints:

- the checkpoint's own head: balanced accuracy (real judged real, generated judged generated);
- a fresh head of the same architecture fit for ``--fit-steps`` Adam steps on half of the frozen features and
  scored on the other half: what the features can tell apart at all in that band.

Generated images come from the checkpoint's student artefact (its EMA when the run kept one), with class
labels cycling over the classes; real images are the run's own dataset with their labels. Class-conditional
and unconditional runs only (a text-conditioned run's captions are not handled here).

    PYTHONPATH=. python benchmarks/dmd2_gan_probe.py RUN/checkpoints/step-0001500 [--num 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from diffdistill.config import load_config
from diffdistill.data import build_dataset
from diffdistill.errors import UserError
from diffdistill.generator import load_generator
from diffdistill.methods.dmd2 import gan_critic_loss
from diffdistill.methods.gan_head import GANHead, bottleneck_features
from diffdistill.training.build import build_method
from diffdistill.training.loop import restore

BANDS = [(0.0, 1.0), (0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0)]


def balanced_accuracy(head: torch.nn.Module, fake: Tensor, real: Tensor) -> float:
    """Mean of the fraction of ``fake`` features judged fake (logit < 0) and of ``real`` judged real."""
    with torch.no_grad():
        return 0.5 * float((head(fake) < 0).float().mean() + (head(real) > 0).float().mean())


def fit_fresh_head(fake: Tensor, real: Tensor, steps: int, seed: int) -> tuple[float, float]:
    """A new :class:`GANHead` fit on the first half of each set: (train, held-out) balanced accuracy."""
    torch.manual_seed(seed)
    half = len(fake) // 2
    head = GANHead(fake.shape[1:])
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(steps):
        j = torch.randint(0, half, (64,))
        loss = gan_critic_loss(head(fake[j]), head(real[j]))  # DMD2's own critic loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (balanced_accuracy(head, fake[:half], real[:half]), balanced_accuracy(head, fake[half:], real[half:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a DMD2 checkpoint folder (RUN/checkpoints/step-NNNNNNN)")
    ap.add_argument("--num", type=int, default=1024, help="real and generated images each")
    ap.add_argument("--fit-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = Path(args.checkpoint)
    if not (ck / "config.yaml").is_file():
        raise UserError(f"{ck} is not a checkpoint folder: it has no config.yaml (give RUN/checkpoints/step-NNNNNNN)")
    cfg = load_config(ck / "config.yaml")
    if cfg.method != "dmd2" or not cfg.method_config.gan:
        raise UserError(f"{ck} is not a DMD2 run with a GAN head (method {cfg.method})")
    method, _ = build_method(cfg, "cpu")
    restore(ck, method)
    fake_score, head = method.nets["fake_score"].eval(), method.nets["gan_head"].eval()
    classes = fake_score.num_classes
    dataset = build_dataset(cfg.data)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(dataset), generator=g)[: args.num]
    real = torch.stack([dataset[int(i)][0] for i in idx]).float()
    real_cond = torch.stack([torch.as_tensor(dataset[int(i)][1]) for i in idx]).long() if classes else None
    labels = (torch.arange(len(real)) % classes) if classes else None
    with torch.no_grad():
        fake = load_generator(str(ck), device="cpu").sample(len(real), labels=labels.tolist() if classes else None,
                                                            seed=args.seed + 1)
    grid = method.grid.cpu()
    n_grid = len(grid)

    def features(x: Tensor, cond: Tensor | None, lo: float, hi: float, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        a, b = int(lo * n_grid), max(int(hi * n_grid), int(lo * n_grid) + 1)
        s = grid[torch.randint(a, b, (len(x),), generator=gen)]
        x_s = x + s.view(-1, *([1] * (x.ndim - 1))) * torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            return torch.cat([bottleneck_features(fake_score, x_s[i:i + 256], s[i:i + 256],
                                                  None if cond is None else cond[i:i + 256])
                              for i in range(0, len(x), 256)])

    print(f"{ck} (gan_max_quantile {cfg.method_config.gan_max_quantile}); {len(real)} real and generated images each\n")
    print("| grid quantiles | sigma | run's head | fresh head (fit / held out) |")
    print("|---|---|---|---|")
    for lo, hi in BANDS:
        f_fake = features(fake, labels, lo, hi, args.seed + 2)
        f_real = features(real, real_cond, lo, hi, args.seed + 3)
        own = balanced_accuracy(head, f_fake, f_real)
        fit, held = fit_fresh_head(f_fake, f_real, args.fit_steps, args.seed)
        s_lo, s_hi = float(grid[int(lo * n_grid)]), float(grid[min(int(hi * n_grid), n_grid - 1)])
        print(f"| [{lo:g}, {hi:g}) | {s_lo:.3g} - {s_hi:.3g} | {own:.3f} | {fit:.3f} / {held:.3f} |", flush=True)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # one line and exit status 2, as the command line does
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
