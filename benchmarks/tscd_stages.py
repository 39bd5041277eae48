"""The README's TSCD stage table: each stage student of a run at its own step count, FID and class accuracy,
optionally with TCD sampling (``--gamma``), in the protocol every TSCD number in the README uses.

    PYTHONPATH=. python benchmarks/tscd_stages.py runs/digits-tscd --steps 1 2 4
    PYTHONPATH=. python benchmarks/tscd_stages.py runs/digits-tscd --steps 2 4 --gamma 0.2 0.35 0.5

Per run, step count K (the K-segment stage student, as ``--steps K`` picks it) and gamma: digits FID, precision
and recall on ``--num-samples`` class-balanced samples at eval seed ``--seed`` (1), and class accuracy (the digits
classifier's argmax equals the requested label) over two further sets of ``--acc-samples`` at seeds 11 and 12,
their mean. 2000 / 2 x 5000 take about 7 minutes per row on one loaded core. ``--gamma 0`` is the trained DDIM
sampler. Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.digits_fid import class_accuracy
from benchmarks.digits_table import score
from diffdistill.generator import apply_gamma, load_generator
from diffdistill.metrics import DigitsFeatures, digits_ref_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--gamma", type=float, nargs="+", default=[0.0], help="TCD gamma values (0: DDIM)")
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--acc-samples", type=int, default=5000, help="per accuracy seed (11 and 12); 0 skips them")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ext = DigitsFeatures()
    ref = digits_ref_stats(ext)
    print("| run | steps | gamma | FID | precision | recall | accuracy (FID set) | accuracy (2 sets) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for run in args.runs:
        for k in args.steps:
            for gamma in args.gamma:
                gen = load_generator(run, device="cpu", steps=k)
                if gamma > 0 and k > 1:
                    apply_gamma(gen, gamma)
                elif gamma > 0:
                    continue  # one step: gamma changes nothing
                r = score(gen, ext, ref, args.num_samples, k, seed=args.seed)
                acc = "-"
                if args.acc_samples:
                    accs = [class_accuracy(gen, ext, args.acc_samples, k, s) for s in (11, 12)]
                    acc = f"{sum(accs) / 2:.4f} ({accs[0]:.4f}, {accs[1]:.4f})"
                print(f"| {run} | {k} | {gamma:g} | {r['fid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                      f"{r['accuracy']:.4f} | {acc} |", flush=True)


if __name__ == "__main__":
    main()
