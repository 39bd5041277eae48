"""Does DisBack converge faster than DMD2? Distance to the target every K iterations, side by side.

    PYTHONPATH=. python benchmarks/convergence.py toy                 # 5 seeds, ~7 min on 2 cores
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/convergence.py digits --threads 1   # ~22 min

Both methods get the same total iterations; DisBack's degradation stage counts (its student does not move
there, so its curve is flat until ``degradation_steps``).

``toy``: the exact 2-D mixture teacher and the recipe of ``tests/test_dmd2.py::test_one_step_student_matches_
mixture`` (an MLP fitted to the mixture initialises student and fake score; 5000 iterations, ratio 5,
generator lr 3e-3 and fake-score lr 1e-2, both cosine, DM sigmas up to the grid's 60% quantile). Every K
iterations: sliced W1 (256 directions) of 4000 one-step samples to 4000 fresh mixture samples, as a ratio to
the teacher's 40-step Heun samples from the same latents (the test's bound is 1.5x). Prints the mean and
spread over seeds, the first iteration at which each method's seed-mean falls below a few thresholds, and
the final per-seed ratios.

``digits``: the shipped digits teacher through the real training loop (``diffdistill train``) with
``configs/digits/dmd2.yaml`` and ``configs/digits/disback.yaml`` at their defaults (same train.steps, lr,
batch); a checkpoint every K steps, each scored by digits FID (class-balanced samples) and the digit
classifier's accuracy on the requested labels. Runs that already exist under ``--out`` are resumed or reused.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffdistill.methods.base import Batch, OptimConfig
from diffdistill.methods.disback import DisBack, DisBackConfig
from diffdistill.methods.dmd2 import DMD2, DMD2Config
from diffdistill.samplers import heun
from diffdistill.schedules import karras_sigmas
from diffdistill.students import Student
from diffdistill.toy import MixtureDenoiser, default_mixture, fit_mlp_denoiser, sliced_wasserstein
from diffdistill.training.stepper import Stepper

THRESHOLDS = (4.0, 2.0, 1.5)


# ------------------------------------------------------------------------------------------------
# Toy
def toy_curve(method: str, args: argparse.Namespace, pretrained, seed: int) -> tuple[list[tuple[int, float]], dict]:
    """One run; returns ``[(iteration, SW1 / Heun-40)]`` every ``args.every`` iterations and final details."""
    torch.manual_seed(seed)
    mix = default_mixture()
    teacher = MixtureDenoiser(mix)
    student = Student(copy.deepcopy(pretrained).train(), [teacher.sigma_max])
    common = dict(dfake_gen_update_ratio=args.ratio, lr=args.lr, lr_fake=args.lr_fake, max_quantile=0.6)
    optim = OptimConfig(lr=args.lr, lr_schedule="cosine")
    if method == "dmd2":
        m = DMD2(teacher, student, DMD2Config(**common), optim, args.iters, fake_score=copy.deepcopy(pretrained))
    else:
        cfg = DisBackConfig(**common, num_nodes=args.nodes, degradation_steps=args.degradation_steps,
                            interval=args.interval, degradation_lr_scale=args.degradation_lr_scale)
        m = DisBack(teacher, student, cfg, optim, args.iters, fake_score=copy.deepcopy(pretrained))
    stepper = Stepper(m)
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(7))
    ref = mix.sample(4000, torch.Generator().manual_seed(123))
    x_heun = heun(teacher, z * teacher.sigma_max, karras_sigmas(40, teacher.sigma_min, teacher.sigma_max)).x
    sw_heun = sliced_wasserstein(x_heun, ref)

    def distance() -> float:
        with torch.no_grad():
            return sliced_wasserstein(student(z), ref) / sw_heun

    curve = [(0, distance())]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        if isinstance(m, DisBack):
            m.on_train_start(Path(run_dir), 0, True)
        for step in range(args.iters):  # the data stream of tests/test_dmd2.py::_distill
            g = torch.Generator().manual_seed(1000 + step + 100000 * seed)
            stepper.step(Batch(mix.sample(256, g), None, g, 256), step)
            m.on_step_end(step + 1)
            if (step + 1) % args.every == 0 or step + 1 == args.iters:
                curve.append((step + 1, distance()))
    with torch.no_grad():
        weights = [round(float(w), 3) for w in mix.mode_weights(student(z))]
    return curve, {"seconds": time.perf_counter() - t0, "weights": weights}


def first_below(curve: list[tuple[int, float]], level: float) -> str:
    return next((str(it) for it, v in curve if v <= level), "never")


def run_toy(args: argparse.Namespace) -> dict[str, list[tuple[int, float]]]:
    torch.set_num_threads(1)
    pretrained = fit_mlp_denoiser(default_mixture())
    curves: dict[str, list[list[tuple[int, float]]]] = {"dmd2": [], "disback": []}
    print(f"toy: {args.iters} iterations, ratio {args.ratio}, lr {args.lr} / fake {args.lr_fake} (cosine); DisBack "
          f"N={args.nodes}, degradation_steps={args.degradation_steps}, interval={args.interval}, "
          f"degradation_lr_scale={args.degradation_lr_scale}\n")
    print("| seed | method | final SW1 / Heun-40 | mode weights | s |\n|---|---|---|---|---|")
    for seed in args.seeds:
        for method in curves:
            curve, info = toy_curve(method, args, pretrained, seed)
            curves[method].append(curve)
            print(f"| {seed} | {method} | {curve[-1][1]:.2f}x | {info['weights']} | {info['seconds']:.0f} |",
                  flush=True)
    means = {m: [(c[0][i][0], statistics.mean(r[i][1] for r in c)) for i in range(len(c[0]))]
             for m, c in curves.items()}
    print(f"\nSW1 / Heun-40, mean (min-max) over seeds {args.seeds}\n")
    print("| iteration | DMD2 | DisBack |\n|---|---|---|")
    for i, (it, _) in enumerate(means["dmd2"]):
        cells = []
        for m in ("dmd2", "disback"):
            vals = [r[i][1] for r in curves[m]]
            cells.append(f"{statistics.mean(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})")
        print(f"| {it} | {cells[0]} | {cells[1]} |")
    print("\nfirst iteration where the seed-mean is <= threshold\n")
    print("| threshold | DMD2 | DisBack |\n|---|---|---|")
    for level in THRESHOLDS:
        print(f"| {level}x | {first_below(means['dmd2'], level)} | {first_below(means['disback'], level)} |")
    if args.plot:
        plot({m: (curves[m], means[m]) for m in curves}, args.plot, "SW1 / Heun-40 (log)", log=True,
             vline=args.degradation_steps, title="exact mixture teacher, one-step student",
             vline2=args.degradation_steps + (args.nodes - 1) * args.interval)
    return means


# ------------------------------------------------------------------------------------------------
# Digits
def run_digits(args: argparse.Namespace) -> None:
    from diffdistill.config import load_config
    from diffdistill.generator import load_generator
    from diffdistill.metrics import DigitsFeatures, digits_ref_stats, evaluate_fid
    from diffdistill.training.checkpoints import latest_checkpoint, list_checkpoints, read_meta
    from diffdistill.training.loop import train

    torch.set_num_threads(args.threads)
    ext = DigitsFeatures()
    ref = digits_ref_stats(ext)
    results: dict[str, list[tuple[int, float, float]]] = {}
    degradation = teacher_from = 0
    for method in ("dmd2", "disback"):
        run = Path(args.out) / method
        overrides = [f"output_dir={run}", f"train.checkpoint_every={args.every}", "train.keep_checkpoints=0",
                     "train.sample_every=0", *args.set]
        if args.steps:
            overrides.append(f"train.steps={args.steps}")
        cfg = load_config(f"configs/digits/{method}.yaml", overrides)
        if method == "disback":
            c = cfg.method_config
            degradation, teacher_from = c.degradation_steps, c.degradation_steps + (c.num_nodes - 1) * c.interval
        last = latest_checkpoint(run)
        t0 = time.perf_counter()
        if last is None or read_meta(last)["step"] < cfg.train.steps:
            train(cfg, resume=last is not None)
            print(f"{method}: trained {cfg.train.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for ck in list_checkpoints(run):
            gen = load_generator(ck, device="cpu")
            r = evaluate_fid(gen, ext, ref, args.num_samples, batch_size=500, seed=1, progress=False)
            labels = torch.arange(args.num_samples) % 10
            with torch.no_grad():
                x = gen.sample(args.num_samples, labels=labels.tolist(), seed=2)
                logits = ext.model.head(torch.relu(ext(x.float())))  # DigitsCNN.forward after ext's resizing
                acc = float((logits.argmax(1) == labels).float().mean())
            rows.append((read_meta(ck)["step"], r["fid"], acc))
            print(f"{method} step {rows[-1][0]}: digits FID {r['fid']:.2f}, class accuracy {acc:.3f}", flush=True)
        results[method] = rows
    print(f"\ndigits FID ({args.num_samples} class-balanced samples) and accuracy on the requested labels\n")
    print("| step | DMD2 FID | DisBack FID | DMD2 acc | DisBack acc |\n|---|---|---|---|---|")
    by_step = {m: {s: (f, a) for s, f, a in rows} for m, rows in results.items()}
    for s in sorted(set(by_step["dmd2"]) | set(by_step["disback"])):
        d, b = by_step["dmd2"].get(s, (float("nan"),) * 2), by_step["disback"].get(s, (float("nan"),) * 2)
        print(f"| {s} | {d[0]:.2f} | {b[0]:.2f} | {d[1]:.3f} | {b[1]:.3f} |")
    if args.plot:
        curves = {m: ([[(s, f) for s, f, _ in rows]], [(s, f) for s, f, _ in rows]) for m, rows in results.items()}
        plot(curves, args.plot, "digits FID (log)", log=True, vline=degradation, title="digits teacher, one step",
             vline2=teacher_from)


# ------------------------------------------------------------------------------------------------
def plot(curves: dict, path: str, ylabel: str, log: bool, vline: int, title: str, vline2: int) -> None:
    """Seed curves (thin) and their mean (thick) per method; dotted lines where DisBack's stage 2 starts
    and where its target becomes the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, (runs, mean)), color in zip(curves.items(), ("tab:blue", "tab:red")):
        for r in runs if len(runs) > 1 else []:
            ax.plot(*zip(*r), color=color, alpha=0.25, linewidth=0.8)
        ax.plot(*zip(*mean), color=color, linewidth=2, label={"dmd2": "DMD2", "disback": "DisBack"}[method])
    ax.axvline(vline, color="grey", linestyle=":", label="DisBack: end of degradation recording")
    ax.axvline(vline2, color="black", linestyle=":", label="DisBack: target = teacher (node 0)")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("iteration (DisBack's degradation stage included)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="task", required=True)
    toy = sub.add_parser("toy", help="exact mixture teacher, several seeds")
    toy.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    toy.add_argument("--iters", type=int, default=5000)
    toy.add_argument("--every", type=int, default=250)
    toy.add_argument("--ratio", type=int, default=5, help="dfake_gen_update_ratio")
    toy.add_argument("--lr", type=float, default=3e-3)
    toy.add_argument("--lr-fake", type=float, default=1e-2)
    toy.add_argument("--nodes", type=int, default=10)
    toy.add_argument("--degradation-steps", type=int, default=500)
    toy.add_argument("--interval", type=int, default=50)
    toy.add_argument("--degradation-lr-scale", type=float, default=0.03)
    toy.add_argument("--plot", default="runs/convergence-toy.png")
    dig = sub.add_parser("digits", help="shipped digits teacher, the two shipped configs")
    dig.add_argument("--out", default="runs/convergence-digits")
    dig.add_argument("--steps", type=int, default=0, help="train.steps for both (0: the configs' own)")
    dig.add_argument("--every", type=int, default=250)
    dig.add_argument("--num-samples", type=int, default=1000)
    dig.add_argument("--threads", type=int, default=2)
    dig.add_argument("--set", action="append", default=[], help="extra override for both configs")
    dig.add_argument("--plot", default="runs/convergence-digits.png")
    args = ap.parse_args()
    run_toy(args) if args.task == "toy" else run_digits(args)


if __name__ == "__main__":
    main()
